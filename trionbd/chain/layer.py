"""The chain at run time: ``Layer`` (one level, global) and ``LayerContext`` (one open
context of it).

Each level of a :class:`~trionbd.chain.chain.Chain` is a ``Layer``; opening a layer opens
everything below it and gives a ``LayerContext``: that layer's handle bound to the
context below. The server serves the top layer's context; a filter's callbacks receive
the context below as ``next``.

``LayerContext`` is also where the generic machinery of each layer lives, in one place:
capabilities are asked once at open and cached; FUA, zeroing and cache requests are
emulated where a layer lacks them; extents are checked and clipped; a layer's declared
concurrency is enforced with locks; plain ``def`` callbacks run in worker threads.

Callbacks are bound by reference, never by name: a data callback of the target
(``target.pread``) is bound once per context, on first use, with its handle (and for a
filter ``next``) given first; a request is then one call of that bound callable per layer.
"""

from __future__ import annotations

import errno
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import trio

from ..protocol.constants import FUA_BIT, CmdFlag
from .errors import NBDError
from .filter import Filter
from .next import CAPABILITIES, READ_WRITE, Ask, CachedCaps, Caps, Next
from .plugin import Plugin, overrides
from .types import CacheMode, Concurrency, ExportList, Extent, FuaMode, ZeroMode

if TYPE_CHECKING:
    from ..nursery import Lifetime

P = ParamSpec("P")
T = TypeVar("T")

EMULATION_CHUNK = 1 << 20
"""Largest single write (zero emulation) or read (cache emulation) issued by emulation."""
THREADS_PER_LAYER = 16
"""Worker threads the plain ``def`` callbacks of one layer may occupy at once, across
all connections (nbdkit's default thread count); further calls wait for a thread."""
_ZEROES = bytes(EMULATION_CHUNK)


def as_async(
    fn: Callable[P, Awaitable[T]], *, abandon_on_cancel: bool, limiter: trio.CapacityLimiter
) -> Callable[P, Awaitable[T]]:
    """``fn`` itself if it is ``async def``; else a wrapper running it in a worker thread
    (taking a token of ``limiter``).

    The base classes declare every callback ``async``; a subclass may define one with a
    plain ``def`` (to wrap a blocking library), which then returns its value directly.
    With ``abandon_on_cancel`` a cancelled caller stops waiting for the thread (used for
    closing, which must respect its deadline); otherwise cancellation waits for it.
    """
    if inspect.iscoroutinefunction(fn):
        return fn

    async def in_thread(*args: P.args, **kwargs: P.kwargs) -> T:
        call = functools.partial(fn, *args, **kwargs)
        result = await trio.to_thread.run_sync(
            call, abandon_on_cancel=abandon_on_cancel, limiter=limiter
        )
        return cast(T, result)  # a plain def returns the value itself

    return in_thread


