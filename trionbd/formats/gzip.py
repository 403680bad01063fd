"""Random access to the decompressed bytes of a gzip file (RFC 1952).

A gzip file is one or more members (``cat a.gz b.gz`` is valid gzip, and so is what
``pigz`` writes), each a header, a raw deflate stream and a trailer holding the CRC-32
and the size modulo 2^32 of that member's data. The trailer cannot give the total size,
so :func:`index_gzip` makes one full pass: it parses every header, inflates every
member with :func:`~trionbd.formats.deflate.index_deflate` (which records checkpoints
for random access), and checks every trailer. :class:`GzipReader` then serves any byte
range of the concatenated data, inflating the checkpoint interval(s) each read falls in.

The index can be kept (:meth:`GzipIndex.to_bytes`, :meth:`GzipIndex.from_bytes`) in a
versioned format of our own, so a second start skips the pass: it records the input's
size and an ``identity`` the caller chooses (for a local file its device, inode, size and
modification time; for a URL its ETag) and is refused as :class:`StaleIndex` when either
differs. Writing it to a file is the caller's business.

What counts as valid: as gzip(1), zero bytes after the last member (tape padding) are
ignored; any other trailing bytes are an error, as are reserved header flags, a
compression method other than deflate, a header CRC, data CRC or size that does not
match, and a member that ends before its trailer (a truncated file). Each
:class:`~trionbd.formats.FormatError` names the byte offset.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

from . import FormatError, Offload, Pread, read_exactly
from .blocks import BlockCache, LockFactory
from .deflate import (
    DEFAULT_DEPTH,
    DEFAULT_INTERVAL,
    DeflateStream,
    Output,
    index_deflate,
    inflate_interval,
    intervals,
)

MAGIC = b"\x1f\x8b"
MAX_HEADER = 1 << 20
"""Longest member header accepted (names and comments included)."""

_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16
_FIXED = struct.Struct("<2sBBIBB")  # ID1 ID2, CM, FLG, MTIME, XFL, OS
_TRAILER = struct.Struct("<II")  # CRC32, ISIZE

INDEX_MAGIC = b"TRIONBD GZIP INDEX\n\0"
INDEX_VERSION = 2


class StaleIndex(FormatError):
    """A saved index belongs to another input (size or identity differ): rebuild it."""


@dataclass(frozen=True, slots=True)
class GzipMember:
    """One member: its header at input offset ``offset``, its data at output offset
    ``out`` (``stream.size`` bytes), with the header's ``mtime`` (0: none) and ``name``."""

    offset: int
    out: int
    mtime: int
    name: str
    stream: DeflateStream


@dataclass(frozen=True, slots=True)
class GzipIndex:
    """Every member of a gzip file of ``input_size`` bytes; ``size`` is the total
    decompressed size."""

    input_size: int
    size: int
    members: tuple[GzipMember, ...]

    @property
    def checkpoints(self) -> int:
        """How many checkpoints the index holds."""
        return sum(len(m.stream.checkpoints) for m in self.members)

    def to_bytes(self, identity: bytes) -> bytes:
        """The index as a file's contents, tied to this input by its size and ``identity``."""
        parts = [
            INDEX_MAGIC,
            struct.pack("<IQI", INDEX_VERSION, self.input_size, len(identity)),
            identity,
            struct.pack("<QI", self.size, len(self.members)),
        ]
        for m in self.members:
            name = m.name.encode("utf-8", "surrogateescape")
            parts.append(struct.pack("<QQII", m.offset, m.out, m.mtime, len(name)))
            parts.append(name)
            parts.append(m.stream.to_bytes())
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes, input_size: int, identity: bytes) -> GzipIndex:
        """Read an index saved by :meth:`to_bytes`. Raises :class:`StaleIndex` if it was
        made for an input of another size or identity, FormatError if it is not an
        index of this version or is damaged."""
        if not data.startswith(INDEX_MAGIC):
            raise FormatError("not a trionbd gzip index (bad magic)")
        if len(data) < len(INDEX_MAGIC) + 4 + 4:
            raise FormatError("gzip index: truncated")
        body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
        pos = len(INDEX_MAGIC)
        try:
            version, saved_size, id_len = struct.unpack_from("<IQI", body, pos)
            if version != INDEX_VERSION:
                raise FormatError(f"gzip index: version {version}, expected {INDEX_VERSION}")
            if zlib.crc32(body) != crc:
                raise FormatError("gzip index: checksum mismatch (damaged file)")
            pos += 16
            saved_id = body[pos : pos + id_len]
            pos += id_len
            if saved_size != input_size or saved_id != identity:
                raise StaleIndex(
                    f"gzip index was made for another input ({saved_size} bytes, identity "
                    f"{saved_id!r}; this one: {input_size} bytes, {identity!r})"
                )
            size, count = struct.unpack_from("<QI", body, pos)
            pos += 12
            members = []
            for _ in range(count):
                offset, out, mtime, name_len = struct.unpack_from("<QQII", body, pos)
                pos += 24
                name = body[pos : pos + name_len].decode("utf-8", "surrogateescape")
                pos += name_len
                stream, pos = DeflateStream.from_bytes(body, pos)
                members.append(GzipMember(offset, out, mtime, name, stream))
        except struct.error as e:
            raise FormatError(f"gzip index: truncated ({e})") from None
        if pos != len(body) or sum(m.stream.size for m in members) != size:
            raise FormatError("gzip index: inconsistent contents")
        return cls(input_size, size, tuple(members))


