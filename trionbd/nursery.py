"""The lifetime nursery: the scope from start-up (nbdkit's ``after_fork``) to unload.

It owns what must outlive any one client: background tasks of plugins and filters,
and **lifetime contexts** — contexts of a layer that a filter opens once and uses from
any client task until unload. The tar and ext2 filters read archive and file-system
metadata through one to build their export lists before the first client connects;
``--filter=shared`` hands one to every client.

Guarantees:

* ``after_fork`` runs bottom-up (plugin first), so a filter may open contexts of the
  layer below. A failure there raises ``StartupError`` naming the layer and the cause.
* On exit, ``cleanup`` runs top-down, then every lifetime context is closed exactly
  once, in reverse order of opening, shielded from cancellation, each with a deadline.
* A lifetime context refuses new calls once closing has begun (``NBDError`` with
  ``ESHUTDOWN``); calls already running may finish until the deadline.
* Tasks in ``lifetime.nursery`` are shielded from the cancellation that shuts the
  server down: they keep running while clients drain and contexts close (the ``nbd``
  plugin's connections need their reader tasks until then), and are cancelled last.
* :meth:`Lifetime.close_connections` lets a plugin or filter end the connections that
  use one of its exports (an export that went away) without a reference to the server.
* :meth:`Lifetime.request_shutdown` lets one end the server once its clients have gone
  (the exitlast and exitwhen filters).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import trio

from .chain.chain import Chain
from .chain.errors import NBDError, StartupError
from .chain.layer import Layer, LayerContext
from .chain.next import CachedCaps, Next

if TYPE_CHECKING:
    from .chain.filter import Filter
    from .chain.plugin import Plugin

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

CLOSE_TIMEOUT = 5.0
"""Seconds each lifetime context (and each layer's ``cleanup``) gets to close."""

ConnectionCloser = Callable[[Layer, Callable[[LayerContext], bool], float | None], Awaitable[int]]
"""What a server lends its lifetime to close connections: (layer, match, grace) -> count."""


class LifetimeContext(CachedCaps):
    """A context owned by the lifetime, usable from any task until unload: a
    :class:`~trionbd.chain.next.Next` wrapping the layer context ``inner``.

    Its ``close`` does nothing (the lifetime closes it); every other call checks that
    the lifetime is not closing and is counted, so that closing can wait for it.
    Capabilities are answered from the inner context's, without a call.
    """

    def __init__(self, inner: LayerContext, owner: str):
        self.inner = inner
        self.owner = owner
        """The layer above, which opened it (for messages)."""
        self.name = inner.name
        self.export_name = inner.export_name
        self.caps = inner.caps
        self.closed = False
        self._closing = False
        self._in_flight = 0
        self._idle = trio.Event()
        guarded = self._guarded
        self.export_description = guarded(inner.export_description)
        self.pread = guarded(inner.pread)
        self.pwrite = guarded(inner.pwrite)
        self.flush = guarded(inner.flush)
        self.trim = guarded(inner.trim)
        self.zero = guarded(inner.zero)
        self.extents = guarded(inner.extents)
        self.cache = guarded(inner.cache)
        self.meta_extents = guarded(inner.meta_extents)

    def __repr__(self) -> str:
        return f"<LifetimeContext {self.name} export={self.export_name!r} for {self.owner}>"

    async def close(self) -> None:
        """Clients never close a lifetime context; unload does."""

    async def _shutdown(self) -> None:
        """Refuse new calls, wait for running ones, then close the context (once)."""
        self._closing = True
        if self._in_flight:
            await self._idle.wait()
        if not self.closed:
            self.closed = True
            await self.inner.close()

    def _guarded(
        self, call: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """``call`` of the inner context, refused once closing has begun and counted."""

        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            if self._closing:
                raise NBDError(
                    errno.ESHUTDOWN,
                    f"{self.owner}: the server is shutting down; the shared context of "
                    f"{self.name} export {self.export_name!r} is closing",
                )
            self._in_flight += 1
            try:
                return await call(*args, **kwargs)
            finally:
                self._in_flight -= 1
                if self._closing and not self._in_flight:
                    self._idle.set()

        return guarded


if TYPE_CHECKING:
    _checked: type[Next] = LifetimeContext  # mypy: a LifetimeContext is a Next


class Lifetime:
    """The after_fork..unload scope of one chain. Create it with :func:`open_lifetime`."""

    def __init__(
        self,
        chain: Chain,
        nursery: trio.Nursery,
        close_timeout: float,
        readonly: bool = False,
        worker: int | None = None,
    ):
        self.chain = chain
        self.nursery = nursery
        """For background tasks that must live until unload."""
        self.readonly = readonly
        """The server opens every export read-only (``-r``); known at start-up, so a
        filter can decide then what it allows (ext2: a journal that needs recovery)."""
        self.worker = worker
        """This process's number (from 1) when several worker processes serve the chain
        (``--workers``), each with its own lifetime; None in a server of one process.
        A layer that counts leaves its reports to the supervisor then
        (``worker_share``, ``report_workers``)."""
        self.close_timeout = close_timeout
        self.contexts: list[LifetimeContext] = []
        """Open lifetime contexts, in order of opening."""
        self.closing = False
        self.connection_closer: ConnectionCloser | None = None
        """Set by the server running in this lifetime (see :meth:`close_connections`)."""
        self.shutdown_requester: Callable[[], None] | None = None
        """Set by the server running in this lifetime (see :meth:`request_shutdown`)."""
        self.shutdown_requested = False
        """Whether :meth:`request_shutdown` was called (a server starting later honours it)."""

    def request_shutdown(self) -> None:
        """Ask the server to end once its clients have gone: it stops accepting clients
        now, serves those connected until they disconnect (however long that takes),
        then exits as after SIGTERM; with no client connected, at once. Any task may call
        it, any number of times. Made before the server runs, the request takes effect
        as it starts; without a server (a lifetime opened on its own) nothing happens."""
        if not self.shutdown_requested:
            log.info("shutdown requested: no new clients; exiting once the clients have gone")
        self.shutdown_requested = True
        if self.shutdown_requester is not None:
            self.shutdown_requester()

    async def close_connections(
        self,
        owner: Plugin | Filter,
        match: Callable[[LayerContext], bool],
        grace: float | None = None,
    ) -> int:
        """End the connections whose context of ``owner``'s layer satisfies ``match``;
        return how many there were, once all of them have closed.

        ``owner`` is the calling plugin or filter (``self``); ``match`` gets that layer's
        context of each connection in transmission (``ctx.export_name``, ``ctx.handle``),
        e.g. ``lambda ctx: ctx.export_name == "disk"``. Each matching connection stops
        serving new requests: requests still arriving are answered with ``ESHUTDOWN``
        (the client should disconnect), requests in flight finish and get their replies,
        a writable context is flushed and closed, and the connection closes when the
        client disconnects or ``grace`` seconds have passed (default: the server's
        shutdown timeout; in-flight requests still running then are cancelled).

        Connections still opening their export are not affected: stop new opens of the
        export first (fail them in ``open``) and check again once ``open`` of the layer
        below has returned, as :class:`~trionbd.exporttable.ExportTable` does. Without
        a server (a lifetime opened on its own) there is nothing to close: returns 0.
        """
        layer = next((la for la in self.chain.layers if la.target is owner), None)
        if layer is None:
            raise ValueError(f"{owner!r} is not a layer of the chain {self.chain!r}")
        if self.connection_closer is None:
            return 0
        return await self.connection_closer(layer, match, grace)

    async def open_context(
        self, layer: Layer, export_name: str, readonly: bool, is_tls: bool = False
    ) -> Next:
        """Open a context of ``layer`` that lives until unload.

        The caller is the layer above ``layer``; errors name it. The result may be
        used from any task and must not be closed by the caller.
        """
        if self.closing:
            raise NBDError(errno.ESHUTDOWN, f"{layer.above}: the server is shutting down")
        inner = await layer.open(readonly, export_name, is_tls)
        ctx = LifetimeContext(inner, layer.above)
        self.contexts.append(ctx)
        if self.closing:  # shutdown began while we were opening
            await self._close_one(ctx)
            raise NBDError(errno.ESHUTDOWN, f"{layer.above}: the server is shutting down")
        return ctx

    async def _start(self) -> None:
        for layer in self.chain.layers:
            try:
                await layer.after_fork(self)
            except StartupError:
                raise
            except Exception as e:
                raise StartupError(f"{layer.name}: {e}") from e

    async def _close_one(self, ctx: LifetimeContext) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.close_timeout) as scope:
                try:
                    await ctx._shutdown()
                except Exception as e:
                    log.error("%s: closing %s failed: %s", ctx.owner, ctx, e)
            if scope.cancelled_caught:
                log.error(
                    "%s: closing %s took longer than %.1fs; abandoned",
                    ctx.owner,
                    ctx,
                    self.close_timeout,
                )

    async def _stop(self) -> None:
        self.closing = True
        with trio.CancelScope(shield=True):
            for layer in reversed(self.chain.layers):
                with trio.move_on_after(self.close_timeout):
                    try:
                        await layer.cleanup()
                    except Exception as e:
                        log.error("%s: cleanup failed: %s", layer.name, e)
            for ctx in reversed(self.contexts):
                await self._close_one(ctx)


@asynccontextmanager
async def open_lifetime(
    chain: Chain,
    *,
    close_timeout: float = CLOSE_TIMEOUT,
    readonly: bool = False,
    worker: int | None = None,
) -> AsyncIterator[Lifetime]:
    """Run ``after_fork`` of every layer, yield the lifetime, and tear it down on exit.
    ``readonly`` tells the layers that the server serves every export read-only;
    ``worker`` is this worker process's number (see :attr:`Lifetime.worker`)."""
    async with trio.open_nursery() as outer:
        nursery, background = await outer.start(_background_nursery)
        lifetime = Lifetime(chain, nursery, close_timeout, readonly, worker)
        try:
            await lifetime._start()
            yield lifetime
        finally:
            await lifetime._stop()
            background.cancel()


async def _background_nursery(
    *, task_status: trio.TaskStatus[tuple[trio.Nursery, trio.CancelScope]]
) -> None:
    """Host ``lifetime.nursery`` under a shield that only ``open_lifetime`` cancels."""
    # If start-up is already cancelled, started() would hand nothing over and the shielded
    # host would sleep forever: stop here instead (no checkpoint follows until started()).
    await trio.lowlevel.checkpoint_if_cancelled()
    with trio.CancelScope(shield=True) as scope:
        async with trio.open_nursery() as nursery:
            task_status.started((nursery, scope))
            await trio.sleep_forever()
