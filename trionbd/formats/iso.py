"""ISO 9660 images (as genisoimage and xorriso make them): every regular file with its
path, size, extents and modification time.

:func:`read_iso` reads the volume descriptors and walks the directory tree, taking
names from Rock Ridge (POSIX names in the System Use area, ``NM`` entries, continuation
areas, relocated deep directories) when the image has it, else from the Joliet tree
(UCS-2 names), else the plain ISO 9660 names (``NAME.EXT;1`` without its version). A
file recorded in several extents (files of 4 GiB and more) is one file. File data is
never read: :meth:`IsoFile.segments` maps a byte range to image offsets, which is all
a filter needs to serve the file.

Every problem is a :class:`~trionbd.formats.FormatError` naming the byte offset (a
directory record, a volume descriptor); directory loops and extents outside the image
are errors, never hangs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from . import FormatError, Pread, map_range, read_exactly

SECTOR = 2048
FIRST_DESCRIPTOR = 16
MAX_DESCRIPTORS = 64
MAX_DIRECTORY = 64 << 20
"""Largest directory extent read."""
MAX_DEPTH = 64
MAX_CONTINUATIONS = 64
_JOLIET_ESCAPES = (b"%/@", b"%/C", b"%/E")
_FLAG_DIRECTORY, _FLAG_MORE = 2, 128


@dataclass(frozen=True, slots=True)
class IsoSegment:
    """``length`` bytes of a file at ``offset``: at image offset ``physical``, or zeros
    when ``physical`` is None (past the recorded extents)."""

    offset: int
    length: int
    physical: int | None


@dataclass(frozen=True, slots=True)
class IsoFile:
    """A regular file: ``size`` bytes stored in ``extents`` ((image offset, length), in
    order), modified at ``mtime`` (seconds since the epoch)."""

    path: str
    size: int
    extents: tuple[tuple[int, int], ...]
    mtime: int

    def segments(self, offset: int, length: int) -> list[IsoSegment]:
        """Where bytes ``[offset, offset + length)`` of the file are, clipped to its size."""
        starts, ends, sources = [], [], []
        pos = 0
        for physical, n in self.extents:
            starts.append(pos)
            ends.append(pos + n)
            sources.append(physical)
            pos += n
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        return map_range(starts, ends, sources, offset, end, IsoSegment)


@dataclass(frozen=True, slots=True)
class IsoImage:
    """The files of an image, by path; ``names`` says which names they carry."""

    volume_id: str
    names: str
    """"rock ridge", "joliet" or "iso9660"."""
    files: tuple[IsoFile, ...]

    def lookup(self, path: str) -> IsoFile | None:
        for f in self.files:
            if f.path == path:
                return f
        return None


@dataclass(frozen=True, slots=True)
class _Record:
    offset: int  # where the record is, for errors
    extent: int  # byte offset of the data
    length: int
    flags: int
    name: bytes
    system_use: bytes
    mtime: int


def _record_time(raw: bytes) -> int:
    year, month, day, hour, minute, second, gmt = struct.unpack("<6Bb", raw)
    try:
        when = datetime(1900 + year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        return 0
    return int((when - timedelta(minutes=15 * gmt)).timestamp())


class _Reader:
    def __init__(self, pread: Pread, size: int, block: int) -> None:
        self.pread = pread
        self.size = size
        self.block = block

    async def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise FormatError(f"iso: {what}: bytes {offset}..{offset + length} lie outside "
                              f"the image ({self.size} bytes)")  # fmt: skip
        if not length:
            return b""
        return await read_exactly(self.pread, offset, length, f"iso: {what}")

    def record(self, buf: bytes, pos: int, base: int) -> _Record:
        where = f"directory record at offset {base + pos}"
        length, ext_len = buf[pos], buf[pos + 1]
        if length < 34 or pos + length > len(buf):
            raise FormatError(f"iso: {where}: record length {length} is invalid")
        extent = struct.unpack_from("<I", buf, pos + 2)[0]
        data_len = struct.unpack_from("<I", buf, pos + 10)[0]
        flags, name_len = buf[pos + 25], buf[pos + 32]
        if 33 + name_len > length:
            raise FormatError(f"iso: {where}: name of {name_len} bytes does not fit")
        su_start = 33 + name_len + (1 - name_len % 2)
        return _Record(
            base + pos, (extent + ext_len) * self.block, data_len, flags,
            buf[pos + 33 : pos + 33 + name_len], buf[pos + su_start : pos + length],
            _record_time(buf[pos + 18 : pos + 25]),
        )  # fmt: skip

    async def directory(self, rec: _Record) -> list[_Record]:
        where = f"directory at offset {rec.extent} (record at offset {rec.offset})"
        if rec.length > MAX_DIRECTORY:
            raise FormatError(f"iso: {where}: {rec.length} bytes is too large a directory")
        buf = await self.read(rec.extent, rec.length, where)
        out = []
        pos = 0
        while pos < len(buf):
            if buf[pos] == 0:  # records do not cross sectors: the rest of this one is padding
                pos = (pos // SECTOR + 1) * SECTOR
                continue
            out.append(self.record(buf, pos, rec.extent))
            pos += buf[pos]
        if len(out) < 2:
            raise FormatError(f"iso: {where}: lacks its '.' and '..' records")
        return out

    async def susp(self, rec: _Record, skip: int) -> dict[bytes, list[bytes]]:
        """The SUSP entries of a record's System Use area (continuations followed)."""
        entries: dict[bytes, list[bytes]] = {}
        area, pos, hops = rec.system_use, skip, 0
        while True:
            continuation = None
            while pos + 4 <= len(area):
                sig, length = area[pos : pos + 2], area[pos + 2]
                if length < 4 or pos + length > len(area):
                    break  # padding, or damage that Rock Ridge readers ignore
                body = area[pos + 4 : pos + length]  # after signature, length, version
                if sig == b"ST":
                    break
                if sig == b"CE" and len(body) >= 24:
                    block, offset, size = (struct.unpack_from("<I", body, i)[0] for i in (0, 8, 16))
                    continuation = (block * self.block + offset, size)
                entries.setdefault(sig, []).append(body)
                pos += length
            if continuation is None:
                return entries
            hops += 1
            if hops > MAX_CONTINUATIONS:
                raise FormatError(f"iso: record at offset {rec.offset}: more than "
                                  f"{MAX_CONTINUATIONS} Rock Ridge continuation areas")  # fmt: skip
            start, size = continuation
            area = await self.read(start, size, f"continuation area of record at {rec.offset}")
            pos = 0