async def _header(pread: Pread, offset: int, input_size: int) -> tuple[int, int, str]:
    """Parse the member header at ``offset``; return (data offset, mtime, name)."""
    where = f"gzip member header at offset {offset}"
    head = await read_exactly(pread, offset, min(4096, input_size - offset), where)
    if not MAGIC.startswith(head[:2]):
        raise FormatError(f"{where}: bad magic {head[:2].hex()} (expected 1f8b): not gzip")
    if len(head) < _FIXED.size:
        raise FormatError(f"{where}: truncated ({len(head)} bytes left)")
    _magic, method, flags, mtime, _xfl, _os = _FIXED.unpack_from(head)
    if method != 8:
        raise FormatError(f"{where}: compression method {method} (only 8, deflate, exists)")
    if flags & 0xE0:
        raise FormatError(f"{where}: reserved flag bits set ({flags:#04x})")
    pos = _FIXED.size

    async def need(n: int) -> None:
        nonlocal head
        while len(head) < pos + n:
            if offset + len(head) >= input_size:
                raise FormatError(f"{where}: truncated (the input ends inside the header)")
            if len(head) >= MAX_HEADER:
                raise FormatError(f"{where}: longer than {MAX_HEADER} bytes")
            more = min(len(head), input_size - offset - len(head))
            head += await read_exactly(pread, offset + len(head), more, where)

    async def zero_terminated() -> bytes:
        nonlocal pos
        while (nul := head.find(b"\0", pos)) < 0:
            await need(len(head) - pos + 1)
        text = head[pos:nul]
        pos = nul + 1
        return text

    if flags & _FEXTRA:
        await need(2)
        (xlen,) = struct.unpack_from("<H", head, pos)
        await need(2 + xlen)
        pos += 2 + xlen
    name = (await zero_terminated()).decode("latin-1") if flags & _FNAME else ""
    if flags & _FCOMMENT:
        await zero_terminated()
    if flags & _FHCRC:
        await need(2)
        (stored,) = struct.unpack_from("<H", head, pos)
        computed = zlib.crc32(head[:pos]) & 0xFFFF
        if stored != computed:
            raise FormatError(f"{where}: header CRC {stored:#06x}, computed {computed:#06x}")
        pos += 2
    return offset + pos, mtime, name


async def _only_zeros(pread: Pread, offset: int, end: int) -> bool:
    while offset < end:
        n = min(1 << 20, end - offset)
        if (await read_exactly(pread, offset, n, "trailing bytes")).count(0) != n:
            return False
        offset += n
    return True


def _shifted(output: Output | None, by: int) -> Output | None:
    """``output`` for a member whose data starts at output offset ``by``."""
    if output is None or not by:
        return output
    return lambda offset, data: output(by + offset, data)


