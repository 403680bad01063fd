"""Random access into a raw deflate stream (RFC 1951), as gzip members and zip members
hold them.

:func:`index_deflate` inflates a stream once, from its first byte to its end, computing
its size and CRC-32 and recording a :class:`Checkpoint` about every ``interval`` bytes
of output. :class:`DeflateReader` then serves any byte range by inflating the
*interval(s)* it falls in (the output between two checkpoints), each resumed at its
checkpoint, and keeps the last few: a small read inflates one interval, a sequential
reader inflates every byte once, and reads of different intervals can run at once.

How a checkpoint resumes: deflate blocks do not end on byte boundaries, and a decoder
in the middle of a block holds Huffman tables that no byte offset can restore. So, as
zlib's ``examples/zran.c`` does, checkpoints are taken only where a block has just
ended (``inflate(Z_BLOCK)`` stops there), and a checkpoint stores the input offset, the
bits of the last input byte not yet consumed, and the 32 KiB of output before it (the
window back-references may reach into). Resuming is ``inflatePrime`` with those bits
and ``inflateSetDictionary`` with the window. Python's :mod:`zlib` has neither call, so
this module calls the system's zlib (``libz.so.1``, the library Python's own module
uses) through :mod:`ctypes`; that is also what makes a checkpoint plain data, which the
gzip reader saves in its index file.

A checkpoint also records the CRC-32 of its interval's output, checked whenever the
interval is inflated: input that changed after it was indexed (or decayed on disk)
gives a FormatError, never wrong bytes.

Memory: a checkpoint keeps its window deflated (level 1): at most 32 KiB, a few KiB for
compressible data. With the default interval of 1 MiB that is at most 3 % of the
stream's size, and reaching any offset costs one interval of inflating (1 MiB plus at
most one deflate block: a few milliseconds). A reader keeps ``depth`` intervals
inflated (8 by default: about 8 MiB).

CPU: inflating is synchronous work. Every function here that inflates takes an optional
``offload``, an async callable that runs a synchronous function and returns its result
(a filter passes ``trio.to_thread.run_sync``); without one the work runs inline. ctypes
releases the GIL while zlib runs.

Every problem is a :class:`~trionbd.formats.FormatError` naming the byte offset of the
input where it was found.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import weakref
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from typing import NamedTuple

from . import FormatError, Offload, Pread, read_exactly, run_inline
from .blocks import BlockCache, LockFactory

DEFAULT_INTERVAL = 1 << 20
"""Output bytes between checkpoints: a read inflates at most this much before its data."""

WINDOW_SIZE = 32 << 10
"""The deflate window: how far back a match may reach."""

READ_CHUNK = 256 << 10
"""Compressed bytes asked of ``pread`` at a time."""

OUT_CHUNK = 256 << 10
"""Largest output of one ``inflate`` call."""

DEFAULT_DEPTH = 8
"""Intervals a reader keeps inflated (about 1 MiB each with the default interval)."""

# --------------------------------------------------------------------------------------
# zlib through ctypes: just what inflating with checkpoints needs

_Z_OK, _Z_STREAM_END, _Z_NEED_DICT, _Z_BUF_ERROR = 0, 1, 2, -5
_Z_NO_FLUSH, _Z_BLOCK = 0, 5
_AT_BLOCK_END, _IN_LAST_BLOCK = 128, 64


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


_libz = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
_libz.zlibVersion.restype = ctypes.c_char_p
_ZLIB_VERSION: bytes = _libz.zlibVersion()
_P = ctypes.POINTER(_ZStream)
_libz.inflateInit2_.argtypes = [_P, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libz.inflate.argtypes = [_P, ctypes.c_int]
_libz.inflateEnd.argtypes = [_P]
_libz.inflatePrime.argtypes = [_P, ctypes.c_int, ctypes.c_int]
_libz.inflateSetDictionary.argtypes = [_P, ctypes.c_char_p, ctypes.c_uint]
_libz.crc32_combine64.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int64]
_libz.crc32_combine64.restype = ctypes.c_ulong


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A + B from A's CRC ``crc1``, and B's CRC ``crc2`` and length."""
    return int(_libz.crc32_combine64(crc1, crc2, length2))


