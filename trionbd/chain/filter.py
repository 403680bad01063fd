"""The ``Filter`` base class: a layer between the client and the plugin.

Every callback passes through to the layer below by default, so a filter defines only
what it changes. Connection-level callbacks receive ``next``, the open context of the
layer below (a :class:`~trionbd.chain.next.Next`), and the filter's own handle ``h``.
Global callbacks (export lists, ``open``) receive ``below``, the layer below as a
:class:`~trionbd.chain.layer.Layer`, which can list exports and open contexts.

Export lists can take three shapes:

1. pass-through (the default): the list of the layer below, unchanged;
2. own list: the filter names exports of its own, built by reading the layer below
   through a context of the lifetime nursery (see ``after_fork``);
3. product: each export of the layer below combined with the filter's own items,
   named ``BELOW/ITEM`` (see :mod:`trionbd.chain.product`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self

from .params import Param, build_kwargs
from .types import (
    BlockSize,
    CacheMode,
    Concurrency,
    ExportList,
    Extent,
    FuaMode,
    ZeroMode,
)

if TYPE_CHECKING:
    from ..nursery import Lifetime
    from .layer import Layer
    from .next import Next


class Filter:
    """Base class of filters. Subclass it, set ``name`` and override callbacks."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    params: ClassVar[Sequence[Param]] = ()
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    nonblocking: ClassVar[bool] = True
    """False if the filter's data callbacks may wait (sleeps, locks held across I/O)."""
    process_safe: bool = False
    """True if each worker process (``--workers``) may run its own copy of this filter,
    as forked after ``get_ready``: what it keeps is derived from the layer below (an
    archive's index) or belongs to one connection, never state that clients of
    different processes would have to share (a cache, an overlay, counters not summed
    through :meth:`worker_share`). See :attr:`Plugin.process_safe`."""

    @classmethod
    def from_params(cls, items: Iterable[tuple[str, str]]) -> Self:
        return cls(**build_kwargs(cls.name, cls.params, items))

    # --- lifecycle -----------------------------------------------------------------------

    def get_ready(self) -> None:
        """Called once before forking and before Trio starts."""

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        """Called once inside Trio before the first client, after the layers below are
        ready. Open long-lived contexts of the layer below with
        ``await lifetime.open_context(below, name, readonly)``."""

    async def cleanup(self) -> None:
        """Called once after the last client, before lifetime contexts are closed."""

    async def report(self) -> None:
        """Called when the operator asks for a report (SIGUSR1 on the command line),
        in the server's Trio thread, any number of times. Default: nothing."""

    def worker_share(self) -> object:
        """See :meth:`Plugin.worker_share`."""
        return None

    def report_workers(self, shares: Sequence[object], final: bool) -> None:
        """See :meth:`Plugin.report_workers`."""

    def unload(self) -> None:
        """Called once at the very end, after Trio has stopped."""

    # --- exports -------------------------------------------------------------------------

    async def list_exports(self, below: Layer, readonly: bool, is_tls: bool) -> ExportList:
        return await below.list_exports(readonly, is_tls)

    async def default_export(self, below: Layer, readonly: bool, is_tls: bool) -> str:
        return await below.default_export(readonly, is_tls)

    async def meta_contexts(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> Sequence[str]:
        """The metadata contexts this filter offers. Default: none, and those of the
        layers below are not passed up: a filter that moves or changes data (offset,
        partition, an archive's member, a copy-on-write overlay) would make their
        answers wrong. A filter that keeps offsets and data as they are passes them up
        with ``await below.meta_contexts(readonly, export_name, is_tls)``, and
        ``meta_extents`` passes their block status down by default."""
        return ()

    # --- per connection ------------------------------------------------------------------

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        """Open a context of the layer below and return it with this filter's handle.

        The returned context is closed after this filter's ``close``. A context from
        ``lifetime.open_context`` may be returned instead: it stays open until unload.
        """
        return await below.open(readonly, export_name, is_tls), None

    async def close(self, next: Next, h: Any) -> None:
        pass

    async def export_description(self, next: Next, h: Any) -> str | None:
        return await next.export_description()

    async def get_size(self, next: Next, h: Any) -> int:
        return await next.get_size()

    async def block_size(self, next: Next, h: Any) -> BlockSize | None:
        return await next.block_size()

    async def is_rotational(self, next: Next, h: Any) -> bool:
        return await next.is_rotational()

    async def can_write(self, next: Next, h: Any) -> bool:
        return await next.can_write()

    async def can_flush(self, next: Next, h: Any) -> bool:
        return await next.can_flush()

    async def can_trim(self, next: Next, h: Any) -> bool:
        return await next.can_trim()

    async def can_zero(self, next: Next, h: Any) -> ZeroMode:
        return await next.can_zero()

    async def can_fast_zero(self, next: Next, h: Any) -> bool:
        return await next.can_fast_zero()

    async def can_fua(self, next: Next, h: Any) -> FuaMode:
        return await next.can_fua()

    async def can_multi_conn(self, next: Next, h: Any) -> bool:
        return await next.can_multi_conn()

    async def can_extents(self, next: Next, h: Any) -> bool:
        return await next.can_extents()

    async def can_cache(self, next: Next, h: Any) -> CacheMode:
        return await next.can_cache()

    # --- data ----------------------------------------------------------------------------

    async def pread(self, next: Next, h: Any, count: int, offset: int, flags: int) -> bytes:
        return await next.pread(count, offset, flags)

    async def pwrite(self, next: Next, h: Any, buf: bytes, offset: int, flags: int) -> None:
        await next.pwrite(buf, offset, flags)

    async def flush(self, next: Next, h: Any, flags: int) -> None:
        await next.flush(flags)

    async def trim(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        await next.trim(count, offset, flags)

    async def zero(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        await next.zero(count, offset, flags)

    async def extents(
        self, next: Next, h: Any, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        return await next.extents(count, offset, flags)

    async def cache(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        await next.cache(count, offset, flags)

    async def meta_extents(
        self, next: Next, h: Any, context: str, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        return await next.meta_extents(context, count, offset, flags)
