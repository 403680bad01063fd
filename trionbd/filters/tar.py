"""tar: serve the members of a tar archive as exports.

The layer below holds an uncompressed tar archive (ustar, GNU, pax, v7; GNU sparse
members of every format). Every regular member is an export, named by its path in the
archive with a leading ``./`` or ``/`` removed; hard links and symbolic links are
exports too and serve the member they name. Directories, devices and FIFOs are not
exports: asking for one is refused with a message saying what it is. The default
export is the first regular member. Descriptions (``nbdinfo --list``) give the size,
mode and modification time.

The member map (name, data offset, size, sparse map) is built once, by reading only
the archive's headers: at start-up, before any client connects, through a context
of the layer below held for the server's life. A malformed archive (bad header
checksum, truncated header or data, member data past the end) stops the server with
exit status 1 and a message naming the archive and the byte offset. Member data is
then served by offset arithmetic straight from the layer below:

* reads, writes, trim, zero and cache land inside the member's data; the archive's
  headers are never touched and nothing outside the member can be read or written
  (a read past the member's end fails with EINVAL, a write with ENOSPC);
* block status is that of the layer below, shifted to the member;
* sparse members (``tar -S``) read their holes as zeroes, report them as holes in
  block status and as hole chunks in structured reads. Writes land in the stored data
  regions; a write that would put non-zero bytes into a hole fails with ENOSPC (the
  archive has no room for them) and writes nothing at all; zeroes written into a hole
  change nothing and succeed. Trim and zero act on the stored regions only; a zero
  request with NO_HOLE (the client asks for allocated zeroes) that touches a hole fails
  with ENOSPC and zeroes nothing.

Writable when the layer below is (and without ``-r``); flush, FUA, multi-conn and cache
are those of the layer below; the size is the member's size.

When the layer below lists several exports (``file dir=DIR`` holding several archives)
each of them is an archive, and the exports are named ``ARCHIVE/MEMBER``. Each
archive's map is built the first time a client lists or opens it and is kept for the
server's life (restart the server after replacing an archive). A malformed archive
is then not listed (a warning goes to the log) and opening one of its names is
refused with the message, while the other archives are served. An archive that could
not be opened or read (missing, an I/O error) is tried again by the next client. An
archive added to the directory while the server runs is listed, and served when asked
for. Reading the headers of a large archive logs its progress after a second.

Examples:
  trionbd file disk.tar --filter=tar
  trionbd file disk.tar --filter=tar tar-entry=images/root.img
  trionbd file dir=/srv/archives --filter=tar      # exports a.tar/x, b.tar/y, ...
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from ..chain import (
    ContainerFilter,
    Export,
    Extent,
    Layer,
    NBDError,
    Next,
    Param,
    Progress,
    describe_file,
)
from ..formats import BlockingRead, FormatError, Pread
from ..formats.tar import TarIndex, TarLookupError, TarMember, normalize_name, scan_tar
from ..nursery import Lifetime
from ..protocol.constants import UNALLOCATED, CmdFlag
from . import _formats
from ._formats import Piece

log = logging.getLogger(__name__)

SCAN_THREADS = 4
"""Archives whose headers are read at the same time (each scan uses a worker thread)."""

MAX_EXTENTS = 4096
"""Extents returned per block status request on a sparse member (clients ask again)."""


@dataclass(frozen=True, slots=True)
class Served:
    """The handle of one connection: the member it is served, and how to describe it."""

    member: TarMember
    start: int
    """Where the member's stored data begins in the archive (``member.offset_data``)."""
    size: int
    sparse: bool
    description: str
    read_only: bool = False
    """A member is writable when the layer below is."""

    @classmethod
    def of(cls, name: str, member: TarMember) -> Served:
        return cls(
            member,
            member.offset_data,
            member.size,
            member.sparse is not None,
            describe(name, member),
        )

    def pieces(self, offset: int, count: int) -> Sequence[Piece]:
        """The member's bytes ``[offset, offset + count)`` as pieces of the archive."""
        if not self.sparse:
            return [(offset, count, self.start + offset)]
        return self.member.segments(offset, count)


def describe(name: str, member: TarMember) -> str:
    """The export description of ``member`` served under ``name`` (a link's name)."""
    stored = f" (sparse, {member.stored_size} stored)" if member.sparse is not None else ""
    text = describe_file(member.size, mode=member.mode, mtime=member.mtime, detail=stored)
    return text if name == member.name else f"{text}, link to {member.name!r}"


@dataclass(frozen=True, slots=True)
class Archive:
    """A member map and the exports it gives, in archive order."""

    index: TarIndex
    exports: tuple[Export, ...]
    """Exports named by member name (not yet joined with the archive's name)."""

    @classmethod
    def of(cls, index: TarIndex) -> Archive:
        return cls(index, tuple(Export(n, describe(n, m)) for n, m in index.members.items()))

    def lookup(self, name: str) -> Served:
        """The handle of the member served as ``name``; ``NBDError(ENOENT)`` saying why
        not."""
        name = normalize_name(name)
        if not name:
            what = "no regular members" if not self.exports else "no member named ''"
            raise NBDError(errno.ENOENT, f"tar: {self.index.archive} has {what}")
        try:
            return Served.of(name, self.index.lookup(name))
        except TarLookupError as e:
            raise NBDError(errno.ENOENT, f"tar: {e}") from None