def _iso_name(raw: bytes) -> str:
    name = raw.decode("latin-1").split(";", 1)[0]
    return name[:-1] if name.endswith(".") else name


async def read_iso(pread: Pread, size: int) -> IsoImage:
    """Read the ISO 9660 image of ``size`` bytes behind ``pread``: every regular file."""
    primary = joliet = None
    for i in range(MAX_DESCRIPTORS):
        offset = (FIRST_DESCRIPTOR + i) * SECTOR
        if offset + SECTOR > size:
            raise FormatError(f"iso: the image ends at offset {size} before the volume "
                              "descriptor set terminator")  # fmt: skip
        vd = await read_exactly(pread, offset, SECTOR, f"iso: volume descriptor {i}")
        if vd[1:6] != b"CD001":
            raise FormatError(
                f"iso: volume descriptor at offset {offset}: bad identifier {vd[1:6]!r} "
                "(expected b'CD001'): not an ISO 9660 image"
            )
        if vd[0] == 255:
            break
        if vd[0] == 1 and primary is None:
            primary = (offset, vd)
        elif vd[0] == 2 and vd[88:91] in _JOLIET_ESCAPES and joliet is None:
            joliet = (offset, vd)
    else:
        raise FormatError(f"iso: no terminator in the first {MAX_DESCRIPTORS} volume descriptors")
    if primary is None:
        raise FormatError("iso: no primary volume descriptor")
    offset, vd = primary
    block = struct.unpack_from("<H", vd, 128)[0]
    if block not in (512, 1024, 2048):
        raise FormatError(f"iso: primary volume descriptor at offset {offset}: logical "
                          f"block size {block}")  # fmt: skip
    reader = _Reader(pread, size, block)
    volume_id = vd[40:72].decode("latin-1").rstrip()
    root = reader.record(vd, 156, offset)
    entries = await reader.directory(root)
    rr_skip = None
    dot = await reader.susp(entries[0], 0)
    for body in dot.get(b"SP", []):
        if body[0:2] == b"\xbe\xef":
            rr_skip = body[2]
    if rr_skip is None and b"RR" not in dot and b"NM" not in dot and b"PX" not in dot:
        if joliet is not None:
            offset, vd = joliet
            root = reader.record(vd, 156, offset)
            files = await _walk(reader, root, lambda raw: raw.decode("utf-16-be", "replace"))
            return IsoImage(volume_id, "joliet", files)
        return IsoImage(volume_id, "iso9660", await _walk(reader, root, _iso_name))
    return IsoImage(volume_id, "rock ridge", await _walk(reader, root, _iso_name, rr_skip or 0))


