"""Where a file's bytes are: block maps (direct, indirect, double and triple indirect),
extent trees of any depth, inline data and fast symlinks, made into one
logical-to-physical :class:`FileMap` per inode (cached by :class:`Maps`)."""

from __future__ import annotations

import stat
import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from typing import NamedTuple

from .. import FormatError, map_range
from .checksums import ext4_crc32c
from .errors import Ext2ChecksumError, Ext2Unsupported
from .inodes import FL_EXTENTS, FL_HUGE_FILE, FL_INLINE_DATA, LRU, N_BLOCKS_BYTES, Inode, Volume
from .superblock import u32

MAP_CACHE_ENTRIES = 4096
"""File maps kept in the LRU cache."""

MAX_EXTENT_DEPTH = 5
"""Deepest extent tree the kernel builds; deeper trees are corrupt."""

NDIR_BLOCKS = 12
EXTENT_MAGIC = 0xF30A
EXT_INIT_MAX_LEN = 32768

_EXTENT_HDR = struct.Struct("<HHHHI")
_EXTENT = struct.Struct("<IHHI")
_EXTENT_IDX = struct.Struct("<IIHH")


class Segment(NamedTuple):
    """``length`` bytes of a file at ``offset``: at byte ``physical`` of the image, or
    zeros when ``physical`` is None (a hole or an uninitialized extent).  A named tuple:
    made once or more per read, it costs half of what a frozen dataclass does."""

    offset: int
    length: int
    physical: int | None


class FileMap:
    """A file's logical-to-physical map: sorted, non-overlapping runs of whole blocks
    (the last one cut at the file's size).

    Runs of adjacent blocks that are also physically adjacent are merged.  Holes and
    uninitialized extents are absent from the runs and read as zeros.  For an inline-data
    file (or a fast symlink) :attr:`inline` holds the bytes and there are no runs.
    """

    __slots__ = ("_ends", "_phys", "_starts", "depth", "inline", "size")

    def __init__(
        self,
        size: int,
        block_size: int,
        runs: list[tuple[int, int, int]] | None = None,
        *,
        inline: bytes | None = None,
        depth: int = 0,
    ) -> None:
        """``runs`` are ``(logical block, blocks, physical block)``; they are kept in bytes,
        clipped to ``size``."""
        self.size = size
        """File size in bytes; :meth:`lookup` clips to it."""
        self.inline = inline
        """The file's bytes when they live in the inode, else None."""
        self.depth = depth
        """Extent tree depth (0 for block maps and inline files)."""
        self._starts = array("q")
        self._ends = array("q")
        self._phys = array("q")
        for lblk, length, pblk in runs or ():
            start = lblk * block_size
            end = min((lblk + length) * block_size, size)
            if end > start:
                self._starts.append(start)
                self._ends.append(end)
                self._phys.append(pblk * block_size)

    def __len__(self) -> int:
        """Number of mapped runs."""
        return len(self._starts)

    def __repr__(self) -> str:
        kind = "inline" if self.inline is not None else f"{len(self)} runs"
        return f"<FileMap size={self.size} {kind}>"

    def runs(self) -> Iterator[Segment]:
        """The mapped runs in order, as byte segments."""
        for start, end, phys in zip(self._starts, self._ends, self._phys, strict=True):
            yield Segment(start, end - start, phys)

    def data_ranges(self) -> list[tuple[int, int]]:
        """``(offset, end)`` byte ranges holding data, adjacent runs merged (SEEK_DATA)."""
        out: list[tuple[int, int]] = []
        if self.inline is not None:
            return [(0, self.size)] if self.size else []
        for seg in self.runs():
            if out and out[-1][1] == seg.offset:
                out[-1] = (out[-1][0], seg.offset + seg.length)
            else:
                out.append((seg.offset, seg.offset + seg.length))
        return out

    def lookup(self, offset: int, length: int) -> list[Segment]:
        """Segments covering ``[offset, offset + length)`` exactly, clipped to the size.

        Runs in O(log n + k) for n runs and k segments returned.  Raises ValueError for a
        negative range or for an inline file (use :attr:`inline` there).
        """
        if offset < 0 or length < 0:
            raise ValueError(f"negative range: offset {offset}, length {length}")
        if self.inline is not None:
            raise ValueError("inline-data file: its bytes are in FileMap.inline")
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        physical = self.physical(offset, end - offset)
        if physical is not None:
            return [Segment(offset, end - offset, physical)]
        return map_range(self._starts, self._ends, self._phys, offset, end, Segment)

    def physical(self, offset: int, length: int) -> int | None:
        """Where bytes ``[offset, offset + length)`` are stored when they lie inside one
        run (the common read or write of a few blocks), else None (:meth:`lookup` then
        says what they are). Makes no list: the filter asks it for every request."""
        end = offset + length
        if offset < 0 or length <= 0 or end > self.size:
            return None
        starts = self._starts
        i = bisect_right(starts, offset) - 1
        if i < 0 or end > self._ends[i]:
            return None
        return self._phys[i] + offset - starts[i]