class _ZlibError(Exception):
    """zlib found the stream corrupt after consuming ``used`` input bytes."""

    def __init__(self, message: str, used: int) -> None:
        super().__init__(message)
        self.used = used


class _Inflater:
    """One raw-deflate decoder (``inflateInit2(-15)``); freed when garbage collected."""

    def __init__(self) -> None:
        self._strm = _ZStream()
        self._out = ctypes.create_string_buffer(OUT_CHUNK)
        rc = _libz.inflateInit2_(
            ctypes.byref(self._strm), -15, _ZLIB_VERSION, ctypes.sizeof(_ZStream)
        )
        if rc != _Z_OK:
            raise MemoryError(f"zlib inflateInit2 failed ({rc})")
        weakref.finalize(self, _libz.inflateEnd, ctypes.byref(self._strm))

    def resume(self, bits: int, value: int, window: bytes) -> None:
        """Continue a stream at a checkpoint: ``bits`` pending bits of ``value``, then
        ``window`` as the history."""
        if bits:
            _libz.inflatePrime(ctypes.byref(self._strm), bits, value)
        if window:
            _libz.inflateSetDictionary(ctypes.byref(self._strm), window, len(window))

    def inflate(self, data: bytes, pos: int, max_out: int, block: bool) -> tuple[int, bytes, int]:
        """Inflate ``data[pos:]`` into at most ``max_out`` (<= OUT_CHUNK) bytes; stop at a
        block end when ``block``. Returns (input bytes consumed, output, zlib status);
        a corrupt stream raises _ZlibError with zlib's message."""
        strm = self._strm
        avail = len(data) - pos
        base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        strm.next_in = base + pos
        strm.avail_in = avail
        strm.next_out = ctypes.addressof(self._out)
        strm.avail_out = max_out
        rc = _libz.inflate(ctypes.byref(strm), _Z_BLOCK if block else _Z_NO_FLUSH)
        produced = max_out - strm.avail_out
        if rc not in (_Z_OK, _Z_STREAM_END, _Z_BUF_ERROR):
            why = strm.msg.decode("ascii", "replace") if strm.msg else f"zlib error {rc}"
            if rc == _Z_NEED_DICT:
                why = "needs a preset dictionary"
            raise _ZlibError(why, avail - strm.avail_in)
        return avail - strm.avail_in, self._out.raw[:produced], rc

    @property
    def data_type(self) -> int:
        return int(self._strm.data_type)


# --------------------------------------------------------------------------------------
# The index


class Checkpoint(NamedTuple):
    """Where inflating can resume: output offset ``out`` starts at input byte ``inp``,
    after ``bits`` pending bits of the byte before it (``value``: those bits, low-aligned);
    ``window`` is the deflated (zlib, level 1) output before ``out``, up to 32 KiB."""

    out: int
    inp: int
    bits: int
    value: int
    window: bytes
    crc: int = 0
    """The CRC-32 of the output from here to the next checkpoint (or the end): a read
    checks it, so input that changed after indexing gives an error, not wrong bytes."""


@dataclass(frozen=True, slots=True)
class DeflateStream:
    """An indexed deflate stream: input bytes ``[start, end)``, ``size`` bytes of output
    whose CRC-32 is ``crc``, and checkpoints sorted by output offset (the first at 0)."""

    start: int
    end: int
    size: int
    crc: int
    checkpoints: tuple[Checkpoint, ...]

    _HEAD = struct.Struct("<QQQII")
    _POINT = struct.Struct("<QQBBII")

    def to_bytes(self) -> bytes:
        """A compact serialization, read back by :meth:`from_bytes`."""
        parts = [self._HEAD.pack(self.start, self.end, self.size, self.crc, len(self.checkpoints))]
        for cp in self.checkpoints:
            parts.append(
                self._POINT.pack(cp.out, cp.inp, cp.bits, cp.value, cp.crc, len(cp.window))
            )
            parts.append(cp.window)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, buf: bytes | memoryview, pos: int = 0) -> tuple[DeflateStream, int]:
        """The stream serialized at ``buf[pos:]`` and the offset after it; FormatError if
        the bytes are inconsistent."""
        try:
            start, end, size, crc, count = cls._HEAD.unpack_from(buf, pos)
            pos += cls._HEAD.size
            points = []
            for _ in range(count):
                out, inp, bits, value, crc_k, wlen = cls._POINT.unpack_from(buf, pos)
                pos += cls._POINT.size
                window = bytes(buf[pos : pos + wlen])
                if len(window) != wlen:
                    raise struct.error("window runs past the end")
                pos += wlen
                points.append(Checkpoint(out, inp, bits, value, window, crc_k))
        except struct.error as e:
            raise FormatError(f"truncated deflate index record ({e})") from None
        ok = (
            points
            and points[0].out == 0
            and points[0].inp == start
            and all(a.out < b.out and a.inp <= b.inp for a, b in pairwise(points))
            and all(p.out <= size and start <= p.inp <= end and p.bits < 8 for p in points)
        )
        if not ok:
            raise FormatError("inconsistent deflate index record")
        return cls(start, end, size, crc, tuple(points)), pos