async def index_gzip(
    pread: Pread,
    input_size: int,
    *,
    interval: int = DEFAULT_INTERVAL,
    progress: Callable[[int], None] | None = None,
    offload: Offload | None = None,
    output: Output | None = None,
) -> GzipIndex:
    """Read every member of the gzip file of ``input_size`` bytes behind ``pread``,
    verify each, and index them for random access (a checkpoint every ``interval``
    output bytes). ``progress(offset)`` is called as the input is read; ``output``, if
    given, gets the decompressed data as it is made (``output(offset, data)``, in the
    ``offload``). Raises FormatError naming the offset of the first problem."""
    if input_size == 0:
        raise FormatError("empty input: not a gzip file")
    members: list[GzipMember] = []
    offset = out = 0
    while True:
        data_start, mtime, name = await _header(pread, offset, input_size)
        what = f"gzip member at offset {offset}"
        stream = await index_deflate(
            pread, data_start, input_size, interval=interval, progress=progress,
            offload=offload, what=what, output=_shifted(output, out),
        )  # fmt: skip
        if input_size - stream.end < _TRAILER.size:
            raise FormatError(
                f"{what}: truncated: the trailer at offset {stream.end} is missing "
                f"({input_size - stream.end} of 8 bytes)"
            )
        trailer = await read_exactly(pread, stream.end, _TRAILER.size, f"{what} trailer")
        crc, isize = _TRAILER.unpack(trailer)
        if crc != stream.crc:
            raise FormatError(
                f"{what}: CRC-32 mismatch (trailer at offset {stream.end} says {crc:#010x}, "
                f"the data gives {stream.crc:#010x})"
            )
        if isize != stream.size & 0xFFFFFFFF:
            raise FormatError(
                f"{what}: size mismatch (trailer at offset {stream.end + 4} says {isize} "
                f"modulo 2^32, the data has {stream.size} bytes)"
            )
        members.append(GzipMember(offset, out, mtime, name, stream))
        out += stream.size
        offset = stream.end + _TRAILER.size
        if offset == input_size:
            break
        peek = await read_exactly(pread, offset, min(2, input_size - offset), "gzip input")
        if peek == MAGIC:
            continue
        if await _only_zeros(pread, offset, input_size):
            break
        raise FormatError(
            f"trailing garbage at offset {offset} after the last gzip member: "
            f"{input_size - offset} bytes that start with neither the gzip magic 1f8b "
            f"(they start with {peek.hex()}) nor are zero padding"
        )
    if progress is not None:
        progress(input_size)
    return GzipIndex(input_size, out, tuple(members))


class GzipReader:
    """Reads any byte range of the decompressed data of an indexed gzip file: the
    intervals between checkpoints of all members are the blocks of one
    :class:`~trionbd.formats.blocks.BlockCache` (see
    :class:`~trionbd.formats.deflate.DeflateReader`, which does the same for one stream)."""

    def __init__(
        self,
        pread: Pread,
        index: GzipIndex,
        *,
        offload: Offload | None = None,
        depth: int = DEFAULT_DEPTH,
        lock: LockFactory = nullcontext,
    ):
        self.index = index
        self._pread = pread
        self._offload = offload
        self._intervals: list[tuple[DeflateStream, int]] = []
        self.starts: list[int] = []
        """Where each interval starts in the output (:meth:`load` inflates one)."""
        self.sizes: list[int] = []
        for member in index.members:
            outs, lengths = intervals(member.stream)
            self.starts += [member.out + out for out in outs]
            self.sizes += lengths
            self._intervals += [(member.stream, k) for k in range(len(outs))]
        self._cache = BlockCache(self.starts, self.sizes, self.load, depth, lock=lock)

    @property
    def size(self) -> int:
        return self.index.size

    async def load(self, i: int) -> bytes:
        """Interval ``i`` (of all members, in order) inflated."""
        stream, k = self._intervals[i]
        return await inflate_interval(self._pread, stream, k, self._offload)

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the decompressed data, clipped to its size."""
        return await self._cache.read(offset, length)