class Layer:
    """One level of the chain, independent of any connection."""

    def __init__(self, target: Plugin | Filter, below: Layer | None):
        self.target = target
        self.below = below
        self.name = target.name or type(target).__name__
        self.is_filter = isinstance(target, Filter)
        self.above: str = "server"
        """Name of what sits on top of this layer (for error messages)."""
        self.passed_caps: frozenset[str] = frozenset()
        """The capability callbacks this filter keeps the default of: at open, their
        answers are the layer below's, taken without calling the filter."""
        if self.is_filter:
            assert below is not None, f"filter {self.name!r} needs a layer below"
            self.passed_caps = frozenset(
                ask.callback
                for _, ask in CAPABILITIES
                if not overrides(target, Filter, ask.callback)
            )

        self.global_lock = (
            trio.Lock() if target.concurrency <= Concurrency.SERIALIZE_ALL_REQUESTS else None
        )
        self.threads = trio.CapacityLimiter(THREADS_PER_LAYER)
        """Worker threads for this layer's plain ``def`` callbacks (see :func:`as_async`)."""
        self._async: dict[tuple[object, bool], Callable[..., Awaitable[Any]]] = {}
        self.questions: tuple[tuple[str, Ask, Callable[..., Awaitable[Any]] | None], ...] = tuple(
            (
                field,
                ask,
                None
                if ask.callback in self.passed_caps
                else self.run(getattr(target, ask.callback)),
            )
            for field, ask in CAPABILITIES
        )
        """What an open asks, in order: ``(Caps field, Ask, the target's callback)``; the
        callback is None for a capability passed through from the layer below."""

    def __repr__(self) -> str:
        return f"<Layer {self.name}>"

    def run(
        self, callback: Callable[P, Awaitable[T]], abandon_on_cancel: bool = False
    ) -> Callable[P, Awaitable[T]]:
        """``callback``, a method of the target, as an async callable (a plain ``def``
        runs in a worker thread of :attr:`threads`); made once per layer and method:
        every open binds about twenty of them."""
        key = (getattr(callback, "__func__", callback), abandon_on_cancel)
        fn = self._async.get(key)
        if fn is None:
            fn = self._async[key] = as_async(
                callback, abandon_on_cancel=abandon_on_cancel, limiter=self.threads
            )
        return cast("Callable[P, Awaitable[T]]", fn)

    def _layer_below(self) -> Layer:
        """The layer below a filter's."""
        assert self.below is not None
        return self.below

    def export_label(self, export: str) -> str:
        """How messages name export ``export`` of this layer: its name or, for the
        unnamed default export, the value of the plugin's magic parameter when it keeps
        it under that name (the path in ``trionbd file disk.tar``)."""
        if export:
            return export
        magic = getattr(self.target, "magic_param", None)
        value = getattr(self.target, magic, None) if magic else None
        return value if isinstance(value, str) else f"{self.name} export ''"

    # --- the target's global callbacks (a filter's get the layer below first) ------------

    async def after_fork(self, lifetime: Lifetime) -> None:
        target = self.target
        if isinstance(target, Filter):
            await self.run(target.after_fork)(lifetime, self._layer_below())
        else:
            await self.run(target.after_fork)(lifetime)

    async def cleanup(self) -> None:
        await self.run(self.target.cleanup, abandon_on_cancel=True)()

    async def report(self) -> None:
        await self.run(self.target.report)()

    async def list_exports(self, readonly: bool, is_tls: bool) -> ExportList:
        target = self.target
        if isinstance(target, Filter):
            return await self.run(target.list_exports)(self._layer_below(), readonly, is_tls)
        return await self.run(target.list_exports)(readonly, is_tls)

    async def default_export(self, readonly: bool, is_tls: bool) -> str:
        target = self.target
        if isinstance(target, Filter):
            return await self.run(target.default_export)(self._layer_below(), readonly, is_tls)
        return await self.run(target.default_export)(readonly, is_tls)

    async def meta_contexts(self, readonly: bool, export_name: str, is_tls: bool) -> list[str]:
        """The metadata contexts ``export_name`` offers besides ``base:allocation``."""
        target = self.target
        if isinstance(target, Filter):
            below = self._layer_below()
            names = await self.run(target.meta_contexts)(below, readonly, export_name, is_tls)
        else:
            names = await self.run(target.meta_contexts)(readonly, export_name, is_tls)
        return list(names)

    async def open(self, readonly: bool, export_name: str, is_tls: bool = False) -> LayerContext:
        """Open this layer and everything below it. The caller must ``close`` the result."""
        target = self.target
        below: Next | None = None
        if isinstance(target, Filter):
            open_filter = self.run(target.open)
            below, handle = await open_filter(self._layer_below(), readonly, export_name, is_tls)
        else:
            handle = await self.run(target.open)(readonly, export_name, is_tls)
        ctx = LayerContext(self, handle, below, readonly, export_name)
        try:
            await ctx.prepare()
        except BaseException:
            with trio.CancelScope(shield=True):
                await ctx.close()
            raise
        return ctx


