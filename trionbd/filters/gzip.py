"""gzip: serve the decompressed bytes of a gzip file, read-only, with random access.

The layer below holds a gzip file: one member (``gzip``) or several (``pigz``, ``cat
a.gz b.gz``), optionally followed by zero padding. The export is its decompressed data.
A gzip file does not say how large its data is (the trailer keeps the size modulo
2^32), so the whole file is read once before it is served: every member is inflated,
its CRC-32 and size checked, a checkpoint recorded about every MiB of output (the
position and the 32 KiB of history needed to start inflating there), and the data
written to an unlinked temporary file in ``$TMPDIR`` (default ``/var/tmp``, as
nbdkit's gzip filter; it needs room for the whole decompressed data, and takes the
page cache's memory). Reads are then ``pread`` calls of that file. When the data is
not in the file (the index was loaded with ``index=``, or the disk was full), a read
inflates the checkpoint interval(s) it falls in (about 1 MiB: a few milliseconds),
wherever it is, and writes them to the file; checkpoints take at most 32 KiB each
(less for compressible data).

The file is read at start-up (progress is logged for large files: a 1 GiB file takes a
few seconds); a file that is not valid gzip stops the server with exit status 1 and a
message naming the byte offset: bad magic, a truncated file, a CRC-32 or size that does
not match the data, corrupt deflate data, trailing bytes that are neither a member nor
zero padding. With ``index=FILE`` the checkpoints are saved to FILE, and the next start
loads them instead of reading the whole file again, if the gzip file is still the same
(same size, inode and modification time); otherwise it is read again and FILE
rewritten. ``index=`` needs the ``file`` plugin (or another plugin that can tell when
its file changes) directly below this filter.

When the layer below lists several exports (``file dir=DIR``) each one is decompressed
on its own, and the export list is the one below, unchanged: ``--filter=tar
--filter=gzip`` over a directory of ``.tar.gz`` files lists the members of each. An
export is read when a client first opens it and kept for the server's life; one that is
not valid gzip is refused with the message while the others are served.

Read-only: writes fail with EROFS. Multi-conn is advertised; block status reports
everything as data; a cache request decompresses into the connection's reader.

Examples:
  trionbd file disk.img.gz --filter=gzip
  trionbd file disk.img.gz --filter=gzip index=/var/cache/disk.img.gz.index
  trionbd file dir=/srv/backups --filter=tar --filter=gzip   # members of every .tar.gz
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..chain import Layer, Param, Plugin, StartupError
from ..formats import FormatError, Offload, Pread
from ..formats.blocks import BlockFile
from ..formats.gzip import GzipIndex, GzipReader, StaleIndex, index_gzip
from ._compressed import Blocks, Decompressed, DecompressFilter, Progress, count_text, size_text

if TYPE_CHECKING:
    from ..nursery import Lifetime

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Gzip:
    """An indexed gzip file; each connection inflates it through a :class:`GzipReader`.
    ``filled``: its data was written to the filter's file while it was indexed."""

    index: GzipIndex
    offload: Offload
    filled: bool

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def description(self) -> str:
        members = count_text(len(self.index.members), "member")
        return (
            f"{self.size} bytes, gzip-compressed ({size_text(self.index.input_size)} in {members})"
        )

    def reader(self, pread: Pread) -> Blocks:
        return GzipReader(pread, self.index, offload=self.offload)


class GzipFilter(DecompressFilter):
    """Serve the decompressed bytes of the gzip file(s) below."""

    name = "gzip"
    # each worker process would inflate the whole file again at
    # start-up and hold its own checkpoints
    process_safe = False
    params = (
        Param(
            "index",
            "keep the checkpoints in FILE and load them on the next start while the gzip "
            "file is unchanged (one gzip file only, with the file plugin directly below)",
            metavar="FILE",
        ),
    )

    def __init__(self, index: str | None = None):
        super().__init__()
        self.index_file = None if index is None else os.path.abspath(index)
        self.plugin: Plugin | None = None
        """The plugin directly below, which tells when the input changes (``index=``)."""

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        if self.index_file is not None:
            if not isinstance(below.target, Plugin):
                raise StartupError(
                    f"gzip: index={self.index_file} needs a plugin directly below gzip that "
                    f"can tell when its file changes (file can), not the {below.name} filter"
                )
            self.plugin = below.target
        await super().after_fork(lifetime, below)
        if self.index_file is not None and not self.single:
            raise StartupError(
                f"gzip: index={self.index_file} keeps the index of one gzip file, but the "
                f"layer below lists several exports"
            )

    async def load(
        self, export: str, pread: Pread, size: int, label: str, progress: Progress,
        file: BlockFile,
    ) -> Decompressed:  # fmt: skip
        async def index() -> Gzip:
            index = await index_gzip(
                pread, size, progress=progress, offload=self.offload, output=file.write
            )
            return Gzip(index, self.offload, file.error is None)

        if self.index_file is None or self.plugin is None:
            return await index()
        identity = await self.plugin.export_identity(export)
        if identity is None:
            raise StartupError(
                f"gzip: index={self.index_file}: the {self.plugin.name} plugin cannot tell "
                f"whether {label} changes (a block device?), so a kept index could be stale"
            )
        saved = await self._saved(size, identity, label)
        if saved is not None:
            return Gzip(saved, self.offload, False)
        gzip = await index()
        if await self.plugin.export_identity(export) == identity:
            await self._save(gzip.index, identity)
        else:
            log.warning("gzip: %s changed while it was read: index not saved", label)
        return gzip

    async def _saved(self, size: int, identity: bytes, label: str) -> GzipIndex | None:
        """The index kept in the index file, if it is there and for this input."""
        path = self.index_file
        assert path is not None
        try:
            data = await trio.to_thread.run_sync(_read_file, path)
        except FileNotFoundError:
            log.info("gzip: %s: no index in %s yet: reading the whole file", label, path)
            return None
        except OSError as e:
            log.warning("gzip: cannot read the index %s (%s): reading the whole file", path, e)
            return None
        try:
            index = GzipIndex.from_bytes(data, size, identity)
        except StaleIndex as e:
            log.info("gzip: %s: rebuilding the index %s: %s", label, path, e)
            return None
        except FormatError as e:
            log.warning("gzip: %s: the index %s is unusable (%s): rebuilding it", label, path, e)
            return None
        log.info("gzip: %s: index loaded from %s", label, path)
        return index

    async def _save(self, index: GzipIndex, identity: bytes) -> None:
        path = self.index_file
        assert path is not None
        try:
            await trio.to_thread.run_sync(_write_file, path, index.to_bytes(identity))
        except OSError as e:
            log.warning("gzip: cannot save the index to %s: %s", path, e)
        else:
            log.info("gzip: index saved to %s", path)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed over it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


FILTER = GzipFilter
