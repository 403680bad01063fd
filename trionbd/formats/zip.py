"""Zip archives: the members listed in the central directory, and their bytes.

:func:`read_zip` finds the end of central directory record (and the ZIP64 records, for
archives past 4 GiB or with more than 65,535 entries), reads every central directory
entry and returns a :class:`ZipIndex` of the file members (directories are not members).
A member that cannot be served (encrypted, compressed with a method other than stored or
deflated, on another disk of a split archive) is still listed, with the reason in
:attr:`ZipMember.unsupported`.

Serving a member: :func:`member_data_offset` reads its local header (whose extra field
may differ from the central directory's, so only it says where the data starts). A
stored member's bytes are then plain offset arithmetic; a deflated member is opened with
:func:`open_deflated`, which inflates it once, checks its size and CRC-32 against the
central directory, and returns a :class:`~trionbd.formats.deflate.DeflateReader` for
random access (:func:`deflated_stream` gives the checkpoint index alone, for a caller
that makes several readers) (see :mod:`trionbd.formats.deflate` for the checkpoints and their cost).

Names: UTF-8 when the entry says so (flag bit 11), through an Info-ZIP Unicode path
field whose CRC matches, or when it was made on a Unix-like system (whose zip writes
the file system's bytes); CP437, the zip specification's default, when made on MS-DOS
or Windows. Bytes that are not UTF-8 are kept with ``surrogateescape``. Times: the
extended timestamp field when present (Unix seconds), otherwise the DOS date and time
(local time, read as UTC). Data before the archive (a self-extractor's stub) is allowed,
as Python's :mod:`zipfile` allows it.

Every problem is a :class:`~trionbd.formats.FormatError` naming the structure and its
byte offset, for example ``zip: central directory entry 17 at offset 123456: bad
signature``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from . import FormatError, Offload, Pread, read_exactly
from .deflate import DEFAULT_INTERVAL, DeflateReader, DeflateStream, Output, index_deflate

STORED, DEFLATED = 0, 8
METHOD_NAMES = {
    0: "stored", 1: "shrunk", 6: "imploded", 8: "deflated", 9: "deflate64", 12: "bzip2",
    14: "lzma", 93: "zstd", 95: "xz", 98: "ppmd", 99: "AES-encrypted",
}  # fmt: skip

_EOCD = struct.Struct("<IHHHHIIH")
_EOCD_SIG = 0x06054B50
_LOCATOR = struct.Struct("<IIQI")
_LOCATOR_SIG = 0x07064B50
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_EOCD64_SIG = 0x06064B50
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_SIG = 0x02014B50
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIG = 0x04034B50
_MAX_COMMENT = 0xFFFF
_CD_CHUNK = 1 << 20

_FLAG_ENCRYPTED, _FLAG_DESCRIPTOR, _FLAG_STRONG, _FLAG_UTF8, _FLAG_MASKED = 1, 8, 64, 2048, 8192
_EXTRA_ZIP64, _EXTRA_TIME, _EXTRA_UNICODE_PATH = 0x0001, 0x5455, 0x7075
_CP437_HOSTS = {0, 6, 11, 14}
"""Systems ("version made by") whose zip tools write names in CP437: MS-DOS, OS/2 HPFS,
Windows NTFS, VFAT. Info-ZIP's zip on Unix writes the file system's bytes (UTF-8 today)
without the UTF-8 flag; unzip takes them as they are, and so do we."""


@dataclass(frozen=True, slots=True)
class ZipMember:
    """One file member, as its central directory entry describes it."""

    name: str
    size: int
    """Uncompressed size in bytes."""
    compressed_size: int
    method: int
    crc: int
    mtime: int
    """Modification time, seconds since the epoch."""
    header_offset: int
    """Where its local header starts in the archive."""
    entry: int
    """Its number in the central directory (from 0)."""
    unsupported: str | None
    """Why this member cannot be read (encrypted, another compression method, another
    disk), or None."""

    @property
    def method_name(self) -> str:
        return METHOD_NAMES.get(self.method, f"method {self.method}")


@dataclass(frozen=True, slots=True)
class ZipIndex:
    """The file members of an archive, in central directory order (a name written
    twice keeps its last entry, as extraction would)."""

    members: tuple[ZipMember, ...]
    comment: bytes
    data_end: int
    """Where the central directory starts: member data must end before it."""

    def lookup(self, name: str) -> ZipMember | None:
        for member in reversed(self.members):
            if member.name == name:
                return member
        return None


def _dos_time(date: int, time: int) -> int:
    try:
        when = datetime(
            1980 + (date >> 9), (date >> 5) & 15, date & 31,
            time >> 11, (time >> 5) & 63, (time & 31) * 2, tzinfo=UTC,
        )  # fmt: skip
    except ValueError:
        return 0
    return int(when.timestamp())


def _extras(extra: bytes, where: str) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + size > len(extra):
            raise FormatError(f"{where}: extra field {tag:#06x} at +{pos} runs past the entry")
        out.setdefault(tag, extra[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return out


class _Window:
    """Reads a region of the archive front to back through ``pread``, in large chunks."""

    def __init__(self, pread: Pread, start: int, end: int) -> None:
        self._pread = pread
        self._end = end
        self._base = start
        self._buf = b""

    async def get(self, offset: int, length: int, what: str) -> bytes:
        if offset + length > self._end:
            raise FormatError(
                f"{what}: runs past offset {self._end}, the end of the central directory"
            )
        rel = offset - self._base
        if rel < 0 or rel + length > len(self._buf):
            n = max(length, min(_CD_CHUNK, self._end - offset))
            self._buf = await read_exactly(self._pread, offset, n, what)
            self._base, rel = offset, 0
        return self._buf[rel : rel + length]


async def _find_end(pread: Pread, size: int) -> tuple[int, tuple[int, ...], bytes]:
    """The end of central directory record: (offset, fields, comment)."""
    if size < _EOCD.size:
        raise FormatError(f"zip: {size} bytes is too small for a zip archive (22 at least)")
    tail_start = max(0, size - _EOCD.size - _MAX_COMMENT)
    tail = await read_exactly(pread, tail_start, size - tail_start, "zip: archive end")
    pos = len(tail) - _EOCD.size
    signature = _EOCD_SIG.to_bytes(4, "little")
    while (pos := tail.rfind(signature, 0, pos + 4)) >= 0:
        fields = _EOCD.unpack_from(tail, pos)
        if pos + _EOCD.size + fields[7] == len(tail):
            comment = tail[pos + _EOCD.size :]
            return tail_start + pos, fields, comment
        pos -= 1
    raise FormatError(
        "zip: no end of central directory record in the last "
        f"{len(tail)} bytes: not a zip archive (or truncated)"
    )


async def read_zip(pread: Pread, size: int) -> ZipIndex:
    """Read the central directory of the zip archive of ``size`` bytes behind ``pread``."""
    eocd, fields, comment = await _find_end(pread, size)
    _sig, disk, cd_disk, _on_disk, count, cd_size, cd_offset, _clen = fields
    where = f"zip: end of central directory at offset {eocd}"
    cd_end = eocd
    if eocd >= _LOCATOR.size + _EOCD64.size:
        locator = eocd - _LOCATOR.size
        raw = await read_exactly(pread, locator, _LOCATOR.size, where)
        if int.from_bytes(raw[:4], "little") == _LOCATOR_SIG:
            # The ZIP64 record lies just before its locator (where Python's zipfile looks
            # too: the offset the locator gives is wrong when data precedes the archive).
            eocd64 = locator - _EOCD64.size
            where = f"zip: ZIP64 end of central directory at offset {eocd64}"
            raw = await read_exactly(pread, eocd64, _EOCD64.size, where)
            (sig, _rsize, _made, _need, disk, cd_disk, _on_disk, count, cd_size,
             cd_offset) = _EOCD64.unpack(raw)  # fmt: skip
            if sig != _EOCD64_SIG:
                raise FormatError(f"{where}: bad signature {sig:#010x} (expected "
                                  f"{_EOCD64_SIG:#010x})")  # fmt: skip
            cd_end = eocd64
    if cd_disk != disk:
        raise FormatError(f"{where}: the central directory is on disk {cd_disk}, not in "
                          f"this file (disk {disk} of a multi-disk archive)")  # fmt: skip
    if cd_size > cd_end:
        raise FormatError(f"{where}: central directory of {cd_size} bytes does not fit "
                          f"before offset {cd_end}")  # fmt: skip
    # Bytes in front of the archive (a self-extractor stub) shift every offset.
    bias = cd_end - cd_size - cd_offset
    if bias < 0:
        raise FormatError(f"{where}: central directory offset {cd_offset} and size "
                          f"{cd_size} run past offset {cd_end}")  # fmt: skip
    start = cd_offset + bias
    members: list[ZipMember] = []
    window = _Window(pread, start, cd_end)
    pos = start
    for entry in range(count):
        what = f"zip: central directory entry {entry} at offset {pos}"
        raw = await window.get(pos, _CENTRAL.size, what)
        (sig, made_by, _need, flags, method, mtime, mdate, crc, csize, usize, name_len,
         extra_len, comment_len, disk_start, _iattr, _eattr,
         lho) = _CENTRAL.unpack(raw)  # fmt: skip
        if sig != _CENTRAL_SIG:
            raise FormatError(f"{what}: bad signature {sig:#010x} (expected {_CENTRAL_SIG:#010x})")
        var = await window.get(pos + _CENTRAL.size, name_len + extra_len + comment_len, what)
        raw_name, extra = var[:name_len], var[name_len : name_len + extra_len]
        pos += _CENTRAL.size + len(var)
        extras = _extras(extra, what)
        if _EXTRA_ZIP64 in extras:
            usize, csize, lho, disk_start = _zip64(
                extras[_EXTRA_ZIP64], (usize, csize, lho, disk_start), what
            )
        name = _name(raw_name, flags, made_by >> 8, extras)
        if name.endswith("/"):
            continue  # a directory
        when = _dos_time(mdate, mtime)
        stamp = extras.get(_EXTRA_TIME)
        if stamp is not None and len(stamp) >= 5 and stamp[0] & 1:
            when = int.from_bytes(stamp[1:5], "little", signed=True)
        unsupported = None
        if disk_start != disk:
            unsupported = f"stored on disk {disk_start} of a multi-disk archive"
        elif flags & (_FLAG_ENCRYPTED | _FLAG_STRONG | _FLAG_MASKED) or method == 99:
            unsupported = "encrypted"
        elif method not in (STORED, DEFLATED):
            unsupported = f"compressed with {METHOD_NAMES.get(method, f'method {method}')}"
        else:
            lho += bias
            if lho + _LOCAL.size + csize > start:
                raise FormatError(
                    f"{what}: member {name!r} (local header at offset {lho}, {csize} "
                    f"compressed bytes) runs past the central directory at offset {start}"
                )
            if method == STORED and csize != usize:
                raise FormatError(f"{what}: stored member {name!r} has compressed size "
                                  f"{csize} but size {usize}")  # fmt: skip
        members.append(ZipMember(name, usize, csize, method, crc, when, lho, entry, unsupported))
    if pos != start + cd_size:
        raise FormatError(
            f"zip: the central directory at offset {start} has {count} entries in "
            f"{pos - start} bytes, but the end record says {cd_size} bytes"
        )
    return ZipIndex(tuple(members), comment, start)


def _zip64(z64: bytes, fields: tuple[int, int, int, int], where: str) -> tuple[int, int, int, int]:
    """Sizes, local header offset and disk with the values the ZIP64 extra field holds
    for those that are all ones (in that order, only those)."""
    out = []
    pos = 0
    for value, width in zip(fields, (8, 8, 8, 4), strict=True):
        if value == (0xFFFFFFFF if width == 8 else 0xFFFF):
            if pos + width > len(z64):
                raise FormatError(f"{where}: ZIP64 extra field too short ({len(z64)} bytes)")
            value = int.from_bytes(z64[pos : pos + width], "little")
            pos += width
        out.append(value)
    return out[0], out[1], out[2], out[3]


def _name(raw: bytes, flags: int, host: int, extras: dict[int, bytes]) -> str:
    unicode_path = extras.get(_EXTRA_UNICODE_PATH)
    if (
        unicode_path is not None
        and len(unicode_path) > 5
        and unicode_path[0] == 1
        and int.from_bytes(unicode_path[1:5], "little") == zlib.crc32(raw)
    ):
        return unicode_path[5:].decode("utf-8", "surrogateescape")
    if flags & _FLAG_UTF8 or host not in _CP437_HOSTS:
        return raw.decode("utf-8", "surrogateescape")
    return raw.decode("cp437")


async def member_data_offset(pread: Pread, index: ZipIndex, member: ZipMember) -> int:
    """Where ``member``'s data starts, from its local header (which must agree with the
    central directory about the name and method)."""
    if member.unsupported:
        raise FormatError(f"zip: member {member.name!r} cannot be read: {member.unsupported}")
    where = f"zip: local header of {member.name!r} at offset {member.header_offset}"
    raw = await read_exactly(pread, member.header_offset, _LOCAL.size, where)
    (sig, _need, _flags, method, _time, _date, _crc, _csize, _usize, name_len,
     extra_len) = _LOCAL.unpack(raw)  # fmt: skip
    if sig != _LOCAL_SIG:
        raise FormatError(f"{where}: bad signature {sig:#010x} (expected {_LOCAL_SIG:#010x})")
    if method != member.method:
        raise FormatError(f"{where}: method {method}, but the central directory says "
                          f"{member.method}")  # fmt: skip
    start: int = member.header_offset + _LOCAL.size + name_len + extra_len
    if start + member.compressed_size > index.data_end:
        raise FormatError(f"{where}: its data ({member.compressed_size} bytes at offset "
                          f"{start}) runs past the central directory at offset "
                          f"{index.data_end}")  # fmt: skip
    return start


async def verify_stored(pread: Pread, index: ZipIndex, member: ZipMember) -> int:
    """Read stored ``member`` whole and check its CRC-32 (serving it needs no read, so
    nothing else checks it); return its data offset."""
    if member.method != STORED:
        raise ValueError(f"member {member.name!r} is {member.method_name}, not stored")
    start = await member_data_offset(pread, index, member)
    crc = 0
    for pos in range(start, start + member.size, _CD_CHUNK):
        n = min(_CD_CHUNK, start + member.size - pos)
        crc = zlib.crc32(await read_exactly(pread, pos, n, f"zip: member {member.name!r}"), crc)
    if crc != member.crc:
        raise FormatError(
            f"zip: member {member.name!r} (data at offset {start}): CRC-32 mismatch "
            f"(central directory {member.crc:#010x}, data {crc:#010x})"
        )
    return start


async def deflated_stream(
    pread: Pread,
    index: ZipIndex,
    member: ZipMember,
    *,
    interval: int = DEFAULT_INTERVAL,
    progress: Callable[[int], None] | None = None,
    offload: Offload | None = None,
    output: Output | None = None,
) -> DeflateStream:
    """Inflate deflated ``member`` once, checking its size and CRC-32 against the central
    directory, and return its checkpoint index (for :class:`DeflateReader`); ``output``
    (if given) gets the inflated bytes as :func:`index_deflate` makes them."""
    if member.method != DEFLATED:
        raise ValueError(f"member {member.name!r} is {member.method_name}, not deflated")
    start = await member_data_offset(pread, index, member)
    what = f"zip: member {member.name!r} (data at offset {start})"
    stream = await index_deflate(
        pread, start, start + member.compressed_size, interval=interval,
        progress=progress, offload=offload, what=what, output=output,
    )  # fmt: skip
    if stream.size != member.size:
        raise FormatError(f"{what}: inflates to {stream.size} bytes, but the central "
                          f"directory says {member.size}")  # fmt: skip
    if stream.crc != member.crc:
        raise FormatError(f"{what}: CRC-32 mismatch (central directory {member.crc:#010x}, "
                          f"data {stream.crc:#010x})")  # fmt: skip
    if stream.end != start + member.compressed_size:
        raise FormatError(
            f"{what}: the deflate data ends at offset {stream.end}, not at "
            f"{start + member.compressed_size} as its compressed size says"
        )
    return stream


async def open_deflated(
    pread: Pread,
    index: ZipIndex,
    member: ZipMember,
    *,
    interval: int = DEFAULT_INTERVAL,
    progress: Callable[[int], None] | None = None,
    offload: Offload | None = None,
) -> DeflateReader:
    """Inflate deflated ``member`` once (checking its size and CRC-32) and return a
    reader for random access to its bytes."""
    stream = await deflated_stream(
        pread, index, member, interval=interval, progress=progress, offload=offload
    )
    return DeflateReader(pread, stream, offload=offload)