async def _walk(
    reader: _Reader, root: _Record, decode: Callable[[bytes], str], rr_skip: int | None = None
) -> tuple[IsoFile, ...]:
    files: list[IsoFile] = []
    visited = {root.extent}
    stack: list[tuple[str, _Record, int]] = [("", root, 0)]
    while stack:
        prefix, directory, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FormatError(f"iso: directory {prefix!r} is nested more than {MAX_DEPTH} deep")
        records = (await reader.directory(directory))[2:]
        pending: IsoFile | None = None
        subdirs = []
        for rec in records:
            name = decode(rec.name)
            is_dir = bool(rec.flags & _FLAG_DIRECTORY)
            target = rec
            if rr_skip is not None:
                susp = await reader.susp(rec, rr_skip)
                if b"RE" in susp:
                    continue  # a relocated directory: listed where its CL entry is
                nm = susp.get(b"NM", [])
                if nm:
                    name = b"".join(body[1:] for body in nm if not body[0] & 6).decode(
                        "utf-8", "surrogateescape"
                    )
                for body in susp.get(b"CL", []):
                    where = struct.unpack_from("<I", body, 0)[0] * reader.block
                    sector = await reader.read(where, SECTOR, f"relocated directory of {name!r}")
                    target = reader.record(sector, 0, where)  # its '.' record
                    is_dir = True
            path = f"{prefix}/{name}"
            if is_dir:
                if target.extent in visited:
                    raise FormatError(f"iso: directory record at offset {rec.offset} "
                                      f"({path!r}): directory loop")  # fmt: skip
                visited.add(target.extent)
                subdirs.append((path, target, depth + 1))
                continue
            extent = (rec.extent, rec.length)
            if rec.length and rec.extent + rec.length > reader.size:
                raise FormatError(f"iso: directory record at offset {rec.offset} ({path!r}): "
                                  f"extent at offset {rec.extent} of {rec.length} bytes lies "
                                  f"outside the image ({reader.size} bytes)")  # fmt: skip
            if pending is not None and pending.path == path:
                pending = IsoFile(path, pending.size + rec.length, (*pending.extents, extent),
                                  pending.mtime)  # fmt: skip
            else:
                if pending is not None:
                    raise FormatError(f"iso: multi-extent file {pending.path!r} has no final "
                                      f"extent (record at offset {rec.offset})")  # fmt: skip
                pending = IsoFile(path, rec.length, (extent,), rec.mtime)
            if not rec.flags & _FLAG_MORE:
                files.append(pending)
                pending = None
        if pending is not None:
            raise FormatError(f"iso: multi-extent file {pending.path!r} has no final extent")
        stack.extend(reversed(subdirs))
    return tuple(files)
