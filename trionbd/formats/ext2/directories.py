"""Directories: linear ones scanned (small ones remembered by name), hash-indexed
(htree) ones searched through their index, every block's checksum tail verified with
``metadata_csum``, and inline-data directories read from the inode."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .. import FormatError
from .checksums import HashVersion, dx_hash, ext4_crc32c
from .errors import Ext2ChecksumError, Ext2NotADirectory, Ext2Unsupported
from .inodes import FL_CASEFOLD, FL_INDEX, LRU, MAX_PREAD_BYTES, N_BLOCKS_BYTES, Inode, Volume
from .maps import FileMap, Maps
from .superblock import Compat, Incompat, u16, u32

READ_GAP_BYTES = 64 << 10
"""Directory runs separated on disk by at most this many bytes are read in one pread."""

DIR_CACHE_MAX_BYTES = 32 << 10
"""Linear directories up to this size keep a name -> inode cache after the first lookup."""

DIR_CACHE_ENTRIES = 256
"""Directories kept in that cache."""

MAX_NAME_LEN = 255
"""Longest directory entry name."""

DIR_TAIL_SIZE = 12
DIR_TAIL_FT = 0xDE

# Directory entry file types (with the filetype feature)
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)

_DIRENT = struct.Struct("<IHBB")


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One directory entry.  ``name`` is decoded as UTF-8 with ``surrogateescape``."""

    name: str
    ino: int
    file_type: int
    """The entry's FT_* code (0 when the filesystem lacks the ``filetype`` feature)."""


def _dx_index(entries: list[tuple[int, int]], target: int) -> int:
    """Index of the last htree entry whose hash is <= target (entry 0 counts as hash 0)."""
    lo, hi = 1, len(entries)
    while lo < hi:
        mid = (lo + hi) // 2
        if entries[mid][0] <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


