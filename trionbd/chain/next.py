"""The chain at run time: ``Layer`` (one level, global) and ``Next`` (one open context).

A ``Chain`` stacks filters on a plugin. Each level is a ``Layer``; opening a layer
opens everything below it and gives a ``Next``: that layer's handle bound to the
context below. The server talks to the top ``Next``; a filter's callbacks receive the
``Next`` of the layer below.

``Next`` is also where the generic machinery of each layer lives, in one place:
capabilities are asked once at open and cached; FUA, zeroing and cache requests are
emulated where a layer lacks them; extents are checked and clipped; a layer's declared
concurrency is enforced with locks; plain ``def`` callbacks run in worker threads.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..protocol.constants import FUA_BIT, CmdFlag
from .errors import NBDError
from .filter import Filter
from .plugin import Plugin, overrides
from .types import (
    DEFAULT_BLOCK_SIZE,
    BlockSize,
    CacheMode,
    Concurrency,
    ExportList,
    Extent,
    FuaMode,
    ZeroMode,
)

log = logging.getLogger(__name__)

EMULATION_CHUNK = 1 << 20
"""Largest single write (zero emulation) or read (cache emulation) issued by emulation."""
THREADS_PER_LAYER = 16
"""Worker threads the plain ``def`` callbacks of one layer may occupy at once, across
all connections (nbdkit's default thread count); further calls wait for a thread."""
_ZEROES = bytes(EMULATION_CHUNK)

AnyFn = Callable[..., Awaitable[Any]]


def as_async(
    fn: Callable[..., Any], *, abandon_on_cancel: bool, limiter: trio.CapacityLimiter
) -> AnyFn:
    """``fn`` itself if it is ``async def``; else a wrapper running it in a worker thread
    (taking a token of ``limiter``).

    With ``abandon_on_cancel`` a cancelled caller stops waiting for the thread (used for
    closing, which must respect its deadline); otherwise cancellation waits for it.
    """
    if inspect.iscoroutinefunction(fn):
        return fn

    async def in_thread(*args: Any) -> Any:
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args), abandon_on_cancel=abandon_on_cancel, limiter=limiter
        )

    return in_thread


@dataclass(slots=True)
class Caps:
    """What an open context can do, asked once at open."""

    size: int
    write: bool
    flush: bool
    trim: bool
    zero: ZeroMode
    fast_zero: bool
    fua: FuaMode
    multi_conn: bool
    extents: bool
    cache: CacheMode
    rotational: bool
    block_size: BlockSize


_CAPS_FIELD = {
    "get_size": "size",
    "can_write": "write",
    "can_flush": "flush",
    "can_trim": "trim",
    "can_zero": "zero",
    "can_fast_zero": "fast_zero",
    "can_fua": "fua",
    "can_multi_conn": "multi_conn",
    "can_extents": "extents",
    "can_cache": "cache",
    "is_rotational": "rotational",
    "block_size": "block_size",
}
"""The Caps field holding each capability callback's answer."""


class Layer:
    """One level of the chain, independent of any connection."""

    def __init__(self, target: Plugin | Filter, below: Layer | None):
        self.target = target
        self.below = below
        self.name = target.name or type(target).__name__
        self.is_filter = isinstance(target, Filter)
        self.above: str = "server"
        """Name of what sits on top of this layer (for error messages)."""
        self._below_arg: tuple[Layer, ...] = ()
        """What the target's global callbacks get first: a filter's get the layer below."""
        self.passed_caps: frozenset[str] = frozenset()
        """The capability callbacks this filter keeps the default of: at open, their
        answers are the layer below's, taken without a call."""
        if self.is_filter:
            assert below is not None, f"filter {self.name!r} needs a layer below"
            self._below_arg = (below,)
            self.passed_caps = frozenset(
                name for name in _CAPS_FIELD if not overrides(target, Filter, name)
            )
        self.global_lock = (
            trio.Lock() if target.concurrency <= Concurrency.SERIALIZE_ALL_REQUESTS else None
        )
        self.threads = trio.CapacityLimiter(THREADS_PER_LAYER)
        """Worker threads for this layer's plain ``def`` callbacks (see :func:`as_async`)."""
        self._callbacks: dict[tuple[str, bool], AnyFn] = {}

    def __repr__(self) -> str:
        return f"<Layer {self.name}>"

    def callback(self, name: str, abandon_on_cancel: bool = False) -> AnyFn:
        """The target's callback ``name`` as an async function (see :func:`as_async`; a
        plain ``def`` runs in a worker thread of :attr:`threads`), made once per layer:
        every open binds about twenty of them."""
        key = (name, abandon_on_cancel)
        fn = self._callbacks.get(key)
        if fn is None:
            fn = as_async(
                getattr(self.target, name),
                abandon_on_cancel=abandon_on_cancel,
                limiter=self.threads,
            )
            self._callbacks[key] = fn
        return fn

    def export_label(self, export: str) -> str:
        """How messages name export ``export`` of this layer: its name or, for the
        unnamed default export, the value of the plugin's magic parameter when it keeps
        it under that name (the path in ``trionbd file disk.tar``)."""
        if export:
            return export
        magic = getattr(self.target, "magic_param", None)
        value = getattr(self.target, magic, None) if magic else None
        return value if isinstance(value, str) else f"{self.name} export ''"

    async def list_exports(self, readonly: bool, is_tls: bool) -> ExportList:
        return await self.callback("list_exports")(*self._below_arg, readonly, is_tls)  # type: ignore[no-any-return]

    async def default_export(self, readonly: bool, is_tls: bool) -> str:
        return await self.callback("default_export")(*self._below_arg, readonly, is_tls)  # type: ignore[no-any-return]

    async def open(self, readonly: bool, export_name: str, is_tls: bool = False) -> Next:
        """Open this layer and everything below it. The caller must ``close`` the result."""
        opened = await self.callback("open")(*self._below_arg, readonly, export_name, is_tls)
        below_next, handle = opened if self.is_filter else (None, opened)
        ctx = Next(self, handle, below_next, readonly, export_name)
        try:
            await ctx.prepare()
        except BaseException:
            with trio.CancelScope(shield=True):
                await ctx.close()
            raise
        return ctx


