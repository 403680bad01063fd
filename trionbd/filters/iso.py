"""iso: serve the files of an ISO 9660 image as exports, read-only.

The layer below holds an ISO 9660 image (as genisoimage, mkisofs and xorriso make
them: CD and DVD images, installer ISOs). Every regular file is an export named by its
absolute path in the image, ``/dir/file.img``, as the ext2 filter names files; a client
may leave out the leading ``/``. Names come from the Rock Ridge extensions when the
image has them (POSIX names, deep directories), else from the Joliet tree, else the
plain ISO 9660 names (``FILE.EXT`` without its ``;1``). Directories are not exports.
The list is sorted by path, and the default export is the first file in it.
Descriptions (``nbdinfo --list``) give the size and modification time.

The directory tree is read once, at start-up, before any client connects; a damaged
image (or no ISO 9660 image at all) stops the server with exit status 1 and a message
naming the image and the byte offset (a directory record, a volume descriptor). Files
are then served by offset arithmetic straight from the layer below; a file of 4 GiB or
more, recorded in several extents, is one export.

Read-only: writes fail with EPERM. Multi-conn is advertised; block status reports
everything as data.

When the layer below lists several exports (``file dir=DIR``) each of them is an image,
and the exports are named ``IMAGE/dir/file.img``. Each image's tree is read the first
time a client lists or opens it and is kept for the server's life. A damaged image is
then not listed (a warning says why) and opening one of its names is refused with the
message, while the other images are served.

Examples:
  trionbd file install.iso --filter=iso
  trionbd file install.iso --filter=iso iso-file=/images/disk.img
  trionbd file dir=/srv/isos --filter=iso      # exports a.iso/x, b.iso/dir/y, ...
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ..chain import (
    BlockSize,
    CacheMode,
    ContainerFilter,
    Export,
    NBDError,
    Next,
    Param,
    Progress,
    describe_file,
)
from ..formats import FormatError, Pread
from ..formats.iso import IsoFile, read_iso
from . import _formats


def describe(file: IsoFile) -> str:
    """``regular file, 1048576 bytes, mtime 2024-05-01T12:00:00Z``."""
    return describe_file(file.size, mtime=file.mtime)


@dataclass(frozen=True, slots=True)
class Image:
    """The files of one image, by path."""

    label: str
    files: dict[str, IsoFile]
    exports: tuple[Export, ...]
    """Every file, sorted by path."""


@dataclass(frozen=True, slots=True)
class File:
    """The handle of one connection: a file of an image."""

    file: IsoFile
    start: int | None
    """Where the file's data starts in the image when it is in one extent, else None."""
    read_only: bool = True

    @property
    def description(self) -> str:
        return describe(self.file)


class IsoFilter(ContainerFilter[Image, File]):
    """Serve the files of the ISO 9660 image(s) below as exports."""

    name = "iso"
    process_safe = True  # each worker reads the image's directory tree at start-up
    params = (
        Param(
            "iso-file",
            "serve only the file at PATH, whatever export name a client asks for; it is "
            "then the one export listed and the default. Over several images, the exports "
            "are the images' names, each serving its own file PATH",
            metavar="PATH",
        ),
    )
    nonblocking = True  # every data callback is offset arithmetic and calls below
    container = "image"
    entry_param = "iso-file"

    def __init__(self, iso_file: str | None = None):
        super().__init__(None if iso_file is None else "/" + iso_file.lstrip("/"))

    async def read_index(self, pread: Pread, size: int, label: str, progress: Progress) -> Image:
        try:
            image = await read_iso(pread, size)
        except FormatError as e:
            hint = await _formats.compression_hint(pread, size)
            message = str(e).removeprefix("iso: ")
            raise NBDError(errno.EIO, f"iso: {label}: {message}{hint}") from None
        files = {f.path: f for f in sorted(image.files, key=lambda f: f.path)}
        progress.members = len(files)
        exports = tuple(Export(path, describe(f)) for path, f in files.items())
        return Image(label, files, exports)

    async def member(self, index: Image, name: str) -> File:
        file = index.files.get("/" + name.lstrip("/"))
        if file is None:
            raise NBDError(errno.ENOENT, f"iso: {index.label}: no file named {name!r}")
        start = file.extents[0][0] if len(file.extents) == 1 else None
        return File(file, start)

    # --- per connection ------------------------------------------------------------------

    async def export_description(self, next: Next, h: File) -> str | None:
        return h.description

    async def get_size(self, next: Next, h: File) -> int:
        return h.file.size

    async def block_size(self, next: Next, h: File) -> BlockSize | None:
        return None

    async def can_write(self, next: Next, h: File) -> bool:
        return False

    async def can_extents(self, next: Next, h: File) -> bool:
        return False  # every byte is data

    async def can_cache(self, next: Next, h: File) -> CacheMode:
        return CacheMode.EMULATE

    async def can_multi_conn(self, next: Next, h: File) -> bool:
        return True  # read-only

    async def pread(self, next: Next, h: File, count: int, offset: int, flags: int) -> bytes:
        if offset + count > h.file.size:
            raise NBDError(
                errno.EINVAL,
                f"iso: read of {count} bytes at offset {offset} is beyond the end of "
                f"{h.file.path!r} ({h.file.size} bytes)",
            )
        if h.start is not None:  # the common case: one extent, one call below
            return await next.pread(count, h.start + offset, flags)
        pieces = [(s.offset, s.length, s.physical) for s in h.file.segments(offset, count)]
        return await _formats.read(next, pieces, offset, flags)


FILTER = IsoFilter
