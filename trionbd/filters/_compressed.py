"""What the gzip, xz and zstd filters share: serving the decompressed bytes of every
export of the layer below, each on its own, read-only.

These filters are not containers: they keep the export list of the layer below as it
is (names and descriptions), so ``--filter=tar --filter=gzip`` over ``file dir=DIR``
lists the members of every ``.tar.gz`` in DIR. What each export decompresses to is a
:class:`Decompressed` made by the filter's :meth:`DecompressFilter.load` (an index of a
compressed file, or a temporary file holding its output) and kept for the server's life:

* when the layer below has only its unnamed default export (``file disk.gz``), at
  start-up, before any client connects; a file that cannot be read as the format stops
  the server (exit status 1, the message names the file and the byte offset);
* otherwise when a client first opens an export (``nbdinfo --list`` opens every one);
  a file that cannot be read as the format is refused with the message (and stays
  refused until the server restarts), while the other exports are served. A failure of
  the layer below (a missing file, an I/O error) is tried again by the next client.

What has been decompressed is kept, for every connection, in an unlinked temporary file
per export in ``$TMPDIR`` (default ``/var/tmp``), written at the decompressed offsets: a
read of bytes already there is one ``pread`` of that file; a read of bytes not there yet
decompresses the block(s) it falls in (xz blocks, zstd frames, the intervals between
gzip checkpoints), through the connection's own context of the layer below, and writes
them there. Several requests for the same block, from any connections, wait for one
decompression of it. The file is sparse and grows to at most the export's size (the
gzip filter and plain zstd files fill it at start-up, as they decompress everything
then anyway); if it cannot be written (a full disk) that is logged once and reads
decompress what they need each time. Decompression runs in worker threads (at most one
per CPU per filter), so the server keeps serving while it runs.

Reading takes long for large files: after :data:`PROGRESS_AFTER` seconds the progress is
logged at INFO level every :data:`PROGRESS_EVERY` seconds, and the time it took once it
is done.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

import trio

from ..chain import (
    BlockSize,
    BuildOnce,
    CacheMode,
    Filter,
    Layer,
    NBDError,
    Next,
    ProductNames,
    StartupError,
)
from ..formats import FormatError, Pread
from ..formats.blocks import BlockFile, FileCache
from . import _formats

if TYPE_CHECKING:
    from ..nursery import Lifetime

log = logging.getLogger(__name__)

PROGRESS_AFTER = 1.0
"""Seconds of reading an input after which its progress is logged."""
PROGRESS_EVERY = 5.0
"""Seconds between two progress lines."""

T = TypeVar("T")


class Blocks(Protocol):
    """One connection's decompressor: the output is made of blocks, block ``i`` being
    ``sizes[i]`` bytes at ``starts[i]``; :meth:`load` decompresses one."""

    @property
    def starts(self) -> Sequence[int]: ...

    @property
    def sizes(self) -> Sequence[int]: ...

    async def load(self, i: int) -> bytes: ...


class Decompressed(Protocol):
    """What one export of the layer below decompresses to, as :meth:`load` makes it."""

    @property
    def size(self) -> int:
        """The decompressed size in bytes."""
        ...

    @property
    def description(self) -> str:
        """The export description (``nbdinfo``)."""
        ...

    @property
    def filled(self) -> bool:
        """:meth:`DecompressFilter.load` wrote all the output to the file."""
        ...

    def reader(self, pread: Pread) -> Blocks:
        """A decompressor for one connection, reading the compressed bytes through ``pread``."""
        ...


def temporary_directory() -> str:
    return os.environ.get("TMPDIR") or "/var/tmp"


def temporary_file(what: str) -> BlockFile:
    """An unlinked temporary file for decompressed data (``what`` names it in messages)."""
    where = temporary_directory()
    try:
        return BlockFile(tempfile.TemporaryFile(dir=where), what)
    except OSError as e:
        raise NBDError(
            e.errno or errno.EIO, f"{what}: cannot make a temporary file in {where}: {e}"
        ) from None


class Progress:
    """How far the reading of one input has got (:attr:`done` bytes of :attr:`total`);
    a reader's ``progress`` callback. Made by :func:`reading`."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.result = ""
        """What was read, for the line logged at the end (an export description)."""

    def __call__(self, offset: int) -> None:
        self.done = offset


