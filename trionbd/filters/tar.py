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
not be opened or read (missing, an I/O error) is tried again by the next client.

Examples:
  trionbd file disk.tar --filter=tar
  trionbd file disk.tar --filter=tar tar-entry=images/root.img
  trionbd file dir=/srv/archives --filter=tar      # exports a.tar/x, b.tar/y, ...
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import trio

from ..chain import (
    BuildOnce,
    Export,
    Extent,
    Filter,
    Layer,
    NBDError,
    Next,
    Param,
    ProductNames,
    StartupError,
)
from ..formats import BlockingRead, FormatError
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
    text = member.description()
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

    def lookup(self, name: str) -> TarMember:
        """The member served as ``name``; ``NBDError(ENOENT)`` saying why not."""
        if not normalize_name(name):
            what = "no regular members" if not self.exports else "no member named ''"
            raise NBDError(errno.ENOENT, f"tar: {self.index.archive} has {what}")
        try:
            return self.index.lookup(name)
        except TarLookupError as e:
            raise NBDError(errno.ENOENT, f"tar: {e}") from None


class _Unavailable(Exception):
    """The archive could not be opened or read (not: it is malformed). Not an
    ``NBDError``, so ``BuildOnce`` does not remember it: a missing file may appear later,
    an I/O error may pass."""

    def __init__(self, error: NBDError):
        super().__init__(error.message)
        self.error = error


class TarFilter(Filter):
    """Serve the members of the tar archive(s) below as exports."""

    name = "tar"
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

    def __init__(self, tar_entry: str | None = None):
        self.entry = None if tar_entry is None else normalize_name(tar_entry)
        self.single = True
        """The layer below has only its unnamed default export: names are ``MEMBER``."""
        self.single_archive: Archive | None = None
        self.below: Layer | None = None
        self.lifetime_context: Next | None = None
        self.limiter: trio.CapacityLimiter | None = None
        self.archives: BuildOnce[str, Archive] = BuildOnce(self._build)

    # --- start-up ------------------------------------------------------------------------

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        self.below = below
        self.limiter = trio.CapacityLimiter(SCAN_THREADS)
        self.single = (await ProductNames.of(below, True, False)).single
        if not self.single:
            return  # archives are read on first use
        self.lifetime_context = await lifetime.open_context(below, "", readonly=True)
        try:
            archive = self.single_archive = await self._get("")
        except NBDError as e:
            raise StartupError(e.message) from None
        if self.entry is not None:
            try:
                archive.lookup(self.entry)
            except NBDError as e:
                reason = e.message.removeprefix("tar: ")
                raise StartupError(f"tar: tar-entry={self.entry}: {reason}") from None

    async def _build(self, export: str) -> Archive:
        """Read the headers of the archive that is export ``export`` of the layer below."""
        assert self.below is not None
        label = self.below.export_label(export)
        started = time.perf_counter()
        try:
            if self.lifetime_context is not None:
                index = await self._read(self.lifetime_context, label)
            else:
                ctx = await self.below.open(True, export)
                try:
                    index = await self._read(ctx, label)
                finally:
                    with trio.CancelScope(shield=True):
                        await ctx.close()
        except FormatError as e:
            raise NBDError(errno.EIO, f"tar: {e}") from None
        except NBDError as e:
            raise _Unavailable(NBDError(e.errno, f"tar: {label}: {e.message}")) from None
        log.debug(
            "tar: %s: %d exports (headers read in %.3f s)",
            label,
            len(index),
            time.perf_counter() - started,
        )
        return Archive.of(index)

    async def _read(self, ctx: Next, label: str) -> TarIndex:
        size = await ctx.get_size()
        assert self.limiter is not None

        def scan(read: BlockingRead) -> TarIndex:
            return scan_tar(read, size, name=label, on_header=_check_cancelled)

        return await _formats.in_thread(scan, _formats.reader(ctx), self.limiter)

    async def _get(self, export: str) -> Archive:
        try:
            return await self.archives.get(export)
        except _Unavailable as e:
            raise e.error from None

    # --- exports -------------------------------------------------------------------------

    async def list_exports(self, below: Layer, readonly: bool, is_tls: bool) -> Iterable[Export]:
        if self.single:
            archive = self.single_archive
            assert archive is not None
            if self.entry is None:
                return archive.exports
            return [Export(self.entry, describe(self.entry, archive.lookup(self.entry)))]
        names = await ProductNames.of(below, readonly, is_tls)
        out: list[Export] = []
        for export in names.below:
            try:
                archive = await self._get(export)
                if self.entry is not None:
                    out.append(Export(export, describe(self.entry, archive.lookup(self.entry))))
                    continue
            except NBDError as e:
                log.warning("tar: not listing the members of %r: %s", export, e.message)
                continue
            out += [Export(names.join(export, e.name), e.description) for e in archive.exports]
        return out

    async def default_export(self, below: Layer, readonly: bool, is_tls: bool) -> str:
        if self.single:
            assert self.single_archive is not None
            if self.entry is not None:
                return self.entry
            exports = self.single_archive.exports
            return exports[0].name if exports else ""
        if self.entry is not None:
            return await below.default_export(readonly, is_tls)
        # The first member of the first archive that has one: later archives stay unread.
        names = await ProductNames.of(below, readonly, is_tls)
        for export in names.below:
            try:
                archive = await self._get(export)
            except NBDError:
                continue  # list_exports logs why
            if archive.exports:
                return names.join(export, archive.exports[0].name)
        return ""

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Served]:
        if self.single:
            archive_export = ""
            item = export_name
        elif self.entry is not None:
            archive_export = export_name
            item = ""
        else:
            names = await ProductNames.of(below, readonly, is_tls)
            archive_export, item = names.split(export_name)
        archive = self.single_archive if self.single else await self._get(archive_export)
        assert archive is not None
        name = self.entry if self.entry is not None else normalize_name(item)
        served = Served.of(name, archive.lookup(name))
        return await below.open(readonly, archive_export, is_tls), served

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


def _check_cancelled(members: int) -> None:
    trio.from_thread.check_cancelled()


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