class TarFilter(ContainerFilter[Archive, Served]):
    """Serve the members of the tar archive(s) below as exports."""

    name = "tar"
    process_safe = True  # each worker reads the archive's index at start-up
    params = (
        Param(
            "tar-entry",
            "serve only member NAME, whatever export name a client asks for (as nbdkit's tar "
            "filter); it is then the one export listed and the default. Over several "
            "archives, the exports are the archives' names, each serving its own member NAME",
            metavar="NAME",
        ),
    )
    nonblocking = True  # every data callback is offset arithmetic and one call below
    container = "archive"
    entry_param = "tar-entry"

    def __init__(self, tar_entry: str | None = None):
        super().__init__(None if tar_entry is None else normalize_name(tar_entry))
        self.limiter: trio.CapacityLimiter | None = None

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        self.limiter = trio.CapacityLimiter(SCAN_THREADS)
        await super().after_fork(lifetime, below)

    async def read_index(self, pread: Pread, size: int, label: str, progress: Progress) -> Archive:
        """Read the headers of the archive (tarfile, in a worker thread)."""
        assert self.limiter is not None

        def counted(members: int) -> None:
            progress.members = members
            trio.from_thread.check_cancelled()

        def scan(read: BlockingRead) -> TarIndex:
            return scan_tar(read, size, name=label, on_header=counted)

        try:
            return Archive.of(await _formats.in_thread(scan, pread, self.limiter))
        except FormatError as e:
            hint = await _formats.compression_hint(pread, size)
            raise NBDError(errno.EIO, f"tar: {e}{hint}") from None

    async def member(self, index: Archive, name: str) -> Served:
        return index.lookup(name)

    # --- per connection ------------------------------------------------------------------

    async def export_description(self, next: Next, h: Served) -> str | None:
        return h.description

    async def get_size(self, next: Next, h: Served) -> int:
        return h.size

    async def can_extents(self, next: Next, h: Served) -> bool:
        return True  # holes of sparse members are known even if the layer below cannot tell

    # --- data ----------------------------------------------------------------------------

    async def pread(self, next: Next, h: Served, count: int, offset: int, flags: int) -> bytes:
        if not h.sparse and offset + count <= h.size:  # the common case: one call below
            return await next.pread(count, h.start + offset, flags)
        pieces = _pieces(h, "read", count, offset, errno.EINVAL)
        return await _formats.read(next, pieces, offset, flags)

    async def pwrite(self, next: Next, h: Served, buf: bytes, offset: int, flags: int) -> None:
        count = len(buf)
        if not h.sparse and offset + count <= h.size:
            await next.pwrite(buf, h.start + offset, flags)
            return

        def refuse(hole: Piece) -> NBDError:
            return _hole(h, hole, f"write of {count} bytes at offset {offset} puts data into")

        pieces = _pieces(h, "write", count, offset, errno.ENOSPC)
        await _formats.write(next, pieces, buf, offset, flags, refuse)

    async def trim(self, next: Next, h: Served, count: int, offset: int, flags: int) -> None:
        await _formats.each_stored(
            next.trim, _pieces(h, "trim", count, offset, errno.EINVAL), flags
        )

    async def zero(self, next: Next, h: Served, count: int, offset: int, flags: int) -> None:
        def refuse(hole: Piece) -> NBDError:
            what = f"zero of {count} bytes at offset {offset} with NO_HOLE needs allocated bytes in"
            return _hole(h, hole, what)

        pieces = _pieces(h, "zero", count, offset, errno.ENOSPC)
        await _formats.zero(next, pieces, flags, refuse)

    async def cache(self, next: Next, h: Served, count: int, offset: int, flags: int) -> None:
        await _formats.each_stored(
            next.cache, _pieces(h, "cache", count, offset, errno.EINVAL), flags
        )

    async def extents(
        self, next: Next, h: Served, count: int, offset: int, flags: int
    ) -> list[Extent]:
        out: list[Extent] = []
        for start, length, below in _pieces(h, "block status", count, offset, errno.EINVAL):
            if below is None:
                out.append(Extent(start, length, UNALLOCATED))
            else:
                # The layer below's answer (the archive file may itself be sparse), shifted.
                shift = start - below
                answer = await next.extents(length, below, flags)
                out += [Extent(e.offset + shift, e.length, e.flags) for e in answer]
                if out[-1].offset + out[-1].length < start + length:
                    break  # the layer below answered for part of the piece only
            if flags & CmdFlag.REQ_ONE or len(out) >= MAX_EXTENTS:
                break
        return out


def _pieces(h: Served, verb: str, count: int, offset: int, code: int) -> Sequence[Piece]:
    """``h.pieces(offset, count)``; ``NBDError(code)`` if the range goes past the member's
    end (nothing outside the member can be reached)."""
    if offset + count > h.size:
        raise NBDError(
            code,
            f"tar: {verb} of {count} bytes at offset {offset} is beyond the end of member "
            f"{h.member.name!r} ({h.size} bytes)",
        )
    return h.pieces(offset, count)


def _hole(h: Served, hole: Piece, what: str) -> NBDError:
    """The error for a request (``what`` it does) that needs bytes stored in ``hole``."""
    start, length, _ = hole
    return NBDError(
        errno.ENOSPC,
        f"tar: {what} the hole [{start}, {start + length}) of sparse member "
        f"{h.member.name!r}: the archive stores no bytes there (nothing written)",
    )


FILTER = TarFilter