class LayerContext(CachedCaps):
    """An open context of one layer (and everything below it): a :class:`Next`.

    Filters call its methods to reach the layer below; the server calls them on the top
    of the chain. Capability queries return the values cached at open.
    """

    def __init__(
        self,
        layer: Layer,
        handle: Any,
        below: Next | None,
        readonly: bool,
        export_name: str,
    ):
        self.layer = layer
        self.name = layer.name
        self.handle = handle
        self.below = below
        """The context below (a filter's ``next``); None for a plugin's."""
        self.readonly = readonly
        self.export_name = export_name
        self.caps: Caps | None = None
        self.closed = False
        lock = layer.global_lock
        if lock is None and layer.target.concurrency <= Concurrency.SERIALIZE_REQUESTS:
            lock = trio.Lock()
        self._lock = lock

    def __repr__(self) -> str:
        return f"<LayerContext {self.layer.name} export={self.export_name!r}>"

    def _bind(
        self, callback: Callable[..., Coroutine[Any, Any, T]], abandon_on_cancel: bool = False
    ) -> Callable[..., Awaitable[T]]:
        """``callback``, a per-connection callback of this layer's target, bound to this
        context: called with its handle (and for a filter, ``next``) first, in a worker
        thread if it is a plain ``def``, under this context's lock if any."""
        run = self.layer.run(callback, abandon_on_cancel)
        if self.layer.is_filter:
            bound = functools.partial(run, self.below, self.handle)
        else:
            bound = functools.partial(run, self.handle)
        lock = self._lock
        if lock is None:
            return bound

        async def locked(*args: Any) -> T:
            async with lock:
                return await bound(*args)

        return locked

    # Data callbacks are bound on first use: contexts opened only to answer NBD_OPT_INFO
    # (``nbdinfo --list`` opens one per export) never pay for them.
    @functools.cached_property
    def _pread(self) -> Callable[[int, int, int], Awaitable[bytes]]:
        return self._bind(self.layer.target.pread)

    @functools.cached_property
    def _pwrite(self) -> Callable[[bytes, int, int], Awaitable[None]]:
        return self._bind(self.layer.target.pwrite)

    @functools.cached_property
    def _flush(self) -> Callable[[int], Awaitable[None]]:
        return self._bind(self.layer.target.flush)

    @functools.cached_property
    def _trim(self) -> Callable[[int, int, int], Awaitable[None]]:
        return self._bind(self.layer.target.trim)

    @functools.cached_property
    def _zero(self) -> Callable[[int, int, int], Awaitable[None]]:
        return self._bind(self.layer.target.zero)

    @functools.cached_property
    def _extents(self) -> Callable[[int, int, int], Awaitable[Iterable[Extent]]]:
        return self._bind(self.layer.target.extents)

    @functools.cached_property
    def _cache(self) -> Callable[[int, int, int], Awaitable[None]]:
        return self._bind(self.layer.target.cache)

    @functools.cached_property
    def _meta_extents(self) -> Callable[[str, int, int, int], Awaitable[Iterable[Extent]]]:
        return self._bind(self.layer.target.meta_extents)

    async def prepare(self) -> None:
        """Ask every capability once (nbdkit's ``prepare``), in the order of
        :data:`~trionbd.chain.next.CAPABILITIES`."""
        below, handle = self.below, self.handle
        below_caps = below.caps if isinstance(below, CachedCaps) else None
        answers: dict[str, Any] = {}
        for field, ask, question in self.layer.questions:
            if ask.needs is not None and not (
                not self.readonly if ask.needs is READ_WRITE else answers[ask.needs]
            ):
                answers[field] = ask.off()
            elif question is None:  # the filter's default gives the layer below's answer
                if below_caps is not None:
                    answers[field] = getattr(below_caps, field)
                else:
                    answers[field] = await getattr(below, ask.callback)()
            elif self.layer.is_filter:
                answers[field] = ask.convert(await question(below, handle))
            else:
                answers[field] = ask.convert(await question(handle))
        size = answers["size"]
        if not isinstance(size, int) or size < 0:
            raise NBDError(errno.EIO, f"{self.layer.name}: get_size returned {size!r}")
        if answers["fua"] is FuaMode.EMULATE and not answers["flush"]:
            answers["fua"] = FuaMode.NONE
        self.caps = Caps(**answers)

    async def close(self) -> None:
        """Close this layer's handle (under its lock, like a request), then the context
        below. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        try:
            await self._bind(self.layer.target.close, abandon_on_cancel=True)()
        finally:
            if self.below is not None:
                await self.below.close()

    def find(self, layer: Layer) -> LayerContext | None:
        """The context of ``layer`` in this stack: this one or one below it. A context
        that wraps another (a lifetime context) is seen through: it shows the context it
        wraps as ``inner``."""
        ctx: object = self
        while ctx is not None:
            if isinstance(ctx, LayerContext):
                if ctx.layer is layer:
                    return ctx
                ctx = ctx.below
            else:
                ctx = getattr(ctx, "inner", None)
        return None

    async def export_description(self) -> str | None:
        return await self._bind(self.layer.target.export_description)()

    # --- data ----------------------------------------------------------------------------

    async def pread(self, count: int, offset: int, flags: int = 0) -> bytes:
        return await self._pread(count, offset, flags)

    async def pwrite(self, buf: bytes, offset: int, flags: int = 0) -> None:
        caps = self._caps()
        if not caps.write:
            raise NBDError(errno.EROFS, f"{self.layer.name}: the export is read-only")
        if flags & FUA_BIT and caps.fua is FuaMode.EMULATE:
            await self._pwrite(buf, offset, flags & ~FUA_BIT)
            await self._flush(0)
        else:
            await self._pwrite(buf, offset, flags)

    async def flush(self, flags: int = 0) -> None:
        if not self._caps().flush:
            raise NBDError(errno.EINVAL, f"{self.layer.name}: flush is not supported")
        await self._flush(flags)

    async def _with_fua(
        self, call: Callable[[int, int, int], Awaitable[None]], count: int, offset: int, flags: int
    ) -> None:
        """Run a trim- or zero-like call; emulate FUA with a flush when this layer lacks it."""
        if flags & FUA_BIT and self._caps().fua is FuaMode.EMULATE:
            await call(count, offset, flags & ~FUA_BIT)
            await self._flush(0)
        else:
            await call(count, offset, flags)

    async def trim(self, count: int, offset: int, flags: int = 0) -> None:
        if not self._caps().trim:
            raise NBDError(errno.EINVAL, f"{self.layer.name}: trim is not supported")
        await self._with_fua(self._trim, count, offset, flags)

    async def zero(self, count: int, offset: int, flags: int = 0) -> None:
        caps = self._caps()
        if caps.zero is ZeroMode.NONE:
            raise NBDError(errno.EROFS, f"{self.layer.name}: zeroing is not supported")
        if flags & CmdFlag.FAST_ZERO and (caps.zero is ZeroMode.EMULATE or not caps.fast_zero):
            raise NBDError(errno.ENOTSUP, f"{self.layer.name}: zeroing would not be fast")
        if caps.zero is ZeroMode.NATIVE:
            await self._with_fua(self._zero, count, offset, flags)
        else:
            await self._with_fua(self._write_zeroes, count, offset, flags & FUA_BIT)

    async def _write_zeroes(self, count: int, offset: int, flags: int) -> None:
        """Zeroing emulated with writes of zeroes, each with ``flags`` (FUA or 0)."""
        end = offset + count
        while offset < end:
            n = min(end - offset, EMULATION_CHUNK)
            await self._pwrite(_ZEROES[:n] if n < EMULATION_CHUNK else _ZEROES, offset, flags)
            offset += n

    async def extents(self, count: int, offset: int, flags: int = 0) -> list[Extent]:
        """Allocation extents covering ``offset`` onwards, contiguous, clipped to the range;
        at least one. Layers without extent support report everything as data."""
        if not self._caps().extents:
            return [Extent(offset, count, 0)]
        raw = await self._extents(count, offset, flags)
        return clip_extents(self.layer.name, raw, count, offset, bool(flags & CmdFlag.REQ_ONE))

    async def cache(self, count: int, offset: int, flags: int = 0) -> None:
        mode = self._caps().cache
        if mode is CacheMode.NATIVE:
            await self._cache(count, offset, flags)
        elif mode is CacheMode.EMULATE:
            end = offset + count
            while offset < end:
                n = min(end - offset, EMULATION_CHUNK)
                await self._pread(n, offset, 0)
                offset += n

    async def meta_extents(
        self, context: str, count: int, offset: int, flags: int = 0
    ) -> list[Extent]:
        """Block status of a metadata context the export offers, checked and clipped as
        :meth:`extents`'s."""
        raw = await self._meta_extents(context, count, offset, flags)
        return clip_extents(self.layer.name, raw, count, offset, bool(flags & CmdFlag.REQ_ONE))