class Directories:
    """The directories of a :class:`Volume` whose file maps ``maps`` gives."""

    def __init__(self, volume: Volume, maps: Maps) -> None:
        self._vol = volume
        self._sb = volume.sb
        self._maps = maps
        self._names: LRU[int, dict[bytes, int]] = LRU(DIR_CACHE_ENTRIES)

    async def entries(self, inode: Inode) -> list[tuple[bytes, int, int]]:
        """Every live entry of directory ``inode`` as ``(name, inode, FT_* type)``, '.' and
        '..' included, in on-disk order."""
        ino, bs = inode.ino, self._sb.block_size
        if not inode.is_dir:
            raise Ext2NotADirectory(f"inode {ino} is a {inode.kind}, not a directory")
        fmap = await self._maps.get(ino)
        out: list[tuple[bytes, int, int]] = []
        if fmap.inline is not None:
            data = inode.i_block + (inode.inline_xattr or b"")
            out.append((b".", ino, FT_DIR))
            out.append((b"..", u32(data, 0), FT_DIR))
            where = f"directory inode {ino} inline data"
            self._parse_dirents(data, 4, N_BLOCKS_BYTES, where, out)
            if len(data) > N_BLOCKS_BYTES:
                self._parse_dirents(data, N_BLOCKS_BYTES, len(data), where, out)
            return out
        if inode.size % bs:
            raise FormatError(f"directory inode {ino}: size {inode.size} is not a multiple "
                              f"of the block size {bs}")  # fmt: skip
        dx = self._is_dx(inode)
        async for lblk, phys, block in self._read_runs(fmap, f"directory inode {ino}"):
            where = f"directory inode {ino} block {lblk} (byte offset {phys})"
            if dx and lblk == 0:
                out.extend(self._dx_root_dots(block, where))
                self._dx_entries(inode, block, 0x20, where)
                continue
            if dx and self._is_dx_node(block):
                if self._sb.metadata_csum:
                    self._dx_entries(inode, block, 8, where)
                continue
            end = self._verify_leaf(inode, block, where)
            self._parse_dirents(block, 0, end, where, out)
        return out

    async def find(self, inode: Inode, name: bytes) -> int | None:
        """Inode number of ``name`` in directory ``inode``, or None."""
        if len(name) > MAX_NAME_LEN:
            return None
        if not inode.is_dir:
            raise Ext2NotADirectory(f"inode {inode.ino} is a {inode.kind}, not a directory")
        if inode.encrypted:
            raise Ext2Unsupported(f"directory inode {inode.ino} is encrypted")
        if self._is_dx(inode) and not inode.flags & FL_CASEFOLD:
            return await self._dx_find(inode, name)
        return await self._linear_find(inode, name)

    # ---------------------------------------------------------------- reading blocks

    async def _read_runs(self, fmap: FileMap, what: str) -> AsyncIterator[tuple[int, int, bytes]]:
        """Yield ``(logical block, byte offset, block bytes)`` for every mapped block.

        Runs closer than :data:`READ_GAP_BYTES` on disk share one pread (the gap is read
        and dropped: cheaper than another call), up to :data:`MAX_PREAD_BYTES` each.
        """
        bs = self._sb.block_size
        pieces: list[tuple[int, int, int]] = []  # (logical block, physical byte, length)
        for seg in fmap.runs():
            assert seg.physical is not None  # runs() only yields mapped runs
            for k in range(0, seg.length, MAX_PREAD_BYTES):
                n = min(MAX_PREAD_BYTES, seg.length - k)
                pieces.append(((seg.offset + k) // bs, seg.physical + k, -(-n // bs) * bs))
        i = 0
        while i < len(pieces):
            start = pieces[i][1]
            end = start + pieces[i][2]
            j = i + 1
            while j < len(pieces):
                nxt = pieces[j]
                if not 0 <= nxt[1] - end <= READ_GAP_BYTES or nxt[1] + nxt[2] - start > (
                    MAX_PREAD_BYTES
                ):
                    break
                end = nxt[1] + nxt[2]
                j += 1
            data = await self._vol.read(start, end - start, what)
            for lblk, phys, length in pieces[i:j]:
                base = phys - start
                for k in range(0, length, bs):
                    yield lblk + k // bs, phys + k, data[base + k : base + k + bs]
            i = j

    async def _dir_block(self, inode: Inode, fmap: FileMap, lblk: int) -> tuple[bytes, str]:
        bs = self._sb.block_size
        segs = fmap.lookup(lblk * bs, bs)
        if not segs or segs[0].physical is None:
            raise FormatError(f"directory inode {inode.ino} has a hole at block {lblk}")
        phys = segs[0].physical
        where = f"directory inode {inode.ino} block {lblk} (byte offset {phys})"
        return await self._vol.block(phys // bs, where), where

    # ---------------------------------------------------------------- entries

    def _rec_len(self, raw: int) -> int:
        bs = self._sb.block_size
        if bs < 65536:
            return raw
        if raw in (0, 65535):
            return bs
        return (raw & 65532) | ((raw & 3) << 16)

    def _parse_dirents(
        self, buf: bytes, start: int, end: int, where: str,
        out: list[tuple[bytes, int, int]],
    ) -> None:  # fmt: skip
        """Append (name, inode, file type) of the live entries in ``buf[start:end]``."""
        pos = start
        unpack = _DIRENT.unpack_from
        ft_ok = self._sb.filetype
        max_ino = self._sb.inodes_count
        while pos < end:
            if pos + 8 > end:
                raise FormatError(f"{where}: truncated directory entry at +{pos}")
            d_ino, rec_len, name_len, ftype = unpack(buf, pos)
            if not ft_ok:
                name_len |= ftype << 8
                ftype = 0
            rec_len = self._rec_len(rec_len)
            if rec_len < 8 or rec_len % 4 or pos + rec_len > end:
                raise FormatError(f"{where}: directory entry at +{pos} has invalid "
                                  f"record length {rec_len}")  # fmt: skip
            if d_ino:
                if 8 + name_len > rec_len or name_len == 0:
                    raise FormatError(f"{where}: directory entry at +{pos} has name length "
                                      f"{name_len} but record length {rec_len}")  # fmt: skip
                if d_ino > max_ino:
                    raise FormatError(f"{where}: directory entry at +{pos} points to inode "
                                      f"{d_ino} (only {max_ino} exist)")  # fmt: skip
                name = buf[pos + 8 : pos + 8 + name_len]
                if b"/" in name or b"\0" in name:
                    raise FormatError(f"{where}: directory entry at +{pos} has a name "
                                      f"containing '/' or NUL: {name!r}")  # fmt: skip
                out.append((name, d_ino, ftype))
            pos += rec_len

    def _verify_leaf(self, inode: Inode, block: bytes, where: str) -> int:
        """Check a leaf block's checksum tail; return where the entries end."""
        bs = self._sb.block_size
        if not self._sb.metadata_csum:
            return bs
        t = bs - DIR_TAIL_SIZE
        d_ino, rec_len, name_len, ftype = _DIRENT.unpack_from(block, t)
        if d_ino or rec_len != DIR_TAIL_SIZE or name_len or ftype != DIR_TAIL_FT:
            raise FormatError(f"{where}: directory block has no checksum tail "
                              f"(metadata_csum)")  # fmt: skip
        stored = u32(block, bs - 4)
        computed = ext4_crc32c(inode.csum_seed, block[:t])
        if stored != computed:
            raise Ext2ChecksumError(f"{where}: directory block checksum mismatch (stored "
                                    f"{stored:#010x}, computed {computed:#010x})")  # fmt: skip
        return t

    # ---------------------------------------------------------------- htree

    def _is_dx(self, inode: Inode) -> bool:
        return (
            bool(inode.flags & FL_INDEX)
            and bool(self._sb.features.compat & Compat.DIR_INDEX)
            and (not inode.inline_data)
        )

    def _dx_entries(
        self, inode: Inode, block: bytes, count_off: int, where: str
    ) -> list[tuple[int, int]]:
        """Validate an htree root or node; return its (hash, logical block) entries."""
        bs = self._sb.block_size
        limit, count = struct.unpack_from("<HH", block, count_off)
        room = (bs - count_off) // 8 - (1 if self._sb.metadata_csum else 0)
        if limit != room or not 1 <= count <= limit:
            raise FormatError(f"{where}: htree node has count {count}, limit {limit} "
                              f"(expected limit {room})")  # fmt: skip
        if self._sb.metadata_csum:
            tail = count_off + limit * 8
            stored = u32(block, tail + 4)
            c = ext4_crc32c(inode.csum_seed, block[: count_off + count * 8])
            c = ext4_crc32c(c, block[tail : tail + 4] + b"\0\0\0\0")  # checksum field as zero
            if stored != c:
                raise Ext2ChecksumError(f"{where}: htree node checksum mismatch (stored "
                                        f"{stored:#010x}, computed {c:#010x})")  # fmt: skip
        nblocks = inode.size // bs
        entries = [(0, u32(block, count_off + 4))]
        for i in range(1, count):
            h, blk = struct.unpack_from("<II", block, count_off + 8 * i)
            if h < entries[-1][0]:
                raise FormatError(f"{where}: htree hashes are not sorted at entry {i}")
            entries.append((h, blk))
        for _h, blk in entries:
            if blk >= nblocks:
                raise FormatError(f"{where}: htree entry points to block {blk} beyond the "
                                  f"directory's {nblocks} blocks")  # fmt: skip
        return entries

    def _dx_root_dots(self, block: bytes, where: str) -> list[tuple[bytes, int, int]]:
        """The '.' and '..' entries that open an htree root block."""
        out = []
        for pos, name in ((0, b"."), (12, b"..")):
            d_ino, _rec_len, name_len, ftype = _DIRENT.unpack_from(block, pos)
            if not self._sb.filetype:
                name_len |= ftype << 8
                ftype = 0
            if (
                block[pos + 8 : pos + 8 + name_len] != name
                or not 0 < d_ino <= self._sb.inodes_count
            ):
                raise FormatError(f"{where}: htree root lacks its {name.decode()!r} entry at "
                                  f"+{pos}")  # fmt: skip
            out.append((name, d_ino, ftype))
        if self._rec_len(u16(block, 4)) != 12:
            raise FormatError(f"{where}: htree root '.' entry has record length "
                              f"{self._rec_len(u16(block, 4))}, expected 12")  # fmt: skip
        return out

    def _is_dx_node(self, block: bytes) -> bool:
        d_ino, rec_len, name_len, _ft = _DIRENT.unpack_from(block, 0)
        return d_ino == 0 and self._rec_len(rec_len) == self._sb.block_size and name_len == 0

    async def _dx_find(self, inode: Inode, name: bytes) -> int | None:
        fmap = await self._maps.get(inode.ino)
        root, where = await self._dir_block(inode, fmap, 0)
        self._dx_root_dots(root, where)
        _zero, version, info_len, levels, _flags = struct.unpack_from("<IBBBB", root, 0x18)
        max_levels = 3 if self._sb.features.incompat & Incompat.LARGEDIR else 2
        if info_len != 8 or levels >= max_levels:
            raise FormatError(f"{where}: htree root info length {info_len}, {levels + 1} "
                              f"levels (at most {max_levels})")  # fmt: skip
        if version <= HashVersion.TEA and self._sb.unsigned_hash:
            version += 3
        if version == HashVersion.SIPHASH:
            return await self._linear_find(inode, name)
        if version > HashVersion.SIPHASH:
            raise FormatError(f"{where}: unknown directory hash version {version}")
        target = dx_hash(name, version, self._sb.hash_seed)[0]
        entries = self._dx_entries(inode, root, 0x20, where)
        path: list[tuple[list[tuple[int, int]], int]] = []
        visited: set[int] = set()

        async def descend(
            entries: list[tuple[int, int]], idx: int, depth: int, leftmost: bool
        ) -> int:
            """Walk from ``entries[idx]`` at ``depth`` down to a leaf, recording the path.
            Below the first node, take the entry for the target hash, or the leftmost one
            when continuing into the next leaf after a hash collision."""
            while True:
                path.append((entries, idx))
                blk = entries[idx][1]
                if depth == levels:
                    return blk
                node, nwhere = await self._dir_block(inode, fmap, blk)
                if not self._is_dx_node(node):
                    raise FormatError(f"{nwhere}: expected an htree index node")
                entries = self._dx_entries(inode, node, 8, nwhere)
                idx = 0 if leftmost else _dx_index(entries, target)
                depth += 1

        leaf = await descend(entries, _dx_index(entries, target), 0, False)
        while True:
            if leaf in visited:
                raise FormatError(f"directory inode {inode.ino}: htree visits leaf block "
                                  f"{leaf} twice")  # fmt: skip
            visited.add(leaf)
            block, lwhere = await self._dir_block(inode, fmap, leaf)
            if self._is_dx_node(block) and self._sb.metadata_csum:
                raise FormatError(f"{lwhere}: htree leaf is an index node")
            found: list[tuple[bytes, int, int]] = []
            self._parse_dirents(block, 0, self._verify_leaf(inode, block, lwhere), lwhere,
                                found)  # fmt: skip
            for entry_name, d_ino, _ft in found:
                if entry_name == name:
                    return d_ino
            # A hash collision may continue into the next leaf (its hash has bit 0 set).
            while path and path[-1][1] + 1 >= len(path[-1][0]):
                path.pop()
            if not path:
                return None
            entries, idx = path.pop()
            if entries[idx + 1][0] & ~1 != target:
                return None
            leaf = await descend(entries, idx + 1, len(path), True)

    async def _linear_find(self, inode: Inode, name: bytes) -> int | None:
        """Scan a directory without (usable) index; small ones are cached by name."""
        names = self._names.get(inode.ino)
        if names is None:
            names = {}
            for entry_name, d_ino, _ft in await self.entries(inode):
                names.setdefault(entry_name, d_ino)
            if inode.size <= DIR_CACHE_MAX_BYTES:
                self._names.put(inode.ino, names)
        return names.get(name)
