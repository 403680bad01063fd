"""Container filters: the members of containers stored in the layer below, as exports.

A *container* is an export of the layer below that holds members of its own: a tar
archive, an ext2 file system image (its files), later a zip or ISO file or an S3
listing. A container filter serves each member as an export. :class:`ContainerFilter`
does what all of them do alike; a filter supplies only

* :meth:`~ContainerFilter.read_index`: read the index of one container, given a
  ``pread`` of it: an :class:`Index` listing its members as exports, in order, and
  holding whatever the filter needs to find a member's bytes;
* :meth:`~ContainerFilter.member`: look a name up in an index, giving the handle of an
  open export (a :class:`Member`); the filter's data callbacks (``pread``, ``pwrite``,
  ``extents``, ...) map its bytes onto the layer below, ``next``.

A filter that changes bytes but keeps the list of the layer below (decompression) is not
a container filter: it passes lists through, as every filter does by default.

The rest is here, the same for every container filter:

* **Shapes.** When the layer below has only its unnamed default export (``file
  disk.tar``), that export is the one container and the exports are its members, named
  as its index names them. When it lists several (``file dir=DIR``), each is a container
  and the exports are ``CONTAINER/MEMBER`` (a leading ``/`` of the member name dropped:
  ``a.img/dir/f``), split again by :class:`~trionbd.chain.product.ProductNames`.
* **Single-member mode.** With the filter's entry parameter (``tar-entry=NAME``,
  ``ext2file=PATH``) only that member is served, whatever name a client asks for; it is
  the one export listed and the default. Over several containers the exports are the
  containers' names, each serving its own member of that name.
* **When indexes are read.** The single container's index is read at start-up, before
  any client connects, through a context of the layer below held for the server's life;
  any problem stops the server (exit status 1; the message names the container, and the
  entry parameter when the member is missing). Over several containers, each index is
  read the first time a client lists or opens that container, and kept for the server's
  life (restart the server after replacing one), through a context opened for the
  reading (or held for the server's life with ``keep_context``, for a filter that reads
  metadata later, when a member is opened). A container whose index cannot be read is
  not listed (a warning says why) and opening one of its members gives that reason,
  while the others are served. A failure of the layer below (a missing file, an I/O
  error) is tried again by the next client; a damaged container (an ``NBDError`` of
  ``read_index``) is remembered, unless ``reread_damaged`` is set (ext2: ``e2fsck`` may
  repair an image in place).
* **Progress.** An index that takes longer than :data:`PROGRESS_AFTER` seconds to read
  is reported at INFO level: ``still reading the index of X: N members so far`` (counted
  by ``read_index`` in its :class:`Progress`), every :data:`PROGRESS_EVERY` seconds, and
  once more when it is read.
* **Names of the layer below** are kept from its last listing: opening an export looks
  there first and lists the layer below again only when the container is not found (it
  may have appeared since). ``list_exports`` always lists it afresh.
* **The default export** is the first member of the first container that has one
  (later containers stay unread); in single-member mode over several containers, it is
  the layer below's default.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

import trio

from .errors import NBDError, StartupError
from .filter import Filter
from .layer import Layer
from .next import Next
from .product import BuildOnce, ProductNames
from .types import Export

if TYPE_CHECKING:
    from ..nursery import Lifetime

log = logging.getLogger(__name__)

PROGRESS_AFTER = 1.0
"""Seconds of reading an index after which its progress is logged."""
PROGRESS_EVERY = 5.0
"""Seconds between two progress lines of one index."""

Pread = Callable[[int, int], Awaitable[bytes]]
"""``await pread(offset, length)``: the reader's ``pread`` (``trionbd.formats.Pread``)."""


class Index(Protocol):
    """The index of one container, as :meth:`ContainerFilter.read_index` returns it."""

    @property
    def exports(self) -> Sequence[Export]:
        """Its members as exports, in the container's order, named as in the single
        shape (where the member names are the export names)."""
        ...


class Member(Protocol):
    """The handle of an open member, as :meth:`ContainerFilter.member` returns it."""

    @property
    def description(self) -> str:
        """Its export description (``nbdinfo --list``)."""
        ...

    @property
    def read_only(self) -> bool:
        """True if it must not be written: the layer below is then opened read-only."""
        ...


class Progress:
    """How far the reading of one index has got: ``read_index`` counts its members in
    :attr:`members` (from any thread) as it finds them."""

    def __init__(self) -> None:
        self.members = 0