def clip_extents(
    layer: str, extents: Iterable[Extent], count: int, offset: int, req_one: bool = False
) -> list[Extent]:
    """Check and normalize extents returned by a layer for the range (offset, count).

    The result starts exactly at ``offset``, is contiguous, ends at or before
    ``offset + count``, merges neighbours with equal flags and has at least one entry
    (only one with ``req_one``). Gaps, overlaps or a late start raise ``NBDError(EIO)``.
    """
    end = offset + count
    out: list[Extent] = []
    pos = offset
    for e in extents:
        e_end = e.offset + e.length
        if e.length <= 0 or e_end <= pos:
            continue
        if e.offset > pos:
            if req_one and out:
                break  # the one extent is complete; what lies beyond does not matter
            raise NBDError(
                errno.EIO,
                f"{layer}: extents leave a gap at offset {pos} (next extent starts at {e.offset})",
            )
        stop = min(e_end, end)
        if out and out[-1].flags == e.flags:
            last = out[-1]
            out[-1] = Extent(last.offset, stop - last.offset, last.flags)
        elif req_one and out:
            break  # the one extent, merged with its equal neighbours (as nbdkit does)
        else:
            out.append(Extent(pos, stop - pos, e.flags))
        pos = stop
        if pos >= end:
            break
    if not out:
        raise NBDError(errno.EIO, f"{layer}: no extents returned for offset {offset}")
    return out


if TYPE_CHECKING:
    _checked: type[Next] = LayerContext  # mypy: a LayerContext is a Next