class Next:
    """An open context of one layer (and everything below it).

    Filters call these methods to reach the layer below; the server calls them on the
    top of the chain. Capability queries return the values cached at open.
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
        self.handle = handle
        self.below = below
        self.readonly = readonly
        self.export_name = export_name
        self.caps: Caps | None = None
        self.closed = False
        self._prefix: tuple[Any, ...] = (below, handle) if layer.is_filter else (handle,)
        lock = layer.global_lock
        if lock is None and layer.target.concurrency <= Concurrency.SERIALIZE_REQUESTS:
            lock = trio.Lock()
        self._lock = lock

    def _call(self, name: str, abandon_on_cancel: bool = False) -> AnyFn:
        """The layer's callback ``name`` bound to this context, under its lock if any."""
        call = functools.partial(self.layer.callback(name, abandon_on_cancel), *self._prefix)
        lock = self._lock
        if lock is None:
            return call

        async def locked(*args: Any) -> Any:
            async with lock:
                return await call(*args)

        return locked

    # Data callbacks are bound on first use: contexts opened only to answer NBD_OPT_INFO
    # (``nbdinfo --list`` opens one per export) never pay for them.
    @functools.cached_property
    def _pread(self) -> AnyFn:
        return self._call("pread")

    @functools.cached_property
    def _pwrite(self) -> AnyFn:
        return self._call("pwrite")

    @functools.cached_property
    def _flush(self) -> AnyFn:
        return self._call("flush")

    @functools.cached_property
    def _trim(self) -> AnyFn:
        return self._call("trim")

    @functools.cached_property
    def _zero(self) -> AnyFn:
        return self._call("zero")

    @functools.cached_property
    def _extents(self) -> AnyFn:
        return self._call("extents")

    @functools.cached_property
    def _cache(self) -> AnyFn:
        return self._call("cache")

    def __repr__(self) -> str:
        return f"<Next {self.layer.name} export={self.export_name!r}>"

    async def prepare(self) -> None:
        """Ask every capability once (nbdkit's ``prepare``)."""
        callback = self.layer.callback
        prefix = self._prefix
        passed = self.layer.passed_caps
        below = self.below.caps if self.below is not None else None

        async def c(name: str) -> Any:
            if name in passed:
                return getattr(below, _CAPS_FIELD[name])
            return await callback(name)(*prefix)

        size = await c("get_size")
        if not isinstance(size, int) or size < 0:
            raise NBDError(errno.EIO, f"{self.layer.name}: get_size returned {size!r}")
        write = not self.readonly and bool(await c("can_write"))
        zero = ZeroMode(await c("can_zero")) if write else ZeroMode.NONE
        flush = bool(await c("can_flush"))
        fua = FuaMode(await c("can_fua")) if write else FuaMode.NONE
        if fua is FuaMode.EMULATE and not flush:
            fua = FuaMode.NONE
        block_size = await c("block_size") or DEFAULT_BLOCK_SIZE
        self.caps = Caps(
            size=size,
            write=write,
            flush=flush,
            trim=write and bool(await c("can_trim")),
            zero=zero,
            fast_zero=zero is not ZeroMode.NONE and bool(await c("can_fast_zero")),
            fua=fua,
            multi_conn=bool(await c("can_multi_conn")),
            extents=bool(await c("can_extents")),
            cache=CacheMode(await c("can_cache")),
            rotational=bool(await c("is_rotational")),
            block_size=BlockSize(*block_size),
        )

    def _caps(self) -> Caps:
        if self.caps is None:
            raise NBDError(errno.EIO, f"{self.layer.name}: context used before it was prepared")
        return self.caps

    async def close(self) -> None:
        """Close this layer's handle (under its lock, like a request), then the context
        below. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        try:
            await self._call("close", True)()
        finally:
            if self.below is not None:
                await self.below.close()

    # --- cached capabilities -------------------------------------------------------------

    async def get_size(self) -> int:
        return self._caps().size

    async def can_write(self) -> bool:
        return self._caps().write

    async def can_flush(self) -> bool:
        return self._caps().flush

    async def can_trim(self) -> bool:
        return self._caps().trim

    async def can_zero(self) -> ZeroMode:
        return self._caps().zero

    async def can_fast_zero(self) -> bool:
        return self._caps().fast_zero

    async def can_fua(self) -> FuaMode:
        return self._caps().fua

    async def can_multi_conn(self) -> bool:
        return self._caps().multi_conn

    async def can_extents(self) -> bool:
        return self._caps().extents

    async def can_cache(self) -> CacheMode:
        return self._caps().cache

    async def is_rotational(self) -> bool:
        return self._caps().rotational

    async def block_size(self) -> BlockSize:
        return self._caps().block_size

    async def export_description(self) -> str | None:
        return await self._call("export_description")()  # type: ignore[no-any-return]

    # --- data ----------------------------------------------------------------------------

    async def pread(self, count: int, offset: int, flags: int = 0) -> bytes:
        return await self._pread(count, offset, flags)  # type: ignore[no-any-return]

    async def _with_fua(self, call: AnyFn, *args: Any) -> None:
        """Run a write-like call; emulate FUA with a flush when this layer lacks it."""
        flags = args[-1]
        if flags & FUA_BIT and self._caps().fua is FuaMode.EMULATE:
            await call(*args[:-1], flags & ~FUA_BIT)
            await self._flush(0)
        else:
            await call(*args)

    async def pwrite(self, buf: bytes, offset: int, flags: int = 0) -> None:
        if not self._caps().write:
            raise NBDError(errno.EROFS, f"{self.layer.name}: the export is read-only")
        await self._with_fua(self._pwrite, buf, offset, flags)

    async def flush(self, flags: int = 0) -> None:
        if not self._caps().flush:
            raise NBDError(errno.EINVAL, f"{self.layer.name}: flush is not supported")
        await self._flush(flags)

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


class Chain:
    """Filters stacked on a plugin. ``filters[0]`` is closest to the client (as on
    nbdkit's command line); ``layers`` runs from the plugin upwards."""

    def __init__(self, plugin: Plugin, filters: Sequence[Filter] = ()):
        self.plugin = plugin
        self.filters = list(filters)
        layer = Layer(plugin, None)
        self.layers = [layer]
        for f in reversed(self.filters):
            layer.above = f.name
            layer = Layer(f, layer)
            self.layers.append(layer)
        self.top = layer
        self.ready = False
        """True between :meth:`get_ready` and :meth:`unload`."""

    def __repr__(self) -> str:
        return " -> ".join(layer.name for layer in reversed(self.layers))

    @property
    def concurrency(self) -> Concurrency:
        """The strictest concurrency any layer declares."""
        return min(layer.target.concurrency for layer in self.layers)

    @property
    def nonblocking(self) -> bool:
        """True if every layer's data callbacks finish without slow waits."""
        return all(layer.target.nonblocking for layer in self.layers)

    def get_ready(self) -> None:
        """Call every layer's ``get_ready``, plugin first; once: until :meth:`unload`,
        later calls do nothing."""
        if self.ready:
            return
        for layer in self.layers:
            layer.target.get_ready()
        self.ready = True

    async def report(self) -> None:
        """Call every layer's ``report``, client side first; a failure is logged and the
        other layers still report."""
        for layer in reversed(self.layers):
            try:
                await layer.callback("report")()
            except Exception as e:
                log.error("%s: report failed: %s", layer.name, e)

    def unload(self) -> None:
        """Call every layer's ``unload``, client side first."""
        self.ready = False
        for layer in reversed(self.layers):
            layer.target.unload()