Output = Callable[[int, bytes], object]
"""``output(offset, data)``: ``data`` inflated at output offset ``offset``."""


class _Scan:
    """The synchronous half of :func:`index_deflate`: fed the input, chunk by chunk."""

    def __init__(self, start: int, interval: int, what: str, output: Output | None) -> None:
        self.inflater = _Inflater()
        self.output = output
        self.what = what
        self.interval = interval
        self.inp = start
        self.out = 0
        self.crc = 0
        self.interval_crc = 0  # of the output since the last checkpoint
        self.done = False
        self.tail = bytearray()  # the last WINDOW_SIZE bytes of output
        self.last_byte = 0
        self.points = [Checkpoint(0, start, 0, 0, b"")]

    def feed(self, chunk: bytes) -> int:
        """Inflate as much of ``chunk`` as belongs to the stream; return how much did."""
        pos = 0
        inflater = self.inflater
        while not self.done:
            try:
                used, out, rc = inflater.inflate(chunk, pos, OUT_CHUNK, True)
            except _ZlibError as e:
                raise FormatError(
                    f"{self.what}: corrupt deflate data at offset {self.inp + e.used}: {e}"
                ) from None
            if used:
                self.last_byte = chunk[pos + used - 1]
            pos += used
            self.inp += used
            if out:
                if self.output is not None:
                    self.output(self.out, out)
                self.interval_crc = zlib.crc32(out, self.interval_crc)
                self.out += len(out)
                self.tail += out
                del self.tail[:-WINDOW_SIZE]
            if rc == _Z_STREAM_END:
                self.done = True
            elif not used and not out:
                break  # needs more input
            dt = inflater.data_type
            if (
                dt & _AT_BLOCK_END
                and not dt & _IN_LAST_BLOCK
                and self.out - self.points[-1].out >= self.interval
            ):
                bits = dt & 7
                value = self.last_byte >> (8 - bits) if bits else 0
                window = zlib.compress(bytes(self.tail), 1)
                self.end_interval()
                self.points.append(Checkpoint(self.out, self.inp, bits, value, window))
        return pos

    def end_interval(self) -> None:
        """Record the CRC-32 of the interval of the last checkpoint, which ends here."""
        last = self.points[-1]
        self.points[-1] = last._replace(crc=self.interval_crc)
        self.crc = crc32_combine(self.crc, self.interval_crc, self.out - last.out)
        self.interval_crc = 0


async def index_deflate(
    pread: Pread,
    start: int,
    end: int,
    *,
    interval: int = DEFAULT_INTERVAL,
    progress: Callable[[int], None] | None = None,
    offload: Offload | None = None,
    what: str = "deflate stream",
    output: Output | None = None,
) -> DeflateStream:
    """Inflate the raw deflate stream at input offset ``start`` to its end, which must
    come before ``end``; return its index. ``progress(offset)`` is called after each
    chunk of input with the input offset reached; ``output`` (if given) gets all the
    output as it is made, in the ``offload``. ``what`` names the stream in errors.
    A stream that does not end before ``end`` is truncated: a FormatError."""
    if interval <= 0:
        raise ValueError(f"checkpoint interval must be positive, not {interval}")
    run = offload or run_inline
    scan = _Scan(start, interval, what, output)
    pos = start
    while not scan.done:
        if pos >= end:
            raise FormatError(
                f"{what}: truncated: the deflate data starting at offset {start} has not "
                f"ended at offset {end}, where the input ends"
            )
        chunk = await read_exactly(pread, pos, min(READ_CHUNK, end - pos), what)
        used = await run(partial(scan.feed, chunk))
        pos += used
        if progress is not None:
            progress(pos)
    scan.end_interval()
    return DeflateStream(start, scan.inp, scan.out, scan.crc, tuple(scan.points))


