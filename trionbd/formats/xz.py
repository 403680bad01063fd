"""Random access to the decompressed bytes of an xz file, block by block.

An xz file is one or more streams (``cat a.xz b.xz`` is valid, with zero padding
between them), each ending in an index that lists its blocks' compressed and
uncompressed sizes. :func:`read_xz_index` reads the stream footers and indexes from the
end of the file, so it knows where every block starts in both the file and the output
without decompressing anything. :class:`XzReader` serves a read by decompressing the
block(s) it falls in, keeping the last few in an LRU cache (nbdkit's xz filter's
``xz-max-depth``) and refusing blocks larger than a limit (``xz-max-block``).

Files written by ``xz -T0`` (or ``xz --block-size``) have many blocks and random reads
cost one block each; ``xz`` without threads writes one block for the whole file, so
every cache miss decompresses from the start (:attr:`XzIndex.largest_block` tells).

A block is decompressed with Python's :mod:`lzma` by wrapping it, as it is on disk
(header, data, padding, check), in a stream of its own: a stream header with the
file's flags, then an index and footer for that one block. liblzma then parses the
block header's filter chain (LZMA2, BCJ, delta, ...) and verifies the block's check
(CRC-32, CRC-64 or SHA-256) itself.

Every problem is a :class:`~trionbd.formats.FormatError` naming the byte offset.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

from . import FormatError, Offload, Pread, read_exactly, run_inline
from .blocks import BlockCache, LockFactory

HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
_STREAM_EDGE = 12  # stream header and footer sizes
_CHECK_SIZES = {0: 0, 1: 4, 4: 8, 10: 32}
"""Check types xz writes (none, CRC-32, CRC-64, SHA-256) and their sizes in bytes."""
MAX_INDEX = 64 << 20
"""Largest stream index read (16 bytes per block at most: millions of blocks)."""

DEFAULT_MAX_BLOCK = 512 << 20
"""Largest block decompressed (nbdkit's ``xz-max-block`` default)."""
DEFAULT_MAX_DEPTH = 8
"""Blocks kept decompressed (nbdkit's ``xz-max-depth`` default)."""


@dataclass(frozen=True, slots=True)
class XzBlock:
    """One block: on disk at ``offset`` (``unpadded`` bytes: header, data and check),
    ``size`` bytes of output from output offset ``out``; ``flags`` are its stream's."""

    offset: int
    unpadded: int
    out: int
    size: int
    flags: bytes


@dataclass(frozen=True, slots=True)
class XzIndex:
    """Every block of every stream of an xz file, in order; ``size`` is the output size."""

    blocks: tuple[XzBlock, ...]
    size: int
    streams: int

    @property
    def largest_block(self) -> int:
        """The largest block's output size: what one cache miss may decompress."""
        return max((b.size for b in self.blocks), default=0)


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    value = 0
    for i in range(9):
        if pos + i >= len(buf):
            raise FormatError(f"{where}: truncated number")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i:
                raise FormatError(f"{where}: number with a needless zero byte")
            return value, pos + i + 1
    raise FormatError(f"{where}: number longer than 9 bytes")


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _pad4(n: int) -> int:
    return -n % 4


async def _read_stream(pread: Pread, end: int) -> tuple[int, bytes, list[tuple[int, int]]]:
    """The stream ending at ``end``: (its start, its flags, its (unpadded, size) records)."""
    where = f"xz: stream footer at offset {end - _STREAM_EDGE}"
    footer = await read_exactly(pread, end - _STREAM_EDGE, _STREAM_EDGE, where)
    crc, backward, flags, magic = struct.unpack("<II2s2s", footer)
    if magic != FOOTER_MAGIC:
        raise FormatError(f"{where}: bad magic {magic.hex()} (expected 595a): not xz, or "
                          "truncated")  # fmt: skip
    if zlib.crc32(footer[4:10]) != crc:
        raise FormatError(f"{where}: CRC-32 mismatch")
    if flags[0] or flags[1] not in _CHECK_SIZES:
        raise FormatError(f"{where}: unsupported stream flags {flags.hex()}")
    index_size = (backward + 1) * 4
    index_start = end - _STREAM_EDGE - index_size
    where = f"xz: index at offset {index_start}"
    if index_size > MAX_INDEX or index_start < _STREAM_EDGE:
        raise FormatError(f"{where}: {index_size} bytes does not fit in the file")
    index = await read_exactly(pread, index_start, index_size, where)
    if index[0] != 0:
        raise FormatError(f"{where}: bad index indicator {index[0]:#04x}")
    if zlib.crc32(index[:-4]) != int.from_bytes(index[-4:], "little"):
        raise FormatError(f"{where}: CRC-32 mismatch")
    count, pos = _varint(index, 1, where)
    records = []
    blocks_size = 0
    for i in range(count):
        unpadded, pos = _varint(index, pos, f"{where}, record {i}")
        size, pos = _varint(index, pos, f"{where}, record {i}")
        if unpadded < 5 + _CHECK_SIZES[flags[1]]:
            raise FormatError(f"{where}, record {i}: block of {unpadded} bytes is too small")
        records.append((unpadded, size))
        blocks_size += unpadded + _pad4(unpadded)
    if pos + _pad4(pos) != index_size - 4 or any(index[pos : index_size - 4]):
        raise FormatError(f"{where}: {count} records do not fill the index of {index_size} "
                          "bytes (or its padding is not zero)")  # fmt: skip
    start = index_start - blocks_size - _STREAM_EDGE
    where = f"xz: stream header at offset {start}"
    if start < 0:
        raise FormatError(f"xz: index at offset {index_start}: its blocks ({blocks_size} "
                          "bytes) do not fit before it")  # fmt: skip
    header = await read_exactly(pread, start, _STREAM_EDGE, where)
    if header[:6] != HEADER_MAGIC:
        raise FormatError(f"{where}: bad magic {header[:6].hex()} (expected fd377a585a00)")
    if zlib.crc32(header[6:8]) != int.from_bytes(header[8:12], "little"):
        raise FormatError(f"{where}: CRC-32 mismatch")
    if header[6:8] != flags:
        raise FormatError(f"{where}: flags {header[6:8].hex()} differ from the footer's "
                          f"{flags.hex()}")  # fmt: skip
    return start, flags, records


async def read_xz_index(pread: Pread, size: int) -> XzIndex:
    """Read the streams and block lists of the xz file of ``size`` bytes behind ``pread``,
    from its end; nothing is decompressed."""
    if size % 4:
        raise FormatError(f"xz: {size} bytes is not a multiple of 4: not xz, or truncated")
    streams: list[tuple[int, bytes, list[tuple[int, int]]]] = []
    end = size
    while end > 0:
        # Stream padding: zero words between and after streams.
        pos = end
        while pos >= 4:
            word = await read_exactly(pread, pos - 4, 4, "xz: stream padding")
            if word != b"\0\0\0\0":
                break
            pos -= 4
        if pos == 0:
            break
        if pos < 2 * _STREAM_EDGE:
            raise FormatError(f"xz: {pos} bytes before offset {end} are too few for a stream")
        start, flags, records = await _read_stream(pread, pos)
        streams.append((start, flags, records))
        end = start
    if not streams:
        raise FormatError("xz: no stream in the file: not xz")
    blocks = []
    out = 0
    for start, flags, records in reversed(streams):
        offset = start + _STREAM_EDGE
        for unpadded, block_size in records:
            blocks.append(XzBlock(offset, unpadded, out, block_size, flags))
            offset += unpadded + _pad4(unpadded)
            out += block_size
    return XzIndex(tuple(blocks), out, len(streams))


def _decompress_block(block: XzBlock, raw: bytes) -> bytes:
    """Decompress ``raw`` (the block as on disk, padding included) by wrapping it in a
    one-block stream."""
    flags = block.flags
    header = HEADER_MAGIC + flags + zlib.crc32(flags).to_bytes(4, "little")
    index = b"\0" + _uvarint(1) + _uvarint(block.unpadded) + _uvarint(block.size)
    index += bytes(_pad4(len(index)))
    index += zlib.crc32(index).to_bytes(4, "little")
    backward = (len(index) // 4 - 1).to_bytes(4, "little")
    footer = backward + flags
    footer = zlib.crc32(footer).to_bytes(4, "little") + footer + FOOTER_MAGIC
    try:
        data = lzma.decompress(header + raw + index + footer, format=lzma.FORMAT_XZ)
    except lzma.LZMAError as e:
        raise FormatError(f"xz: block at offset {block.offset}: {e}") from None
    if len(data) != block.size:
        raise FormatError(f"xz: block at offset {block.offset}: {len(data)} bytes, but the "
                          f"index says {block.size}")  # fmt: skip
    return data


class XzReader:
    """Reads any byte range of an indexed xz file, decompressing whole blocks and
    keeping the ``max_depth`` most recently used."""

    def __init__(
        self,
        pread: Pread,
        index: XzIndex,
        *,
        max_block: int = DEFAULT_MAX_BLOCK,
        max_depth: int = DEFAULT_MAX_DEPTH,
        offload: Offload | None = None,
        lock: LockFactory = nullcontext,
    ) -> None:
        """Raises FormatError if a block is larger than ``max_block``. ``lock``: see
        :class:`~trionbd.formats.blocks.BlockCache`."""
        for block in index.blocks:
            if block.size > max_block:
                raise FormatError(
                    f"xz: block at offset {block.offset} holds {block.size} bytes, more "
                    f"than the limit of {max_block} (xz-max-block)"
                )
        self.index = index
        self._pread = pread
        self._run = offload or run_inline
        blocks = index.blocks
        self.starts = [b.out for b in blocks]
        """Where each block starts in the output (:meth:`load` decompresses one)."""
        self.sizes = [b.size for b in blocks]
        self._cache = BlockCache(self.starts, self.sizes, self.load, max_depth, lock=lock)

    async def load(self, i: int) -> bytes:
        """Block ``i`` decompressed."""
        block = self.index.blocks[i]
        raw = await read_exactly(
            self._pread, block.offset, block.unpadded + _pad4(block.unpadded),
            f"xz: block at offset {block.offset}",
        )  # fmt: skip
        return await self._run(partial(_decompress_block, block, raw))

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the decompressed data, clipped to its size."""
        return await self._cache.read(offset, length)
