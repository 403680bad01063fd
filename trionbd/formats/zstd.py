"""Zstandard: random access through the seekable format's seek table, or one pass.

The seekable format (zstd's ``contrib/seekable_format``; written by pyzstd's
``SeekableZstdFile``, t2sz and zstd's contrib tool, not by the ``zstd`` command of
Debian's 1.5.4) is a series of independent frames followed by a skippable frame holding
a seek table: each frame's compressed and decompressed size. :func:`read_zstd_index`
reads that table; :class:`ZstdReader` decompresses the frame(s) a read falls in and
keeps the most recent ones (as the xz reader keeps blocks).

A file without a seek table (what ``zstd`` writes: usually one frame for the whole file)
has no random access: :func:`read_zstd_index` returns None for it and
:func:`decompress_all` decompresses it once, front to back, for the caller to keep (the
zstd filter writes it to an unlinked temporary file).

Frames are decompressed with pyzstd, which verifies each frame's content checksum when
it has one (the zstd command writes one; pyzstd only when asked): a damaged frame
without one can decompress to wrong bytes, which nothing can detect. The seek table's
optional per-frame checksums (XXH64) are not checked.
Every problem is a :class:`~trionbd.formats.FormatError` naming the byte offset.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import pyzstd

from . import FormatError, Offload, Pread, read_exactly, run_inline
from .blocks import BlockCache, LockFactory

FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
_FOOTER = struct.Struct("<IBI")  # number of frames, descriptor, seekable magic
MAX_SEEK_TABLE = 64 << 20
"""Largest seek table read (12 bytes per frame at most: millions of frames)."""
DEFAULT_MAX_FRAME = 512 << 20
"""Largest frame decompressed for a read."""
DEFAULT_MAX_DEPTH = 8
"""Frames kept decompressed."""
CHUNK = 1 << 20
"""Input read, and output made, at a time by :func:`decompress_all`."""


@dataclass(frozen=True, slots=True)
class ZstdFrame:
    """One frame: ``compressed`` bytes at input ``offset``, ``size`` bytes of output
    from output offset ``out``."""

    offset: int
    compressed: int
    out: int
    size: int


@dataclass(frozen=True, slots=True)
class ZstdIndex:
    """The frames of a seekable zstd file; ``size`` is the decompressed size."""

    frames: tuple[ZstdFrame, ...]
    size: int


async def read_zstd_index(pread: Pread, size: int) -> ZstdIndex | None:
    """The seek table of the zstd file of ``size`` bytes behind ``pread``, or None when
    it is a zstd file without one. FormatError when it is not zstd at all, or the seek
    table is damaged or does not match the frames."""
    if size < 4:
        raise FormatError(f"zstd: {size} bytes is too small for a zstd file")
    magic = await read_exactly(pread, 0, 4, "zstd: first frame header")
    if magic != FRAME_MAGIC and not SKIPPABLE_MAGIC <= int.from_bytes(magic, "little") <= (
        SKIPPABLE_MAGIC | 0xF
    ):
        raise FormatError(f"zstd: bad magic {magic.hex()} at offset 0: not a zstd file")
    if size < _FOOTER.size + 8:
        return None
    where = f"zstd: seek table footer at offset {size - _FOOTER.size}"
    footer = await read_exactly(pread, size - _FOOTER.size, _FOOTER.size, where)
    count, descriptor, seekable = _FOOTER.unpack(footer)
    if seekable != SEEKABLE_MAGIC:
        return None
    if descriptor & 0x7C:
        raise FormatError(f"{where}: reserved descriptor bits set ({descriptor:#04x})")
    entry = 12 if descriptor & 0x80 else 8
    table_size = 8 + count * entry + _FOOTER.size
    start = size - table_size
    where = f"zstd: seek table at offset {start}"
    if table_size > MAX_SEEK_TABLE or start < 0:
        raise FormatError(f"{where}: {count} frames do not fit in the file")
    table = await read_exactly(pread, start, table_size - _FOOTER.size, where)
    frame_magic, frame_size = struct.unpack_from("<II", table)
    if frame_magic != SKIPPABLE_MAGIC or frame_size != table_size - 8:
        raise FormatError(f"{where}: not a skippable frame of {table_size - 8} bytes "
                          f"(magic {frame_magic:#010x}, size {frame_size})")  # fmt: skip
    frames = []
    offset = out = 0
    for i in range(count):
        compressed, decompressed = struct.unpack_from("<II", table, 8 + i * entry)
        frames.append(ZstdFrame(offset, compressed, out, decompressed))
        offset += compressed
        out += decompressed
    if offset != start:
        raise FormatError(f"{where}: its {count} frames hold {offset} bytes, but the table "
                          f"starts at offset {start}")  # fmt: skip
    return ZstdIndex(tuple(frames), out)


def _decompress_frame(frame: ZstdFrame, raw: bytes) -> bytes:
    try:
        data = pyzstd.decompress(raw)
    except pyzstd.ZstdError as e:
        raise FormatError(f"zstd: frame at offset {frame.offset}: {e}") from None
    if len(data) != frame.size:
        raise FormatError(f"zstd: frame at offset {frame.offset}: {len(data)} bytes, but "
                          f"the seek table says {frame.size}")  # fmt: skip
    return data


class ZstdReader:
    """Reads any byte range of a seekable zstd file, a frame at a time."""

    def __init__(
        self,
        pread: Pread,
        index: ZstdIndex,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_depth: int = DEFAULT_MAX_DEPTH,
        offload: Offload | None = None,
        lock: LockFactory = nullcontext,
    ) -> None:
        """Raises FormatError if a frame is larger than ``max_frame``. ``lock``: see
        :class:`~trionbd.formats.blocks.BlockCache`."""
        for frame in index.frames:
            if frame.size > max_frame:
                raise FormatError(f"zstd: frame at offset {frame.offset} holds {frame.size} "
                                  f"bytes, more than the limit of {max_frame}")  # fmt: skip
        self.index = index
        self._pread = pread
        self._run = offload or run_inline
        frames = index.frames
        self.starts = [f.out for f in frames]
        """Where each frame starts in the output (:meth:`load` decompresses one)."""
        self.sizes = [f.size for f in frames]
        self._cache = BlockCache(self.starts, self.sizes, self.load, max_depth, lock=lock)

    async def load(self, i: int) -> bytes:
        """Frame ``i`` decompressed."""
        frame = self.index.frames[i]
        what = f"zstd: frame at offset {frame.offset}"
        raw = await read_exactly(self._pread, frame.offset, frame.compressed, what)
        return await self._run(partial(_decompress_frame, frame, raw))

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the decompressed data, clipped to its size."""
        return await self._cache.read(offset, length)


