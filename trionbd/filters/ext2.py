"""ext2: serve files stored inside an ext2, ext3 or ext4 file system image.

The layer below is a file system image; the exports are regular files inside it. Their
bytes are read straight from the image: a request is mapped through the file's extent
tree or block map (``trionbd.formats.ext2``) and becomes one read of the layer below per
physically contiguous run, so a file in one extent reads as fast as the image itself.

Names:

* Without ``ext2file`` (or with ``ext2file=exportname``, nbdkit's spelling for the same
  thing) every regular file is an export named by its absolute path, ``/dir/disk.img``;
  ``nbdinfo --list`` shows them all, sorted by path, with their size, mode and
  modification time, and a client may ask for ``dir/disk.img`` too. Any path that
  reaches a regular file works, through symbolic links (followed, at most 40 per lookup)
  and ``..``; a directory, device, FIFO, socket, dangling link or link loop is refused
  with an error that says what the name is. The default export is the first file listed.
* With ``ext2file=/PATH`` the one file at PATH is served whatever export name a client
  asks for (as nbdkit's ext2 filter); it is listed, and is the default, as ``/PATH``.
* When the layer below lists several images (``file dir=DIR``) the names are
  ``IMAGE/dir/disk.img`` (``IMAGE//dir/disk.img`` is accepted too); with
  ``ext2file=/PATH`` they are just ``IMAGE``, each serving its own file PATH.

Start-up and damage: the superblock, every group descriptor and (without ``ext2file``)
every regular file with its inode and extent tree or block map are read once, through
one context of the layer below that lives until the server exits; inodes and file maps
are cached. A single image that is not a valid ext2/3/4 file system, or whose
``ext2file`` is missing, stops the server at start-up (exit status 1, message naming
the image and the problem). Under ``file dir=`` each image is opened when first needed
and kept for the server's life (restart the server after replacing one); a damaged one
is left out of the list with a warning, a client asking for it gets the reason, and it
is read again when next needed (so an image repaired in place, by e2fsck say, is then
served). An image added to the directory while the server runs is listed, and served
when asked for. Reading a large file system's list of files logs its progress after a
second.
A damaged inode, directory or extent tree affects only the files
that use it: they are left out of the list with a warning (so every listed file opens),
a client asking for one gets the reason, and every other file is served.

Holes and uninitialized extents read as zeroes; block status reports them as holes and
structured reads send them as hole chunks.

Writes (unless the server is read-only, ``-r``) change the file's existing blocks in
place; no metadata is ever written, so the image stays consistent (``e2fsck -fn``
clean). This filter does not allocate blocks, so:

* A write that touches a hole or an uninitialized extent fails with ENOSPC ("block
  allocation is not supported") and nothing of it is written (the whole request is
  checked first) — unless the bytes meant for the hole are all zero, which it already
  reads as.
* The size is fixed: writes past the end fail with ENOSPC.
* Zeroing is advertised: allocated blocks are zeroed in place by the layer below, holes
  already read as zero. With NO_HOLE (the client asks for allocated zeroes) a range
  touching a hole fails with ENOSPC. Fast zero is advertised when the layer below has it.
* Trim is not advertised (it would free blocks).
* Files with inline data (``inline_data``: the bytes live in the inode) and file systems
  the reader must not write to (unknown read-only-compatible features, marked with
  errors, ...) are served read-only. A file's modification time is not updated.

A journal that needs recovery (``needs_recovery``: transactions not yet replayed) means
the file system may be inconsistent: such an image is refused, unless the server is
read-only (``-r``) and ``ext2-allow-recovery=true`` is given; then it is served as it is
on disk, without the journal's changes.

Examples:
  trionbd file fs.img --filter=ext2
  trionbd file fs.img --filter=ext2 ext2file=/disk.img
  trionbd -r file dir=/var/images --filter=ext2
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from ..chain import (
    ConfigError,
    ContainerFilter,
    Export,
    Extent,
    NBDError,
    Next,
    Param,
    Progress,
    ZeroMode,
    describe_file,
    parse_bool,
)
from ..formats import FormatError, Pread
from ..formats.ext2 import (
    Ext2FS,
    Ext2NotFound,
    Ext2NotRegularFile,
    Ext2SymlinkLoop,
    Ext2Unsupported,
    FileMap,
    Inode,
)
from ..protocol.constants import UNALLOCATED
from . import _formats
from ._formats import Piece

log = logging.getLogger(__name__)

EXPORTNAME = "exportname"
"""``ext2file=exportname``: the client's export name is the path (nbdkit's meaning)."""


@dataclass(frozen=True, slots=True)
class Image:
    """One file system image of the layer below, opened once and kept."""

    fs: Ext2FS
    label: str
    """How messages name the image."""
    exports: list[Export]
    """Every regular file as an export named by its path (empty with ``ext2file=PATH``)."""


@dataclass(frozen=True, slots=True)
class File:
    """The handle of one open export: a regular file of an image."""

    where: str
    """How messages name the file: ``ext2: IMAGE: 'PATH'``."""
    inode: Inode
    fmap: FileMap
    read_only: bool
    """The file must not be written: its data is inline in its inode, or the reader must
    not write to the file system (its reason is logged when the image is opened)."""

    @property
    def description(self) -> str:
        return describe(self.inode)


def describe(inode: Inode) -> str:
    """The export description of a file: its size, mode and modification time."""
    return describe_file(inode.size, mode=inode.mode, mtime=inode.mtime)


def _open_error(label: str, path: str, e: FormatError) -> NBDError:
    """The error a client gets for a path that does not lead to a servable file."""
    if isinstance(e, Ext2NotRegularFile):  # the reader's messages name the path
        return NBDError(errno.ENOENT, f"ext2: {label}: {e}; only regular files are exports")
    if isinstance(e, Ext2NotFound | Ext2SymlinkLoop):
        return NBDError(errno.ENOENT, f"ext2: {label}: {e}")
    code = errno.ENOTSUP if isinstance(e, Ext2Unsupported) else errno.EIO
    return NBDError(code, f"ext2: {label}: {path!r}: {e}")


def _no_allocation(h: File, hole: Piece, what: str) -> NBDError:
    """The error for a request that would need blocks allocated in ``hole``."""
    start, length, _ = hole
    return NBDError(
        errno.ENOSPC,
        f"{h.where}: cannot {what}: bytes {start}..{start + length} of the file are a hole "
        "or an uninitialized extent, and block allocation is not supported (nothing was "
        "written)",
    )


class Ext2Filter(ContainerFilter[Image, File]):
    """Serve regular files inside an ext2/3/4 image of the layer below."""

    name = "ext2"
    process_safe = True  # each worker reads the file system's metadata at start-up
    params = (
        Param(
            "ext2file",
            "serve only the file at PATH (absolute, inside the file system); 'exportname': "
            "the export name is the path (the default: every regular file is an export)",
            metavar="PATH",
        ),
        Param(
            "ext2-allow-recovery",
            "serve an image whose journal needs recovery, as it is on disk (needs -r)",
            parse_bool,
            default="false",
        ),
    )
    nonblocking = True
    container = "image"
    entry_param = "ext2file"
    keep_context = True  # inodes and file maps are read when a file is opened
    reread_damaged = True  # an image repaired in place (e2fsck) is then served

    def __init__(self, ext2file: str | None = None, ext2_allow_recovery: bool = False):
        if ext2file is not None and ext2file.strip("/") == "":
            raise ConfigError(f"ext2: ext2file={ext2file!r} names no file (give /PATH)")
        super().__init__(None if ext2file in (None, EXPORTNAME) else ext2file)
        self.allow_recovery = ext2_allow_recovery

    def label(self, export: str) -> str:
        return f"image {super().label(export)}"

    async def read_index(self, pread: Pread, size: int, label: str, progress: Progress) -> Image:
        """Read the superblock, group descriptors and (without ``ext2file``) every file."""

        def skip(path: str, e: FormatError) -> None:
            log.warning("ext2: %s: not listing %r: %s", label, path, e)

        try:
            fs = await Ext2FS.open(pread, size, allow_needs_recovery=True)
            self._check_recovery(fs, label)
            await fs.check_group_descriptors()
            files = []
            if self.entry is None:
                async for path, inode in fs.iter_files(skip):
                    try:  # only files that open are listed (nbdinfo --list opens them all)
                        await fs.extents(inode.ino)
                    except FormatError as e:
                        skip(path, e)
                        continue
                    files.append(Export(path, describe(inode)))
                    progress.members += 1
                files.sort(key=lambda e: e.name)  # directory order means nothing to a reader
        except FormatError as e:
            hint = await _formats.compression_hint(pread, size)
            raise NBDError(errno.EIO, f"ext2: {label}: {e}{hint}") from None
        if fs.read_only_reason:
            log.warning("ext2: %s is served read-only: %s", label, fs.read_only_reason)
        return Image(fs, label, files)

    def _check_recovery(self, fs: Ext2FS, label: str) -> None:
        """Refuse an image whose journal needs recovery unless explicitly allowed."""
        assert self.lifetime is not None
        if not fs.needs_recovery:
            return
        problem = (
            f"ext2: {label}: the journal needs recovery (feature needs_recovery): the file "
            "system may be inconsistent until e2fsck replays the journal"
        )
        if not self.allow_recovery:
            raise NBDError(
                errno.EPERM,
                f"{problem}; to serve it as it is on disk anyway, use -r and "
                "ext2-allow-recovery=true",
            )
        if not self.lifetime.readonly:
            raise NBDError(
                errno.EPERM, f"{problem}; ext2-allow-recovery=true needs a read-only server (-r)"
            )

    async def member(self, index: Image, name: str) -> File:
        """The regular file at path ``name`` in the image."""
        fs = index.fs
        try:
            inode = await fs.resolve_regular(name)
            fmap = await fs.extents(inode.ino)
        except FormatError as e:
            raise _open_error(index.label, name, e) from None
        read_only = fs.read_only_reason is not None or fmap.inline is not None
        return File(f"ext2: {index.label}: {name!r}", inode, fmap, read_only)

    # --- capabilities --------------------------------------------------------------------

    async def get_size(self, next: Next, h: File) -> int:
        return h.inode.size

    async def export_description(self, next: Next, h: File) -> str | None:
        return describe(h.inode)

    async def can_trim(self, next: Next, h: File) -> bool:
        return False

    async def can_zero(self, next: Next, h: File) -> ZeroMode:
        return ZeroMode.NONE if await next.can_zero() is ZeroMode.NONE else ZeroMode.NATIVE

    async def can_extents(self, next: Next, h: File) -> bool:
        return True

    # --- data ----------------------------------------------------------------------------

    async def pread(self, next: Next, h: File, count: int, offset: int, flags: int) -> bytes:
        fmap = h.fmap
        if fmap.inline is not None:
            return fmap.inline[offset : offset + count]
        physical = fmap.physical(offset, count)
        if physical is not None:  # inside one run: one call below
            return await next.pread(count, physical, flags)
        return await _formats.read(next, fmap.lookup(offset, count), offset, flags)

    async def pwrite(self, next: Next, h: File, buf: bytes, offset: int, flags: int) -> None:
        physical = h.fmap.physical(offset, len(buf))
        if physical is not None:
            await next.pwrite(buf, physical, flags)
            return
        segments = h.fmap.lookup(offset, len(buf))

        def refuse(hole: Piece) -> NBDError:
            return _no_allocation(h, hole, f"write {len(buf)} bytes at offset {offset}")

        await _formats.write(next, segments, buf, offset, flags, refuse)

    async def zero(self, next: Next, h: File, count: int, offset: int, flags: int) -> None:
        def refuse(hole: Piece) -> NBDError:
            return _no_allocation(h, hole, f"write {count} allocated zero bytes at offset {offset}")

        await _formats.zero(next, h.fmap.lookup(offset, count), flags, refuse)

    async def extents(
        self, next: Next, h: File, count: int, offset: int, flags: int
    ) -> list[Extent]:
        if h.fmap.inline is not None:
            return [Extent(offset, count, 0)]
        return [
            Extent(s.offset, s.length, 0 if s.physical is not None else UNALLOCATED)
            for s in h.fmap.lookup(offset, count)
        ]

    async def cache(self, next: Next, h: File, count: int, offset: int, flags: int) -> None:
        if h.fmap.inline is None:
            await _formats.each_stored(next.cache, h.fmap.lookup(offset, count), flags)


FILTER = Ext2Filter