class _BelowFailed(Exception):
    """The layer below failed (not: the container is damaged). Not an ``NBDError``, so
    that ``BuildOnce`` does not remember it: a missing file may appear, an I/O error
    pass. Turned back into its ``error`` before it reaches the server."""

    def __init__(self, error: NBDError):
        super().__init__(error.message)
        self.error = error


IndexT = TypeVar("IndexT", bound=Index)
MemberT = TypeVar("MemberT", bound=Member)


class ContainerFilter(Filter, Generic[IndexT, MemberT]):
    """Base class of container filters; see the module docstring.

    A subclass sets ``name``, :attr:`container`, :attr:`entry_param`, passes its entry
    parameter's value to ``__init__``, and defines :meth:`read_index`, :meth:`member`
    and the data callbacks for its handles.
    """

    container: ClassVar[str] = "container"
    """What a container is called in messages (``archive``, ``image``)."""
    entry_param: ClassVar[str] = ""
    """The parameter of single-member mode, for messages (``tar-entry``)."""
    keep_context: ClassVar[bool] = False
    """Keep the context an index was read through for the server's life (ext2 reads
    inodes and file maps when a member is opened); otherwise only a single container's
    is kept."""
    reread_damaged: ClassVar[bool] = False
    """Read a damaged container again when next needed, instead of remembering it."""

    def __init__(self, entry: str | None = None):
        self.entry = entry
        """The one member served (single-member mode), or None: every member is."""
        self.lifetime: Lifetime | None = None
        self.below: Layer | None = None
        self.single = True
        """The layer below has only its unnamed default export: one container."""
        self.indexes: BuildOnce[str, IndexT] = BuildOnce(
            self._build, remember_errors=not self.reread_damaged
        )
        """The index of each container read so far, by its export name below."""
        self._contexts: BuildOnce[str, Next] = BuildOnce(self._open_context, remember_errors=False)
        self._listed: dict[tuple[bool, bool], ProductNames] = {}
        """The names of the layer below as last listed, by (readonly, is_tls)."""

    # --- what a container filter supplies ------------------------------------------------

    async def read_index(self, pread: Pread, size: int, label: str, progress: Progress) -> IndexT:
        """Read the index of the container of ``size`` bytes behind ``pread``; ``label``
        names it in messages. Count the members found in ``progress.members``. Raise
        ``NBDError`` (with the whole message) for a container that cannot be served;
        errors of ``pread`` itself must propagate unchanged."""
        raise NotImplementedError

    async def member(self, index: IndexT, name: str) -> MemberT:
        """The handle for ``name`` in ``index``; ``NBDError`` (ENOENT for a name that is
        not a member) saying why not."""
        raise NotImplementedError

    def label(self, export: str) -> str:
        """How messages name container ``export`` of the layer below."""
        return self._layer_below().export_label(export)

    # --- start-up ------------------------------------------------------------------------

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        self.lifetime, self.below = lifetime, below
        self.single = (await self._names(lifetime.readonly, False, fresh=True)).single
        if not self.single:
            return  # containers are read on first use
        try:
            index = await self._index("")
        except NBDError as e:
            raise StartupError(e.message) from None
        if self.entry is not None:
            try:
                await self._member(index, self.entry)
            except NBDError as e:
                reason = e.message.removeprefix(f"{self.name}: ")
                raise StartupError(
                    f"{self.name}: {self.entry_param}={self.entry}: {reason}"
                ) from None

    def _layer_below(self) -> Layer:
        if self.below is None:
            raise NBDError(errno.EIO, f"{self.name}: used before after_fork")
        return self.below

    # --- exports -------------------------------------------------------------------------

    async def list_exports(self, below: Layer, readonly: bool, is_tls: bool) -> list[Export]:
        if self.single:
            index = await self._index("")
            if self.entry is None:
                return list(index.exports)
            return [Export(self.entry, (await self._member(index, self.entry)).description)]
        names = await self._names(readonly, is_tls, fresh=True)
        out: list[Export] = []
        for export in names.below:
            try:
                index = await self._index(export)
                if self.entry is not None:
                    member = await self._member(index, self.entry)
                    out.append(Export(export, member.description))
                    continue
            except NBDError as e:
                log.warning("%s (not listed)", e.message)
                continue
            out += [Export(self._join(names, export, m.name), m.description) for m in index.exports]
        return out

    async def default_export(self, below: Layer, readonly: bool, is_tls: bool) -> str:
        if self.single:
            if self.entry is not None:
                return self.entry
            exports = (await self._index("")).exports
            return exports[0].name if exports else ""
        if self.entry is not None:
            return await below.default_export(readonly, is_tls)
        # The first member of the first container that has one: later ones stay unread.
        names = await self._names(readonly, is_tls)
        for export in names.below:
            try:
                index = await self._index(export)
            except NBDError:
                continue  # list_exports logs why
            if index.exports:
                return self._join(names, export, index.exports[0].name)
        return ""

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, MemberT]:
        export, name = await self._locate(export_name, readonly, is_tls)
        member = await self._member(await self._index(export), name)
        return await below.open(readonly or member.read_only, export, is_tls), member

    async def _locate(self, export_name: str, readonly: bool, is_tls: bool) -> tuple[str, str]:
        """``(container, member name)`` for the export a client asks for."""
        if self.single:
            return "", export_name if self.entry is None else self.entry
        names, fresh = await self._names(readonly, is_tls), False
        while True:
            if self.entry is None:
                try:
                    return names.split(export_name)
                except NBDError:
                    if fresh:
                        raise
            elif export_name in names:
                return export_name, self.entry
            elif fresh:
                raise NBDError(
                    errno.ENOENT,
                    f"{self.name}: no {self.container} named {export_name!r} (with "
                    f"{self.entry_param}={self.entry}, the export names are those of the "
                    f"layer below: {names.shown()})",
                )
            # Not among the names last listed: the container may have appeared since.
            names, fresh = await self._names(readonly, is_tls, fresh=True), True

    @staticmethod
    def _join(names: ProductNames, export: str, member: str) -> str:
        return names.join(export, member.removeprefix("/"))

    async def _names(self, readonly: bool, is_tls: bool, fresh: bool = False) -> ProductNames:
        """The names of the layer below, as last listed or (``fresh``) listed now."""
        key = (readonly, is_tls)
        names = self._listed.get(key)
        if names is None or fresh:
            names = await ProductNames.of(self._layer_below(), readonly, is_tls)
            self._listed[key] = names
        return names

    # --- indexes -------------------------------------------------------------------------

    async def _index(self, export: str) -> IndexT:
        try:
            return await self.indexes.get(export)
        except _BelowFailed as e:
            raise e.error from None

    async def _member(self, index: IndexT, name: str) -> MemberT:
        try:
            return await self.member(index, name)
        except _BelowFailed as e:  # a kept context's read, when looking the name up
            raise e.error from None

    def _below_failed(self, export: str, error: NBDError) -> _BelowFailed:
        message = f"{self.name}: {self.label(export)}: {error.message}"
        return _BelowFailed(NBDError(error.errno, message))

    async def _open_context(self, export: str) -> Next:
        """A lifetime context of container ``export``, to read its index through."""
        if self.lifetime is None:
            raise NBDError(errno.EIO, f"{self.name}: used before after_fork")
        return await self.lifetime.open_context(self._layer_below(), export, readonly=True)

    async def _build(self, export: str) -> IndexT:
        """Read the index of container ``export`` (the build function of :attr:`indexes`)."""
        kept = self.single or self.keep_context
        try:
            if kept:
                ctx = await self._contexts.get(export)
            else:
                ctx = await self._layer_below().open(True, export)
        except NBDError as e:
            raise self._below_failed(export, e) from None
        if kept:
            return await self._read(ctx, export)
        try:
            return await self._read(ctx, export)
        finally:
            with trio.CancelScope(shield=True):
                await ctx.close()

    async def _read(self, ctx: Next, export: str) -> IndexT:
        label = self.label(export)

        async def pread(offset: int, length: int) -> bytes:
            try:
                return await ctx.pread(length, offset)
            except NBDError as e:
                raise self._below_failed(export, e) from None

        progress = Progress()
        started = trio.current_time()
        reporting = trio.CancelScope()  # entered by the reporting task
        if self.lifetime is not None:
            self.lifetime.nursery.start_soon(self._report, label, progress, reporting)
        try:
            index = await self.read_index(pread, await ctx.get_size(), label, progress)
        finally:
            reporting.cancel()
        took = trio.current_time() - started
        log.log(
            logging.INFO if took >= PROGRESS_AFTER else logging.DEBUG,
            "%s: read the index of %s: %d exports in %.1f s",
            self.name,
            label,
            len(index.exports),
            took,
        )
        return index

    async def _report(self, label: str, progress: Progress, scope: trio.CancelScope) -> None:
        """Log ``progress`` while an index is read (a lifetime task, cancelled by ``scope``
        when the reading ends)."""
        with scope:
            await trio.sleep(PROGRESS_AFTER)
            while True:
                log.info(
                    "%s: still reading the index of %s: %d members so far",
                    self.name,
                    label,
                    progress.members,
                )
                await trio.sleep(PROGRESS_EVERY)