async def decompress_all(
    pread: Pread,
    size: int,
    write: Callable[[bytes], object],
    *,
    progress: Callable[[int], None] | None = None,
    offload: Offload | None = None,
) -> int:
    """Decompress every frame of the zstd file behind ``pread``, front to back, passing
    the output to ``write`` in pieces of at most :data:`CHUNK` bytes; return the total.
    A file that ends inside a frame is truncated: FormatError."""
    run = offload or run_inline
    decompressor = pyzstd.EndlessZstdDecompressor()
    total = 0

    def feed(chunk: bytes, offset: int) -> int:
        made = 0
        data = chunk
        while True:
            try:
                out = decompressor.decompress(data, CHUNK)
            except pyzstd.ZstdError as e:
                raise FormatError(f"zstd: corrupt data at or before offset {offset}: {e}") from None
            data = b""
            if out:
                write(out)
                made += len(out)
            if decompressor.needs_input:
                return made

    offset = 0
    while offset < size:
        n = min(CHUNK, size - offset)
        chunk = await read_exactly(pread, offset, n, "zstd data")
        offset += n
        total += await run(partial(feed, chunk, offset))
        if progress is not None:
            progress(offset)
    if not decompressor.at_frame_edge:
        raise FormatError(f"zstd: truncated: the file ends at offset {size} inside a frame")
    return total
