"""zip: serve the members of a zip archive as exports, read-only.

The layer below holds a zip archive (Info-ZIP's zip, Python's zipfile, Windows and macOS
archivers; ZIP64 for members and archives past 4 GiB or more than 65 535 entries; data
descriptors; UTF-8 and CP437 names; a self-extractor's stub in front). Every file member
is an export named by its path in the archive (``dir/disk.img``); directories are not
exports. The default export is the first member. Descriptions (``nbdinfo --list``) give
the size, the compression and the modification time.

The archive's central directory is read at start-up, before any client connects; a
damaged one (or no zip archive at all) stops the server with exit status 1 and a message
naming the archive and the byte offset. A member's local header, which says where its
data starts, is read when the member is first opened; a damaged one refuses that member
with the message, the others are served.

* Stored members are served by offset arithmetic straight from the layer below. Their
  CRC-32 is not checked (that would read the whole member on the first open).
* Deflated members are served with random access: the first read inflates the member
  once, checking its size and CRC-32, records a checkpoint about every MiB and keeps
  the inflated bytes in an unlinked temporary file in ``$TMPDIR`` (default /var/tmp;
  sparse, at most the member's size; all kept for the server's life; progress is
  logged for large members). Reads are then reads of that file, for every connection.
  Where the file could not be written (a full disk: logged once), a read inflates the
  checkpoint interval(s) it falls in (about 1 MiB). A damaged member fails its reads
  with EIO and the message.
* Members that cannot be served (encrypted, compressed with another method such as
  bzip2 or LZMA, stored on another disk of a split archive) are listed, with the reason
  in their description, and refused when opened with a message saying why.

Members are read-only (a write would break the archive's CRC): writes fail with EPERM.
Multi-conn is advertised; block status reports everything as data.

When the layer below lists several exports (``file dir=DIR``, an ``s3`` prefix) each of
them is an archive, and the exports are named ``ARCHIVE/MEMBER``. Each archive's central
directory is read the first time a client lists or opens it and is kept for the
server's life. A damaged archive is then not listed (a warning says why) and opening one
of its names is refused with the message, while the other archives are served.

Examples:
  trionbd file images.zip --filter=zip
  trionbd file images.zip --filter=zip zip-entry=disk.img
  trionbd file dir=/srv/zips --filter=zip      # exports a.zip/x, b.zip/y, ...
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import trio

from ..chain import (
    BlockSize,
    BuildOnce,
    CacheMode,
    ContainerFilter,
    Export,
    Layer,
    NBDError,
    Next,
    Param,
    Progress,
    describe_file,
)
from ..formats import FormatError, Pread
from ..formats.blocks import BlockFile, FileCache
from ..formats.deflate import DeflateStream, inflate_interval, intervals
from ..formats.zip import (
    DEFLATED,
    ZipIndex,
    ZipMember,
    deflated_stream,
    member_data_offset,
    read_zip,
)
from ..nursery import Lifetime
from . import _compressed, _formats

T = TypeVar("T")


def describe(member: ZipMember) -> str:
    """``regular file, 1048576 bytes, deflated to 523000 bytes, mtime
    2024-05-01T12:00:00Z`` (``stored``, or ``cannot be served: encrypted``)."""
    if member.unsupported is not None:
        how = f"cannot be served: {member.unsupported}"
    elif member.method == DEFLATED:
        how = f"deflated to {member.compressed_size} bytes"
    else:
        how = "stored"
    return describe_file(member.size, mtime=member.mtime, detail=f", {how}")


def _message(e: FormatError) -> str:
    return str(e).removeprefix("zip: ")


@dataclass(frozen=True, slots=True)
class Archive:
    """The central directory of one archive, and what was learnt of its members since."""

    index: ZipIndex
    label: str
    members: dict[str, ZipMember]
    """By name, in central directory order; a name written twice has its last entry."""
    exports: tuple[Export, ...]
    starts: BuildOnce[str, int]
    """Where each member opened so far has its data (from its local header)."""
    inflated: BuildOnce[str, Inflated]
    """Each deflated member read so far, inflated once."""


@dataclass(frozen=True, slots=True)
class Inflated:
    """A deflated member inflated once: its checkpoints, and its bytes kept in an
    unlinked temporary file that every connection reads (filled by that first pass;
    an interval that could not be written there is inflated again when read)."""

    stream: DeflateStream
    cache: FileCache


@dataclass(slots=True)
class Member:
    """The handle of one connection: a member of an archive."""

    archive: Archive
    member: ZipMember
    start: int
    """Where its data starts in the archive."""
    read: Callable[[int, int], Awaitable[bytes]] | None = None
    """``read(offset, length)`` of a deflated member on this connection, made at its
    first read: the member's temporary file, with this connection's input for the
    intervals the file lacks."""
    read_only: bool = True

    @property
    def description(self) -> str:
        return describe(self.member)


class ZipFilter(ContainerFilter[Archive, Member]):
    """Serve the members of the zip archive(s) below as exports."""

    name = "zip"
    # each worker reads the central directory and makes its own
    # checkpoints of what it reads
    process_safe = True
    params = (
        Param(
            "zip-entry",
            "serve only member NAME, whatever export name a client asks for; it is then "
            "the one export listed and the default. Over several archives, the exports "
            "are the archives' names, each serving its own member NAME",
            metavar="NAME",
        ),
    )
    nonblocking = False  # the first read of a deflated member inflates all of it
    container = "archive"
    entry_param = "zip-entry"
    keep_context = True  # local headers and deflated data are read after the index

    def __init__(self, zip_entry: str | None = None):
        super().__init__(zip_entry)
        self.limiter: trio.CapacityLimiter | None = None
        self.files: list[BlockFile] = []
        """The temporary files of the members inflated so far (closed at unload)."""

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        self.limiter = trio.CapacityLimiter(_compressed.DecompressFilter.THREADS)
        await super().after_fork(lifetime, below)

    async def cleanup(self) -> None:
        for file in self.files:
            file.close()
        await super().cleanup()

    async def offload(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread (inflating)."""
        return await trio.to_thread.run_sync(fn, limiter=self.limiter)

    # --- the index -----------------------------------------------------------------------

    async def read_index(self, pread: Pread, size: int, label: str, progress: Progress) -> Archive:
        """Read the central directory; the local headers and deflated data are read
        later through the same ``pread`` (a context kept for the server's life)."""
        try:
            index = await read_zip(pread, size)
        except FormatError as e:
            hint = await _formats.compression_hint(pread, size)
            raise NBDError(errno.EIO, f"zip: {label}: {_message(e)}{hint}") from None
        members = {m.name: m for m in index.members}
        progress.members = len(members)

        async def start(name: str) -> int:
            try:
                return await member_data_offset(pread, index, members[name])
            except FormatError as e:
                raise NBDError(errno.EIO, f"zip: {label}: {_message(e)}") from None

        async def inflate(name: str) -> Inflated:
            member = members[name]
            data = await starts.get(name)
            what = f"{label}: member {name!r}"
            file = _compressed.temporary_file(f"zip: {what}")
            try:
                async with _compressed.reading(
                    self.lifetime, "zip", what, member.compressed_size
                ) as done:
                    indexed = await deflated_stream(
                        pread, index, member, offload=self.offload,
                        progress=lambda offset: done(offset - data), output=file.write,
                    )  # fmt: skip
                    done.result = f"{len(indexed.checkpoints)} checkpoints"
            except FormatError as e:
                file.close()
                raise NBDError(errno.EIO, f"zip: {label}: {_message(e)}") from None
            except BaseException:  # the layer below failed, or cancelled: tried again later
                file.close()
                raise
            self.files.append(file)
            cache = FileCache(
                *intervals(indexed), file, filled=file.error is None, lock=trio.Lock,
                offload=trio.to_thread.run_sync,
            )  # fmt: skip
            return Inflated(indexed, cache)

        starts: BuildOnce[str, int] = BuildOnce(start)
        exports = tuple(Export(m.name, describe(m)) for m in members.values())
        return Archive(index, label, members, exports, starts, BuildOnce(inflate))

    async def member(self, index: Archive, name: str) -> Member:
        member = index.members.get(name)
        if member is None:
            raise NBDError(errno.ENOENT, f"zip: {index.label}: no member named {name!r}")
        if member.unsupported is not None:
            raise NBDError(
                errno.EPERM,
                f"zip: {index.label}: member {name!r} cannot be served: {member.unsupported}",
            )
        return Member(index, member, await index.starts.get(name))

    # --- per connection ------------------------------------------------------------------

    async def export_description(self, next: Next, h: Member) -> str | None:
        return h.description

    async def get_size(self, next: Next, h: Member) -> int:
        return h.member.size

    async def block_size(self, next: Next, h: Member) -> BlockSize | None:
        return None

    async def can_write(self, next: Next, h: Member) -> bool:
        return False

    async def can_extents(self, next: Next, h: Member) -> bool:
        return False  # every byte is data

    async def can_cache(self, next: Next, h: Member) -> CacheMode:
        return CacheMode.EMULATE

    async def can_multi_conn(self, next: Next, h: Member) -> bool:
        return True  # read-only

    async def pread(self, next: Next, h: Member, count: int, offset: int, flags: int) -> bytes:
        if offset + count > h.member.size:
            raise NBDError(
                errno.EINVAL,
                f"zip: read of {count} bytes at offset {offset} is beyond the end of member "
                f"{h.member.name!r} ({h.member.size} bytes)",
            )
        if h.member.method != DEFLATED:
            return await next.pread(count, h.start + offset, flags)
        read = h.read
        if read is None:
            inflated = await h.archive.inflated.get(h.member.name)
            load = partial(inflate_interval, _formats.reader(next), inflated.stream,
                           offload=self.offload)  # fmt: skip
            read = h.read = partial(inflated.cache.read, load=load)
        try:
            return await read(offset, count)
        except FormatError as e:
            raise NBDError(errno.EIO, f"zip: {h.archive.label}: {_message(e)}") from None


FILTER = ZipFilter