# --------------------------------------------------------------------------------------
# Reading


def intervals(stream: DeflateStream) -> tuple[list[int], list[int]]:
    """The output offsets and sizes of the stream's intervals: interval ``k`` runs from
    checkpoint ``k`` to the next one (the last to the end of the stream)."""
    starts = [cp.out for cp in stream.checkpoints]
    sizes = [b - a for a, b in pairwise([*starts, stream.size])]
    return starts, sizes


async def inflate_interval(
    pread: Pread, stream: DeflateStream, k: int, offload: Offload | None = None
) -> bytes:
    """The output of interval ``k`` of ``stream`` (see :func:`intervals`): its compressed
    bytes read at once, then inflated from checkpoint ``k``."""
    points = stream.checkpoints
    cp = points[k]
    last = k + 1 == len(points)
    out_end = stream.size if last else points[k + 1].out
    in_end = stream.end if last else points[k + 1].inp
    what = f"deflate stream at offset {stream.start}"
    raw = await read_exactly(pread, cp.inp, in_end - cp.inp, what) if in_end > cp.inp else b""
    run = offload or run_inline
    return await run(partial(_inflate, cp, raw, out_end - cp.out, what))


def _inflate(cp: Checkpoint, raw: bytes, size: int, what: str) -> bytes:
    """``size`` bytes inflated from ``raw``, the input from checkpoint ``cp`` on."""
    inflater = _Inflater()
    inflater.resume(cp.bits, cp.value, zlib.decompress(cp.window) if cp.window else b"")
    parts: list[bytes] = []
    made = pos = 0
    while made < size:
        try:
            used, out, rc = inflater.inflate(raw, pos, min(OUT_CHUNK, size - made), False)
        except _ZlibError as e:
            raise FormatError(
                f"{what}: corrupt data at offset {cp.inp + pos + e.used}: {e} (input changed?)"
            ) from None
        pos += used
        made += len(out)
        parts.append(out)
        if made < size and (rc == _Z_STREAM_END or not (used or out)):
            raise FormatError(
                f"{what}: its data up to offset {cp.inp + len(raw)} gives {cp.out + made} "
                f"bytes of output, not the {cp.out + size} the index says (input changed?)"
            )
    data = b"".join(parts)
    if zlib.crc32(data) != cp.crc:
        raise FormatError(
            f"{what}: CRC-32 mismatch in the output from offset {cp.out} to "
            f"{cp.out + size}, inflated from input offset {cp.inp} (input changed?)"
        )
    return data


class DeflateReader:
    """Reads any byte range of an indexed deflate stream through ``pread``.

    A read inflates the interval(s) it falls in whole (from one checkpoint to the next)
    and keeps the ``depth`` most recently used, so sequential reads inflate each byte
    once. Safe to use from several tasks at once; with ``lock`` (``trio.Lock``) tasks
    reading the same interval at the same moment wait for one inflation of it (see
    :class:`~trionbd.formats.blocks.BlockCache`).
    """

    def __init__(
        self,
        pread: Pread,
        stream: DeflateStream,
        *,
        offload: Offload | None = None,
        depth: int = DEFAULT_DEPTH,
        lock: LockFactory = nullcontext,
    ):
        self.stream = stream
        self._pread = pread
        self._offload = offload
        starts, sizes = intervals(stream)
        self._cache = BlockCache(starts, sizes, self.load, depth, lock=lock)

    async def load(self, k: int) -> bytes:
        """Interval ``k`` inflated."""
        return await inflate_interval(self._pread, self.stream, k, self._offload)

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of output at ``offset``, clipped to the stream's size."""
        return await self._cache.read(offset, length)