@asynccontextmanager
async def reading(
    lifetime: Lifetime | None, name: str, what: str, total: int
) -> AsyncIterator[Progress]:
    """The :class:`Progress` of reading ``what`` (``total`` bytes) for filter ``name``:
    after :data:`PROGRESS_AFTER` seconds a task of the lifetime logs it at INFO every
    :data:`PROGRESS_EVERY` seconds until the block ends; a block that ends normally logs
    the time it took and ``progress.result`` (INFO when that was long, else DEBUG)."""
    progress = Progress(total)
    started = trio.current_time()
    reporting = trio.CancelScope()  # entered by the reporting task
    if lifetime is not None:
        lifetime.nursery.start_soon(_report, name, what, progress, reporting)
    try:
        yield progress
    finally:
        reporting.cancel()
    took = trio.current_time() - started
    level = logging.INFO if took >= PROGRESS_AFTER else logging.DEBUG
    log.log(level, "%s: %s: read in %.1f s: %s", name, what, took, progress.result)


async def _report(name: str, what: str, progress: Progress, scope: trio.CancelScope) -> None:
    """Log ``progress`` (a lifetime task, cancelled by ``scope`` when the reading ends)."""
    with scope:
        await trio.sleep(PROGRESS_AFTER)
        while True:
            log.info(
                "%s: reading %s: %d%% (%s of %s)",
                name,
                what,
                100 * progress.done // max(progress.total, 1),
                size_text(progress.done),
                size_text(progress.total),
            )
            await trio.sleep(PROGRESS_EVERY)


def count_text(n: int, thing: str) -> str:
    """``n`` things: ``"1 block"``, ``"3 blocks"``."""
    return f"{n} {thing}{'s' if n != 1 else ''}"


def size_text(n: int) -> str:
    """``n`` bytes in the largest unit that keeps it at least 1 (powers of 1024)."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(slots=True)
class Input:
    """One export of the layer below: what it decompresses to, and the file keeping the
    decompressed blocks (:class:`FileCache`, made when the first connection opens it)."""

    data: Decompressed
    file: BlockFile
    cache: FileCache | None = None


@dataclass(frozen=True, slots=True)
class Handle:
    """One connection: its export's input, and its own decompressor."""

    input: Input
    cache: FileCache
    blocks: Blocks


class _BelowFailed(Exception):
    """The layer below failed (not: the input is damaged). Not an ``NBDError``, so that
    ``BuildOnce`` does not remember it: a missing file may appear, an I/O error pass."""

    def __init__(self, error: NBDError):
        super().__init__(error.message)
        self.error = error