class Maps:
    """The file maps of a :class:`Volume`'s inodes, built on demand and cached."""

    def __init__(self, volume: Volume) -> None:
        self._vol = volume
        self._maps: LRU[int, FileMap] = LRU(MAP_CACHE_ENTRIES)

    async def get(self, ino: int) -> FileMap:
        """The file's logical-to-physical map (cached).

        For an inline-data file or a fast symlink, :attr:`FileMap.inline` holds the bytes.
        Devices, FIFOs and sockets have an empty map.  Raises :class:`Ext2Unsupported`
        for an encrypted inode and FormatError for a corrupt map.
        """
        fmap = self._maps.get(ino)
        if fmap is None:
            fmap = await self._build(await self._vol.inode(ino))
            self._maps.put(ino, fmap)
        return fmap

    def _is_fast_symlink(self, inode: Inode) -> bool:
        if not inode.is_symlink or inode.flags & (FL_EXTENTS | FL_INLINE_DATA):
            return False
        bs = self._vol.sb.block_size
        ea_blocks = bs // 512 if inode.file_acl else 0
        sectors = inode.blocks * (bs // 512 if inode.flags & FL_HUGE_FILE else 1)
        return inode.size < N_BLOCKS_BYTES and sectors - ea_blocks <= 0

    async def _build(self, inode: Inode) -> FileMap:
        ino, bs, size = inode.ino, self._vol.sb.block_size, inode.size
        if inode.encrypted:
            raise Ext2Unsupported(f"inode {ino} is encrypted (flag encrypt): its data "
                                  f"cannot be read")  # fmt: skip
        if inode.file_type in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            return FileMap(0, bs)
        if inode.inline_data:
            data = inode.i_block + (inode.inline_xattr or b"")
            if size > len(data):
                raise FormatError(f"inode {ino}: inline data holds {len(data)} bytes but "
                                  f"the size is {size}")  # fmt: skip
            return FileMap(size, bs, inline=data[:size])
        if self._is_fast_symlink(inode):
            return FileMap(size, bs, inline=inode.i_block[:size])
        nblocks = -(-size // bs)
        if inode.flags & FL_EXTENTS:
            limit = 1 << 32
            if nblocks > limit:
                raise FormatError(f"inode {ino}: size {size} exceeds the extent-mapped "
                                  f"maximum of {limit * bs} bytes")  # fmt: skip
            runs, depth = await self._extent_runs(inode, nblocks)
        else:
            a = bs // 4
            limit = NDIR_BLOCKS + a + a * a + a * a * a
            if nblocks > limit:
                raise FormatError(f"inode {ino}: size {size} exceeds the block-mapped "
                                  f"maximum of {limit * bs} bytes")  # fmt: skip
            runs, depth = await self._blockmap_runs(inode, nblocks), 0
        return FileMap(size, bs, _merge_runs(ino, runs, nblocks), depth=depth)

    async def _extent_runs(
        self, inode: Inode, nblocks: int
    ) -> tuple[list[tuple[int, int, int]], int]:
        vol = self._vol
        ino, bs = inode.ino, vol.sb.block_size
        runs: list[tuple[int, int, int]] = []
        used = 0  # blocks mapped by initialized extents
        root_where = f"inode {ino}: extent tree root in i_block"
        magic, _entries, _max, root_depth, _gen = _EXTENT_HDR.unpack_from(inode.i_block, 0)
        if root_depth > MAX_EXTENT_DEPTH:
            raise FormatError(f"{root_where}: depth {root_depth} exceeds the maximum "
                              f"{MAX_EXTENT_DEPTH}")  # fmt: skip
        # One level at a time: (node bytes, where, expected depth, logical lo, hi)
        level: list[tuple[bytes, str, int, int, int]] = [
            (inode.i_block, root_where, root_depth, 0, 1 << 32)
        ]
        while level:
            children: list[tuple[int, int, int, int]] = []  # (pblk, depth, lo, hi)
            for node, where, depth, lo, hi in level:
                is_root = node is inode.i_block
                capacity = (len(node) - 12) // 12
                magic, entries, emax, ndepth, _gen = _EXTENT_HDR.unpack_from(node, 0)
                if magic != EXTENT_MAGIC:
                    raise FormatError(f"{where}: bad extent header magic {magic:#06x} "
                                      f"(expected {EXTENT_MAGIC:#06x})")  # fmt: skip
                if ndepth != depth:
                    raise FormatError(f"{where}: extent node depth {ndepth}, expected {depth}")
                if emax > capacity or entries > emax:
                    raise FormatError(f"{where}: extent header has {entries} entries, max "
                                      f"{emax} (room for {capacity})")  # fmt: skip
                if vol.sb.metadata_csum and not is_root:
                    tail = 12 + 12 * emax
                    if tail + 4 > bs:
                        raise FormatError(f"{where}: no room for the extent block checksum")
                    stored = u32(node, tail)
                    computed = ext4_crc32c(inode.csum_seed, node[:tail])
                    if stored != computed:
                        raise Ext2ChecksumError(
                            f"{where}: extent block checksum mismatch (stored "
                            f"{stored:#010x}, computed {computed:#010x})"
                        )
                prev_end = lo
                for e in range(entries):
                    pos = 12 + 12 * e
                    if depth == 0:
                        lblk, elen, start_hi, start_lo = _EXTENT.unpack_from(node, pos)
                        uninit = elen > EXT_INIT_MAX_LEN
                        length = elen - EXT_INIT_MAX_LEN if uninit else elen
                        pblk = start_lo | (start_hi << 32)
                        if length == 0 or lblk < prev_end or lblk + length > hi:
                            raise FormatError(
                                f"{where}: extent {e} (logical block {lblk}, length {length}) "
                                f"is empty, unsorted or outside its index range {lo}..{hi}"
                            )
                        vol.check_block(pblk, length, f"{where}: extent {e}")
                        prev_end = lblk + length
                        if not uninit and lblk < nblocks:
                            runs.append((lblk, length, pblk))
                            used += length
                            vol.check_used(used, f"{where}: extent {e}")
                    else:
                        lblk, leaf_lo, leaf_hi, _unused = _EXTENT_IDX.unpack_from(node, pos)
                        if lblk < prev_end or lblk >= hi:
                            raise FormatError(
                                f"{where}: extent index {e} (logical block {lblk}) is "
                                f"unsorted or outside {lo}..{hi}"
                            )
                        lblk_lo = lo if e == 0 else lblk  # the first child covers from lo
                        next_lblk = u32(node, pos + 12) if e + 1 < entries else hi
                        children.append((leaf_lo | (leaf_hi << 32), depth - 1, lblk_lo, next_lblk))
                        prev_end = lblk + 1
                if depth and entries == 0 and not is_root:
                    raise FormatError(f"{where}: empty extent index node")
            wanted = [c for c in children if c[2] < nblocks]
            if not wanted:  # a leaf root: the common case, no read
                break
            blocks = await vol.read_block_set(
                [c[0] for c in wanted], f"inode {ino}: extent tree blocks"
            )
            level = [
                (blocks[pblk], f"inode {ino}: extent block {pblk} (depth {d})", d, clo, chi)
                for pblk, d, clo, chi in wanted
            ]
        return runs, root_depth

    async def _blockmap_runs(self, inode: Inode, nblocks: int) -> list[tuple[int, int, int]]:
        vol = self._vol
        ino, bs = inode.ino, vol.sb.block_size
        a = bs // 4
        ptrs = struct.unpack("<15I", inode.i_block)
        runs: list[tuple[int, int, int]] = []
        for i in range(min(NDIR_BLOCKS, nblocks)):
            if ptrs[i]:
                vol.check_block(ptrs[i], 1, f"inode {ino}: direct block {i}")
                runs.append((i, 1, ptrs[i]))
        # (pointer block, level, first logical block it covers)
        pending: list[tuple[int, int, int]] = []
        base = NDIR_BLOCKS
        for level, ptr in ((1, ptrs[12]), (2, ptrs[13]), (3, ptrs[14])):
            if ptr and base < nblocks:
                pending.append((ptr, level, base))
            base += a**level
        used = len(runs) + len(pending)  # data and indirect blocks of the file
        fmt = struct.Struct(f"<{a}I")
        while pending:
            what = f"inode {ino}: indirect blocks"
            for ptr, level, base in pending:
                vol.check_block(ptr, 1, f"inode {ino}: level-{level} indirect block "
                                        f"for logical block {base}")  # fmt: skip
            blocks = await vol.read_block_set([p[0] for p in pending], what)
            nxt: list[tuple[int, int, int]] = []
            for ptr, level, base in pending:
                vals = fmt.unpack(blocks[ptr])
                if level == 1:
                    used += self._add_leaf_pointers(ino, ptr, vals, base, nblocks, runs)
                else:
                    queued = len(nxt)
                    span = a ** (level - 1)
                    for i, v in enumerate(vals):
                        lb = base + i * span
                        if lb >= nblocks:
                            break
                        if v:
                            nxt.append((v, level - 1, lb))
                    used += len(nxt) - queued
                vol.check_used(used, f"inode {ino}: indirect block {ptr}")
            pending = nxt
        return runs

    def _add_leaf_pointers(
        self, ino: int, ptr: int, vals: tuple[int, ...], base: int, nblocks: int,
        runs: list[tuple[int, int, int]],
    ) -> int:  # fmt: skip
        """Add the data blocks of a level-1 indirect block to ``runs``; return their number."""
        vol = self._vol
        n = min(len(vals), nblocks - base)
        v0 = vals[0]
        if (
            v0
            and vals[n - 1] == v0 + n - 1
            and array("I", vals[:n]) == array("I", range(v0, v0 + n))
        ):
            vol.check_block(v0, n, f"inode {ino}: indirect block {ptr} entries")
            runs.append((base, n, v0))
            return n
        first, count = vol.sb.first_data_block, vol.sb.blocks_count
        for i in range(n):
            v = vals[i]
            if v:
                if not first <= v < count:
                    vol.check_block(v, 1, f"inode {ino}: indirect block {ptr} entry {i}")
                if (
                    runs
                    and runs[-1][0] + runs[-1][1] == base + i
                    and (runs[-1][2] + runs[-1][1] == v)
                ):
                    last = runs[-1]
                    runs[-1] = (last[0], last[1] + 1, last[2])
                else:
                    runs.append((base + i, 1, v))
        return n - vals[:n].count(0)


def _merge_runs(
    ino: int, runs: list[tuple[int, int, int]], nblocks: int
) -> list[tuple[int, int, int]]:
    """Sort ``runs``, refuse overlaps, drop what lies past the end of file and merge
    runs adjacent both logically and physically."""
    runs.sort()
    out: list[tuple[int, int, int]] = []
    for lblk, length, pblk in runs:
        if out:
            plblk, plen, _ = out[-1]
            if lblk < plblk + plen:
                raise FormatError(f"inode {ino}: logical block {lblk} is mapped twice "
                                  f"(overlapping extents or block map entries)")  # fmt: skip
        if lblk >= nblocks:
            continue  # preallocated beyond the end of file
        length = min(length, nblocks - lblk)
        if out and out[-1][0] + out[-1][1] == lblk and out[-1][2] + out[-1][1] == pblk:
            out[-1] = (out[-1][0], out[-1][1] + length, out[-1][2])
        else:
            out.append((lblk, length, pblk))
    return out
