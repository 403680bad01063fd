"""The image as the rest of the reader sees it (:class:`Volume`): reads checked against
the image and the filesystem's blocks, cached metadata blocks, block group descriptors
and the inode tables, parsed into :class:`Inode`."""

from __future__ import annotations

import stat
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .. import FormatError, Pread, read_exactly
from .checksums import crc16, ext4_crc32c
from .errors import Ext2ChecksumError
from .superblock import GOOD_OLD_INODE_SIZE, SUPERBLOCK_OFFSET, Incompat, Superblock, u16, u32

MAX_PREAD_BYTES = 4 << 20
"""Largest single ``pread`` issued for bulk data (directory runs, extent levels, file data)."""

ITABLE_CHUNK_BYTES = 256 << 10
"""Inode tables are read and cached in aligned chunks of this many bytes."""

GDT_CHUNK_BYTES = 1 << 20
"""The group descriptor table is read and cached in aligned chunks of this many bytes."""

GDT_CACHE_CHUNKS = 64
"""Raw group descriptor table chunks kept in the LRU cache (64 x 1 MiB)."""

INODE_CACHE_ENTRIES = 131072
"""Parsed inodes kept in the LRU cache."""

ITABLE_CACHE_CHUNKS = 128
"""Raw inode-table chunks kept in the LRU cache (128 x 256 KiB)."""

BLOCK_CACHE_BLOCKS = 4096
"""Metadata blocks (htree nodes, directory leaves read by lookups, symlink blocks) cached."""

N_BLOCKS_BYTES = 60  # i_block: 15 x le32
XATTR_MAGIC = 0xEA020000
XATTR_INDEX_SYSTEM = 7

# Group descriptor bg_flags
_BG_INODE_UNINIT = 0x1

# Inode i_flags
FL_ENCRYPT = 0x800
FL_INDEX = 0x1000
FL_HUGE_FILE = 0x40000
FL_EXTENTS = 0x80000
FL_INLINE_DATA = 0x10000000
FL_CASEFOLD = 0x40000000

_KIND = {
    stat.S_IFREG: "regular file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symbolic link",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
}

_INODE_BASE = struct.Struct("<HHIIIIIHHIII60sIIIIHHHHHH")  # the 128-byte base inode
_INODE_EXTRA = struct.Struct("<HHIII")  # i_extra_isize, i_checksum_hi, c/m/atime_extra
_INO_GEN = struct.Struct("<II")
_XATTR_ENTRY = struct.Struct("<BBHIII")


@dataclass(frozen=True, slots=True)
class Inode:
    """One parsed inode.  Times are seconds since the epoch (extended to 34 bits)."""

    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    links: int
    atime: int
    ctime: int
    mtime: int
    mtime_nsec: int
    flags: int
    generation: int
    blocks: int
    """``i_blocks``: 512-byte sectors (filesystem blocks if the inode has HUGE_FILE)."""
    file_acl: int
    i_block: bytes = field(repr=False, compare=False)
    """The raw 60-byte ``i_block`` area (block map, extent root, inline data or link)."""
    inline_xattr: bytes | None = field(default=None, repr=False, compare=False)
    """Value of the in-inode ``system.data`` attribute (inline data beyond 60 bytes)."""
    csum_seed: int = field(default=0, repr=False, compare=False)

    @property
    def file_type(self) -> int:
        """The ``S_IFMT`` bits of :attr:`mode`."""
        return stat.S_IFMT(self.mode)

    @property
    def kind(self) -> str:
        """Human-readable file type: "regular file", "directory", "FIFO", ..."""
        return _KIND.get(self.file_type, f"file of type {self.file_type:#o}")

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def inline_data(self) -> bool:
        """The file's data lives in the inode (``inline_data`` feature)."""
        return bool(self.flags & FL_INLINE_DATA)

    @property
    def uses_extents(self) -> bool:
        return bool(self.flags & FL_EXTENTS)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FL_ENCRYPT)


_K = TypeVar("_K")
_V = TypeVar("_V")


class LRU(Generic[_K, _V]):
    """A mapping that keeps its ``max_entries`` most recently used entries."""

    __slots__ = ("_data", "_max")

    def __init__(self, max_entries: int) -> None:
        self._data: OrderedDict[_K, _V] = OrderedDict()
        self._max = max_entries

    def get(self, key: _K) -> _V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)


@dataclass(frozen=True, slots=True)
class _Group:
    inode_table: int
    flags: int
    itable_unused: int