class DecompressFilter(Filter):
    """Base class of the gzip, xz and zstd filters; see the module docstring. A subclass
    sets ``name`` and defines :meth:`load`."""

    nonblocking = False  # a read may wait for a worker thread decompressing
    THREADS: ClassVar[int] = os.cpu_count() or 1
    """Worker threads decompressing at once, for all exports and connections."""

    def __init__(self) -> None:
        self.lifetime: Lifetime | None = None
        self.below: Layer | None = None
        self.single = True
        """The layer below has only its unnamed default export."""
        self.limiter: trio.CapacityLimiter | None = None
        self.inputs: BuildOnce[str, Input] = BuildOnce(self._build)
        """What each export of the layer below decompresses to, by its name there."""

    # --- what a filter supplies ------------------------------------------------------------

    async def load(
        self, export: str, pread: Pread, size: int, label: str, progress: Progress,
        file: BlockFile,
    ) -> Decompressed:  # fmt: skip
        """Read the compressed input of ``size`` bytes behind ``pread`` (export ``export``
        of the layer below, ``label`` in messages), calling ``progress`` with the input
        offset reached; a filter that decompresses it all may write the output to
        ``file`` at its offsets (and say so in ``filled``). Raise FormatError for an
        input that is not valid."""
        raise NotImplementedError

    # --- for subclasses ------------------------------------------------------------------

    async def offload(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread (the readers' :class:`~trionbd.formats.Offload`)."""
        return await trio.to_thread.run_sync(fn, limiter=self.limiter)

    # --- start-up ------------------------------------------------------------------------

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        self.lifetime, self.below = lifetime, below
        self.limiter = trio.CapacityLimiter(self.THREADS)
        self.single = (await ProductNames.of(below, lifetime.readonly, False)).single
        if self.single:
            try:
                await self._get("")
            except NBDError as e:
                raise StartupError(e.message) from None

    async def _get(self, export: str) -> Input:
        try:
            return await self.inputs.get(export)
        except _BelowFailed as e:
            raise e.error from None

    async def _build(self, export: str) -> Input:
        """Read export ``export`` of the layer below (the build function of :attr:`inputs`)."""
        below = self.below
        if below is None:
            raise NBDError(errno.EIO, f"{self.name}: used before after_fork")
        label = below.export_label(export)
        file = temporary_file(f"{self.name}: {label}")
        try:
            return Input(await self._load(export, label, file), file)
        except BaseException:
            file.close()
            raise

    async def _load(self, export: str, label: str, file: BlockFile) -> Decompressed:
        below = self.below
        assert below is not None

        def failed(e: NBDError) -> _BelowFailed:
            return _BelowFailed(NBDError(e.errno, f"{self.name}: {label}: {e.message}"))

        try:
            ctx = await below.open(True, export)
        except NBDError as e:
            raise failed(e) from None
        read = _formats.reader(ctx)

        async def pread(offset: int, length: int) -> bytes:
            try:
                return await read(offset, length)
            except NBDError as e:
                raise failed(e) from None

        try:
            size = await ctx.get_size()
            async with reading(self.lifetime, self.name, label, size) as progress:
                data = await self.load(export, pread, size, label, progress, file)
                progress.result = data.description
        except FormatError as e:
            message = str(e).removeprefix(f"{self.name}: ")
            raise NBDError(errno.EIO, f"{self.name}: {label}: {message}") from None
        finally:
            with trio.CancelScope(shield=True):
                await ctx.close()
        return data

    # --- per connection ------------------------------------------------------------------

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Handle]:
        export = "" if self.single else export_name
        source = await self._get(export)
        ctx = await below.open(True, export, is_tls)
        blocks = source.data.reader(_formats.reader(ctx))
        if source.cache is None:
            # Its writes to the file run in threads of their own: behind the limiter of
            # the decompressing ones, a block's readers waited for another decompression.
            source.cache = FileCache(
                blocks.starts, blocks.sizes, source.file, filled=source.data.filled,
                lock=trio.Lock, offload=trio.to_thread.run_sync,
            )  # fmt: skip
        return ctx, Handle(source, source.cache, blocks)

    async def cleanup(self) -> None:
        for source in self.inputs.cached().values():
            source.file.close()

    async def export_description(self, next: Next, h: Handle) -> str | None:
        return h.input.data.description

    async def get_size(self, next: Next, h: Handle) -> int:
        return h.input.data.size

    async def block_size(self, next: Next, h: Handle) -> BlockSize | None:
        return None  # the layer below's constraints are about the compressed bytes

    async def can_write(self, next: Next, h: Handle) -> bool:
        return False

    async def can_extents(self, next: Next, h: Handle) -> bool:
        return False  # every byte is data

    async def can_cache(self, next: Next, h: Handle) -> CacheMode:
        return CacheMode.EMULATE  # a read: decompresses into the file

    async def can_multi_conn(self, next: Next, h: Handle) -> bool:
        return True  # read-only: every connection sees the same bytes

    async def pread(self, next: Next, h: Handle, count: int, offset: int, flags: int) -> bytes:
        try:
            data = await h.cache.read(offset, count, h.blocks.load)
        except FormatError as e:
            message = str(e).removeprefix(f"{self.name}: ")
            raise NBDError(errno.EIO, f"{self.name}: {message}") from None
        if len(data) != count:
            raise NBDError(
                errno.EINVAL,
                f"{self.name}: read of {count} bytes at offset {offset} is beyond the end "
                f"({h.input.data.size} bytes)",
            )
        return data