class Volume:
    """An ext2/3/4 image read through ``pread``, with its parsed superblock ``sb``.

    Every read is checked against the image's size (and block numbers against the
    filesystem's); metadata blocks, group descriptors and inodes are cached in bounded
    LRU caches.
    """

    def __init__(self, pread: Pread, size: int, sb: Superblock) -> None:
        self.sb = sb
        self._pread = pread
        self._size = size
        self._groups: dict[int, _Group] = {}
        self._gdt_chunks: LRU[int, bytes] = LRU(GDT_CACHE_CHUNKS)
        self._itable: LRU[tuple[int, int], bytes] = LRU(ITABLE_CACHE_CHUNKS)
        self._inodes: LRU[int, Inode] = LRU(INODE_CACHE_ENTRIES)
        self._blocks: LRU[int, bytes] = LRU(BLOCK_CACHE_BLOCKS)

    # ---------------------------------------------------------------- raw I/O

    async def read(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at ``offset``, refusing anything outside the image."""
        if offset < 0 or length < 0 or offset + length > self._size:
            raise FormatError(
                f"{what}: bytes {offset}..{offset + length} lie outside the image "
                f"({self._size} bytes)"
            )
        return await read_exactly(self._pread, offset, length, what)

    def check_block(self, blk: int, count: int, what: str) -> None:
        """Blocks ``[blk, blk + count)`` must lie inside the filesystem."""
        sb = self.sb
        if blk < sb.first_data_block or blk + count > sb.blocks_count or count < 0:
            raise FormatError(
                f"{what}: block {blk} (+{count}) lies outside the filesystem "
                f"(blocks {sb.first_data_block}..{sb.blocks_count - 1})"
            )

    def check_used(self, used: int, what: str) -> None:
        """A file cannot use more blocks than the file system has: a map that does (its
        blocks pointing back at each other) would otherwise grow without bound."""
        if used > self.sb.blocks_count:
            raise FormatError(
                f"{what}: the file uses more blocks than the file system has "
                f"({self.sb.blocks_count}): a corrupt map, or blocks mapped more than once"
            )

    async def block(self, blk: int, what: str) -> bytes:
        """One metadata block, cached."""
        data = self._blocks.get(blk)
        if data is None:
            self.check_block(blk, 1, what)
            bs = self.sb.block_size
            data = await self.read(blk * bs, bs, what)
            self._blocks.put(blk, data)
        return data

    async def read_block_set(self, blocks: list[int], what: str) -> dict[int, bytes]:
        """Read many (uncached) blocks, one pread per physically contiguous run."""
        bs = self.sb.block_size
        out: dict[int, bytes] = {}
        wanted = sorted(set(blocks))
        max_run = max(MAX_PREAD_BYTES // bs, 1)
        i = 0
        while i < len(wanted):
            j = i + 1
            while j < len(wanted) and wanted[j] == wanted[j - 1] + 1 and j - i < max_run:
                j += 1
            start, count = wanted[i], j - i
            self.check_block(start, count, what)
            data = await self.read(start * bs, count * bs, what)
            for k in range(count):
                out[start + k] = data[k * bs : (k + 1) * bs]
            i = j
        return out

    # ---------------------------------------------------------------- groups

    async def group(self, g: int) -> _Group:
        """Block group ``g``'s descriptor, validated (checksum, inode table location)."""
        cached = self._groups.get(g)
        if cached is not None:
            return cached
        sb = self.sb
        if not 0 <= g < sb.groups_count:
            raise FormatError(f"block group {g} does not exist ({sb.groups_count} groups)")
        bs, ds = sb.block_size, sb.desc_size
        per_block = bs // ds
        dblock = g // per_block
        meta_bg = bool(sb.features.incompat & Incompat.META_BG)
        gdt_start = SUPERBLOCK_OFFSET // bs + 1  # the block after the superblock's
        if not meta_bg or dblock < sb.first_meta_bg:
            # The classic contiguous table right after the superblock: read it in chunks.
            total = -(-sb.groups_count // per_block)
            if meta_bg:
                total = min(total, sb.first_meta_bg)
            chunk_blocks = max(GDT_CHUNK_BYTES // bs, 1)
            chunk = dblock // chunk_blocks
            raw = self._gdt_chunks.get(chunk)
            first = chunk * chunk_blocks
            if raw is None:
                count = min(chunk_blocks, total - first)
                what = f"group descriptor table blocks {gdt_start + first}..+{count}"
                self.check_block(gdt_start + first, count, what)
                raw = await self.read((gdt_start + first) * bs, count * bs, what)
                self._gdt_chunks.put(chunk, raw)
            desc_block = gdt_start + dblock
            off_in = (dblock - first) * bs + (g % per_block) * ds
        else:
            g0 = dblock * per_block
            desc_block = sb.group_first_block(g0) + (1 if sb.has_super(g0) else 0)
            if g0 == 0 and bs == 1024 and sb.first_data_block == 0:
                desc_block += 1  # 1 KiB bigalloc: block 0 is the boot block, 1 the superblock
            raw = await self.block(desc_block, f"meta_bg group descriptor block {desc_block}")
            off_in = (g % per_block) * ds
        desc = raw[off_in : off_in + ds]
        offset = desc_block * bs + (g % per_block) * ds
        group = self._parse_group(g, desc, offset)
        self._groups[g] = group
        return group

    def _parse_group(self, g: int, desc: bytes, offset: int) -> _Group:
        sb = self.sb
        where = f"group descriptor {g} at byte offset {offset}"
        stored = u16(desc, 0x1E)
        if sb.metadata_csum:
            c = ext4_crc32c(sb.csum_seed, g.to_bytes(4, "little"))
            c = ext4_crc32c(c, desc[:0x1E] + b"\0\0" + desc[0x20:])
            if stored != c & 0xFFFF:
                raise Ext2ChecksumError(f"{where}: checksum mismatch (stored {stored:#06x}, "
                                        f"computed {c & 0xFFFF:#06x})")  # fmt: skip
        elif sb.gdt_csum:
            c = crc16(0xFFFF, sb.uuid + g.to_bytes(4, "little") + desc[:0x1E])
            c = crc16(c, desc[0x20:])
            if stored != c:
                raise Ext2ChecksumError(f"{where}: checksum mismatch (stored {stored:#06x}, "
                                        f"computed {c:#06x})")  # fmt: skip
        table = u32(desc, 0x8)
        flags = u16(desc, 0x12)
        unused = u16(desc, 0x1C)
        if sb.is64:
            table |= u32(desc, 0x28) << 32
            unused |= u16(desc, 0x32) << 16
        if not sb.group_csum:
            flags, unused = 0, 0
        if unused > sb.inodes_per_group:
            raise FormatError(f"{where}: {unused} unused inodes but only "
                              f"{sb.inodes_per_group} per group")  # fmt: skip
        self.check_block(table, sb.itable_blocks, f"{where}: inode table")
        return _Group(table, flags, unused)

    # ---------------------------------------------------------------- inodes

    async def inode(self, ino: int) -> Inode:
        """The parsed inode ``ino`` (cached).  Raises FormatError if it is out of range,
        not in use, or corrupt."""
        cached = self._inodes.get(ino)
        if cached is not None:
            return cached
        sb = self.sb
        if not 1 <= ino <= sb.inodes_count:
            raise FormatError(f"inode number {ino} is out of range (1..{sb.inodes_count})")
        g, idx = divmod(ino - 1, sb.inodes_per_group)
        group = await self.group(g)
        used = sb.inodes_per_group - group.itable_unused
        if group.flags & _BG_INODE_UNINIT or idx >= used:
            raise FormatError(
                f"inode {ino} is referenced but lies in the never-used part of group {g}'s "
                f"inode table (INODE_UNINIT or beyond the {used} initialized inodes)"
            )
        isz = sb.inode_size
        byte = idx * isz
        chunk = byte // ITABLE_CHUNK_BYTES
        raw = self._itable.get((g, chunk))
        if raw is None:
            start = chunk * ITABLE_CHUNK_BYTES
            length = min(ITABLE_CHUNK_BYTES, used * isz - start)
            raw = await self.read(
                group.inode_table * sb.block_size + start, length,
                f"inode table of group {g}",
            )  # fmt: skip
            self._itable.put((g, chunk), raw)
        off = byte - chunk * ITABLE_CHUNK_BYTES
        offset = group.inode_table * sb.block_size + byte
        inode = self._parse_inode(ino, raw, off, offset)
        self._inodes.put(ino, inode)
        return inode

    def _parse_inode(self, ino: int, buf: bytes, off: int, offset: int) -> Inode:
        sb = self.sb
        isz = sb.inode_size
        (mode, uid, size, atime, ctime, mtime, dtime, gid, links, blocks, flags, _osd1,
         i_block, gen, acl, size_hi, _faddr, blocks_hi, acl_hi, uid_hi, gid_hi, csum_lo,
         _res) = _INODE_BASE.unpack_from(buf, off)  # fmt: skip
        extra = csum_hi = ctime_x = mtime_x = atime_x = 0
        if isz > GOOD_OLD_INODE_SIZE:
            extra = buf[off + 0x80] | (buf[off + 0x81] << 8)
            if extra % 4 or GOOD_OLD_INODE_SIZE + extra > isz:
                raise FormatError(f"inode {ino} at byte offset {offset}: i_extra_isize "
                                  f"{extra} is invalid for {isz}-byte inodes")  # fmt: skip
            if extra >= 16:
                _e, csum_hi, ctime_x, mtime_x, atime_x = _INODE_EXTRA.unpack_from(buf, off + 0x80)
            elif extra:
                words = _INODE_EXTRA.unpack_from(buf[off : off + 0x80 + extra] + bytes(16), 0x80)
                csum_hi, ctime_x, mtime_x = words[1], words[2], words[3]
        seed = 0
        if sb.metadata_csum:
            seed = ext4_crc32c(sb.csum_seed, _INO_GEN.pack(ino, gen))
            raw = bytearray(buf[off : off + isz])
            raw[0x7C:0x7E] = b"\0\0"
            if extra >= 4:
                raw[0x82:0x84] = b"\0\0"
                stored, computed = csum_lo | (csum_hi << 16), ext4_crc32c(seed, raw)
            else:
                stored, computed = csum_lo, ext4_crc32c(seed, raw) & 0xFFFF
            if stored != computed:
                if not any(buf[off : off + isz]):
                    raise FormatError(f"inode {ino} is referenced but not in use "
                                      f"(all zero at byte offset {offset})")  # fmt: skip
                raise Ext2ChecksumError(f"inode {ino} at byte offset {offset}: checksum "
                                        f"mismatch (stored {stored:#x}, computed "
                                        f"{computed:#x})")  # fmt: skip
        if mode == 0 or (links == 0 and dtime and ino >= sb.first_ino):
            raise FormatError(f"inode {ino} is referenced but not in use (mode {mode:#o}, "
                              f"{links} links) at byte offset {offset}")  # fmt: skip
        if mode & 0o170000 not in _KIND:
            raise FormatError(f"inode {ino} at byte offset {offset}: invalid file type "
                              f"{mode & 0o170000:#o} in mode {mode:#o}")  # fmt: skip
        inline_xattr = None
        if flags & FL_INLINE_DATA:
            where = f"inode {ino} at byte offset {offset}"
            if not sb.features.incompat & Incompat.INLINE_DATA:
                raise FormatError(f"{where}: has the inline-data flag but the filesystem "
                                  f"lacks the inline_data feature")  # fmt: skip
            inline_xattr = _system_data(buf[off : off + isz], extra, where)
        # 32-bit signed seconds, extended by two epoch bits from the *_extra fields
        return Inode(
            ino, mode, uid | (uid_hi << 16), gid | (gid_hi << 16), size | (size_hi << 32),
            links,
            atime - ((atime & 0x80000000) << 1) + ((atime_x & 3) << 32),
            ctime - ((ctime & 0x80000000) << 1) + ((ctime_x & 3) << 32),
            mtime - ((mtime & 0x80000000) << 1) + ((mtime_x & 3) << 32),
            mtime_x >> 2, flags, gen, blocks | (blocks_hi << 32), acl | (acl_hi << 32),
            i_block, inline_xattr, seed,
        )  # fmt: skip


def _system_data(raw: bytes, extra: int, where: str) -> bytes:
    """The value of the in-inode ``system.data`` extended attribute of inode bytes ``raw``."""
    start = GOOD_OLD_INODE_SIZE + extra
    end = len(raw)
    if start + 4 <= end and u32(raw, start) == XATTR_MAGIC:
        base = start + 4
        pos = base
        while pos + 4 <= end and u32(raw, pos) != 0:
            if pos + _XATTR_ENTRY.size > end:
                break
            name_len, index, value_offs, value_inum, value_size, _h = _XATTR_ENTRY.unpack_from(
                raw, pos
            )
            name = raw[pos + 16 : pos + 16 + name_len]
            if pos + 16 + name_len > end:
                raise FormatError(f"{where}: in-inode extended attribute at +{pos} "
                                  f"runs past the inode")  # fmt: skip
            if index == XATTR_INDEX_SYSTEM and name == b"data":
                if value_inum:
                    raise FormatError(
                        f"{where}: system.data stored in inode {value_inum} "
                        f"(inline data must be in-inode)"
                    )
                vstart = base + value_offs
                if vstart + value_size > end:
                    raise FormatError(
                        f"{where}: system.data value ({value_size} bytes at +{vstart}) "
                        f"runs past the {end}-byte inode"
                    )
                return raw[vstart : vstart + value_size]
            pos += (16 + name_len + 3) & ~3
    raise FormatError(f"{where}: has the inline-data flag but no system.data attribute")
