"""The generic machinery of each layer (``trionbd.chain.layer``): capability defaults and
read-only forcing, FUA/zero/cache emulation, extent clipping, declared concurrency, and
plain ``def`` callbacks in worker threads."""

from __future__ import annotations

import errno
import inspect
import threading
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from tests.server.nbdclient import connect
from tests.support import export_info, libnbd_python, serving, trionbd_process
from trionbd.chain import (
    CacheMode,
    Chain,
    Concurrency,
    Export,
    Extent,
    Filter,
    FuaMode,
    NBDError,
    Next,
    Plugin,
    ZeroMode,
    clip_extents,
)
from trionbd.chain.forward import ForwardingPlugin
from trionbd.chain.layer import EMULATION_CHUNK, Layer, LayerContext
from trionbd.chain.next import CAPABILITIES, CachedCaps, Caps
from trionbd.client import ClientContext
from trionbd.nursery import open_lifetime
from trionbd.protocol.constants import CmdFlag, TransmissionFlag
from trionbd.server.handshake import transmission_flags

SIZE = 8 * EMULATION_CHUNK
Call = tuple[Any, ...]


class Base(Plugin):
    """Records every data call in ``calls``; reads return a pattern."""

    name = "base"

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def get_size(self, h: Any) -> int:
        return SIZE

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        self.calls.append(("pread", count, offset, flags))
        return bytes((offset + i) % 251 for i in range(min(count, 16))).ljust(count, b"\0")


class Writable(Base):
    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.calls.append(("pwrite", len(buf), offset, flags, buf.count(0) == len(buf)))


class Flushable(Writable):
    async def flush(self, h: Any, flags: int) -> None:
        self.calls.append(("flush", flags))


class Full(Flushable):
    """Defines every callback natively."""

    async def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("trim", count, offset, flags))

    async def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("zero", count, offset, flags))

    async def extents(self, h: Any, count: int, offset: int, flags: int) -> Iterable[Extent]:
        return [Extent(offset, count, 3)]

    async def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("cache", count, offset, flags))


async def open_top(target: Plugin, *filters: Filter, readonly: bool = False) -> Next:
    return await Chain(target, filters).top.open(readonly, "")


# --- capability defaults -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (
            Base,
            dict(write=False, flush=False, trim=False, zero=ZeroMode.NONE, fast_zero=False,
                 fua=FuaMode.NONE, extents=False, cache=CacheMode.NONE, multi_conn=False),
        ),
        (
            Writable,
            dict(write=True, flush=False, trim=False, zero=ZeroMode.EMULATE, fast_zero=True,
                 fua=FuaMode.NONE, extents=False, cache=CacheMode.NONE, multi_conn=False),
        ),
        (
            Flushable,
            dict(write=True, flush=True, trim=False, zero=ZeroMode.EMULATE, fast_zero=True,
                 fua=FuaMode.EMULATE, extents=False, cache=CacheMode.NONE, multi_conn=False),
        ),
        (
            Full,
            dict(write=True, flush=True, trim=True, zero=ZeroMode.NATIVE, fast_zero=False,
                 fua=FuaMode.EMULATE, extents=True, cache=CacheMode.NATIVE, multi_conn=False),
        ),
    ],
)  # fmt: skip
async def test_capabilities_follow_from_the_callbacks_defined(
    cls: type[Base], expected: dict[str, Any]
) -> None:
    ctx = await open_top(cls())
    assert ctx.caps is not None
    assert {k: getattr(ctx.caps, k) for k in expected} == expected
    assert ctx.caps.size == SIZE
    # A filter that overrides nothing shows the same capabilities.
    through = await open_top(cls(), Filter())
    assert through.caps == ctx.caps


async def test_read_only_forces_write_capabilities_off() -> None:
    class Everything(Full):
        async def can_fua(self, h: Any) -> FuaMode:
            return FuaMode.NATIVE

        async def can_fast_zero(self, h: Any) -> bool:
            return True

    plugin = Everything()
    ctx = await open_top(plugin, readonly=True)
    caps = ctx.caps
    assert caps is not None
    assert (caps.write, caps.trim, caps.zero, caps.fast_zero, caps.fua) == (
        False,
        False,
        ZeroMode.NONE,
        False,
        FuaMode.NONE,
    )
    assert caps.flush and caps.extents and caps.cache is CacheMode.NATIVE
    flags = transmission_flags(caps)
    assert flags & TransmissionFlag.READ_ONLY
    for off in ("SEND_TRIM", "SEND_WRITE_ZEROES", "SEND_FAST_ZERO", "SEND_FUA"):
        assert not flags & TransmissionFlag[off], off
    for method, args, code in [
        ("pwrite", (b"x", 0), errno.EROFS),
        ("zero", (1, 0), errno.EROFS),
        ("trim", (1, 0), errno.EINVAL),
    ]:
        with pytest.raises(NBDError) as info:
            await getattr(ctx, method)(*args)
        assert info.value.errno == code
    assert plugin.calls == []
    # The same plugin opened writable has them all.
    rw = await open_top(Everything())
    assert rw.caps is not None and rw.caps.write and rw.caps.fua is FuaMode.NATIVE


def test_the_command_with_r_serves_read_only() -> None:
    with trionbd_process("-r", "memory", "1M") as server:
        info = export_info(server.uri)
        out = libnbd_python(
            f"""
import nbd
h = nbd.NBD()
h.connect_uri({server.uri!r})
try:
    h.pwrite(b"x", 0)
except nbd.Error as e:
    print("refused", e.errno)
"""
        )
    assert info["is_read_only"] is True
    assert (info["can_trim"], info["can_zero"], info["can_fua"], info["can_fast_zero"]) == (
        False,
        False,
        False,
        False,
    )
    assert out.startswith("refused")


async def test_a_bad_size_fails_the_open() -> None:
    class BadSize(Base):
        async def get_size(self, h: Any) -> int:
            return -1

    with pytest.raises(NBDError) as info:
        await open_top(BadSize())
    assert info.value.errno == errno.EIO
    assert "get_size returned -1" in info.value.message


# --- FUA -----------------------------------------------------------------------------------


async def test_fua_is_emulated_with_a_flush_after_the_write() -> None:
    plugin = Flushable()
    ctx = await open_top(plugin)
    await ctx.pwrite(b"abc", 10, CmdFlag.FUA)
    assert plugin.calls == [("pwrite", 3, 10, 0, False), ("flush", 0)]
    plugin.calls.clear()
    await ctx.pwrite(b"abc", 10, 0)
    assert plugin.calls == [("pwrite", 3, 10, 0, False)]


async def test_fua_on_trim_is_emulated_too() -> None:
    plugin = Full()
    ctx = await open_top(plugin)
    await ctx.trim(4096, 0, CmdFlag.FUA)
    assert plugin.calls == [("trim", 4096, 0, 0), ("flush", 0)]


async def test_native_fua_reaches_the_plugin_without_a_flush() -> None:
    class NativeFua(Flushable):
        async def can_fua(self, h: Any) -> FuaMode:
            return FuaMode.NATIVE

    plugin = NativeFua()
    ctx = await open_top(plugin)
    await ctx.pwrite(b"abc", 0, CmdFlag.FUA)
    assert plugin.calls == [("pwrite", 3, 0, int(CmdFlag.FUA), False)]


async def test_emulated_fua_without_flush_is_no_fua() -> None:
    class Claims(Writable):
        async def can_fua(self, h: Any) -> FuaMode:
            return FuaMode.EMULATE

    ctx = await open_top(Claims())
    assert ctx.caps is not None and ctx.caps.fua is FuaMode.NONE


# --- zeroing -------------------------------------------------------------------------------


async def test_zeroing_is_emulated_with_writes_of_zeroes_and_one_flush_for_fua() -> None:
    plugin = Flushable()
    ctx = await open_top(plugin)
    count, offset = 2 * EMULATION_CHUNK + 100, 5
    await ctx.zero(count, offset, CmdFlag.FUA)
    writes = [c for c in plugin.calls if c[0] == "pwrite"]
    assert all(c[1] <= EMULATION_CHUNK and c[4] for c in writes)  # all zeroes, bounded
    pos = offset
    for _, n, off, flags, _ in writes:
        assert off == pos and flags == 0
        pos += n
    assert pos == offset + count
    assert plugin.calls[-1] == ("flush", 0) and plugin.calls.count(("flush", 0)) == 1


async def test_emulated_zeroing_with_native_fua_sends_fua_with_every_write() -> None:
    """FUA covers the whole zeroed range: with native FUA each write of zeroes carries it
    (as nbdkit's emulation does), not only the last one."""

    class NativeFua(Flushable):
        async def can_fua(self, h: Any) -> FuaMode:
            return FuaMode.NATIVE

    plugin = NativeFua()
    ctx = await open_top(plugin)
    count, offset = 2 * EMULATION_CHUNK + 100, 5
    await ctx.zero(count, offset, CmdFlag.FUA)
    assert [c[1:] for c in plugin.calls] == [
        (EMULATION_CHUNK, offset, int(CmdFlag.FUA), True),
        (EMULATION_CHUNK, offset + EMULATION_CHUNK, int(CmdFlag.FUA), True),
        (100, offset + 2 * EMULATION_CHUNK, int(CmdFlag.FUA), True),
    ]
    assert all(c[0] == "pwrite" for c in plugin.calls)


async def test_fast_zero_fails_at_once_when_zeroing_is_emulated() -> None:
    plugin = Writable()
    ctx = await open_top(plugin)
    with pytest.raises(NBDError) as info:
        await ctx.zero(EMULATION_CHUNK, 0, CmdFlag.FAST_ZERO)
    assert info.value.errno == errno.ENOTSUP
    assert plugin.calls == []


async def test_fast_zero_with_native_zero() -> None:
    plugin = Full()  # native zero, can_fast_zero False by default
    ctx = await open_top(plugin)
    with pytest.raises(NBDError) as info:
        await ctx.zero(100, 0, CmdFlag.FAST_ZERO)
    assert info.value.errno == errno.ENOTSUP
    assert plugin.calls == []
    await ctx.zero(100, 0, CmdFlag.NO_HOLE)
    assert plugin.calls == [("zero", 100, 0, int(CmdFlag.NO_HOLE))]

    class Fast(Full):
        async def can_fast_zero(self, h: Any) -> bool:
            return True

    fast = Fast()
    ctx = await open_top(fast)
    await ctx.zero(100, 0, CmdFlag.FAST_ZERO)
    assert fast.calls == [("zero", 100, 0, int(CmdFlag.FAST_ZERO))]


# --- cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(CacheMode))
async def test_cache_native_emulated_or_nothing(mode: CacheMode) -> None:
    class Cached(Full):
        async def can_cache(self, h: Any) -> CacheMode:
            return mode

    plugin = Cached()
    ctx = await open_top(plugin)
    count, offset = 2 * EMULATION_CHUNK + 10, 3
    await ctx.cache(count, offset)
    if mode is CacheMode.NATIVE:
        assert plugin.calls == [("cache", count, offset, 0)]
    elif mode is CacheMode.NONE:
        assert plugin.calls == []
    else:
        assert plugin.calls == [
            ("pread", EMULATION_CHUNK, offset, 0),
            ("pread", EMULATION_CHUNK, offset + EMULATION_CHUNK, 0),
            ("pread", 10, offset + 2 * EMULATION_CHUNK, 0),
        ]


# --- extents -------------------------------------------------------------------------------


def test_clip_extents_starts_at_offset_clips_the_end_and_merges() -> None:
    raw = [Extent(0, 100, 1), Extent(100, 50, 1), Extent(150, 50, 0), Extent(200, 1000, 3)]
    assert clip_extents("t", raw, 200, 40) == [
        Extent(40, 110, 1),
        Extent(150, 50, 0),
        Extent(200, 40, 3),
    ]
    # REQ_ONE: one extent, merged with its equal neighbours; nothing beyond it matters.
    assert clip_extents("t", raw, 200, 40, req_one=True) == [Extent(40, 110, 1)]
    gap_after = [Extent(0, 10, 1), Extent(10, 10, 1), Extent(30, 10, 0)]
    assert clip_extents("t", gap_after, 100, 5, req_one=True) == [Extent(5, 15, 1)]
    # Short answers are fine; empty and already-passed extents are skipped.
    skipped = [Extent(0, 10, 0), Extent(10, 0, 1), Extent(10, 5, 1)]
    assert clip_extents("t", skipped, 100, 10) == [Extent(10, 5, 1)]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([Extent(10, 5, 0)], "gap at offset 5 (next extent starts at 10)"),
        ([Extent(5, 5, 0), Extent(12, 5, 0)], "gap at offset 10 (next extent starts at 12)"),
        ([], "no extents returned for offset 5"),
        ([Extent(0, 5, 0)], "no extents returned for offset 5"),
    ],
)
def test_clip_extents_rejects_gaps_and_late_starts(raw: list[Extent], message: str) -> None:
    with pytest.raises(NBDError) as info:
        clip_extents("layer", raw, 100, 5)
    assert info.value.errno == errno.EIO
    assert info.value.message.startswith("layer: ")
    assert message in info.value.message


async def test_next_extents_are_clipped_and_default_to_data() -> None:
    class Wide(Base):
        async def can_extents(self, h: Any) -> bool:
            return True

        async def extents(self, h: Any, count: int, offset: int, flags: int) -> Iterable[Extent]:
            return [Extent(0, 4096, 0), Extent(4096, 4096, 0), Extent(8192, SIZE, 3)]

    ctx = await open_top(Wide())
    assert await ctx.extents(10000, 100) == [Extent(100, 8092, 0), Extent(8192, 1908, 3)]
    assert await ctx.extents(10000, 100, CmdFlag.REQ_ONE) == [Extent(100, 8092, 0)]
    plain = await open_top(Base())
    assert await plain.extents(777, 5) == [Extent(5, 777, 0)]


# --- concurrency ---------------------------------------------------------------------------


class Counting(Base):
    """Reads take one (virtual) second; ``most`` is the peak of reads at once."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.most = 0

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await trio.sleep(1)
        finally:
            self.now -= 1
        return bytes(count)


async def peak(plugin: Counting, contexts: list[Next], per_context: int) -> int:
    async with trio.open_nursery() as nursery:
        for ctx in contexts:
            for _ in range(per_context):
                nursery.start_soon(ctx.pread, 1, 0)
    return plugin.most


@pytest.mark.parametrize(
    ("concurrency", "one_context", "two_contexts"),
    [
        (Concurrency.PARALLEL, 4, 8),
        (Concurrency.SERIALIZE_REQUESTS, 1, 2),
        (Concurrency.SERIALIZE_ALL_REQUESTS, 1, 1),
    ],
)
async def test_declared_concurrency_is_enforced(
    autojump_clock: trio.testing.MockClock,
    concurrency: Concurrency,
    one_context: int,
    two_contexts: int,
) -> None:
    class Declared(Counting):
        pass

    Declared.concurrency = concurrency
    plugin = Declared()
    layer = Chain(plugin).top
    a, b = await layer.open(True, ""), await layer.open(True, "")
    assert await peak(plugin, [a], 4) == one_context
    plugin.most = 0
    assert await peak(plugin, [a, b], 4) == two_contexts


async def test_a_filters_declared_concurrency_applies_to_its_callbacks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Serial(Filter):
        name = "serial"
        concurrency = Concurrency.SERIALIZE_REQUESTS

    plugin = Counting()  # parallel
    chain = Chain(plugin, [Serial()])
    assert chain.concurrency is Concurrency.SERIALIZE_REQUESTS
    a, b = await chain.top.open(True, ""), await chain.top.open(True, "")
    assert await peak(plugin, [a], 4) == 1
    plugin.most = 0
    assert await peak(plugin, [a, b], 3) == 2
    # Underneath, the plugin's own contexts stay parallel.
    plugin.most = 0
    assert a.below is not None
    assert await peak(plugin, [a.below], 4) == 4


async def test_a_serialized_plugin_is_not_closed_while_a_request_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``close`` takes the layer's lock like the data callbacks (nbdkit closes under its
    request lock): one connection's close waits for another's read to finish."""

    class Serial(Counting):
        concurrency = Concurrency.SERIALIZE_ALL_REQUESTS

        async def close(self, h: Any) -> None:
            self.calls.append(("close", self.now))

    plugin = Serial()
    layer = Chain(plugin).top
    a, b = await layer.open(True, ""), await layer.open(True, "")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.pread, 1, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert plugin.now == 1
        await b.close()
        assert plugin.calls == [("close", 0)]  # after the read, not during it


async def test_serialize_connections_in_a_filter_serializes_clients_at_the_server() -> None:
    class OneClient(Filter):
        name = "oneclient"
        concurrency = Concurrency.SERIALIZE_CONNECTIONS

    class Opens(Writable):
        def __init__(self) -> None:
            super().__init__()
            self.open_now = 0
            self.most = 0

        async def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
            self.open_now += 1
            self.most = max(self.most, self.open_now)

        async def close(self, h: Any) -> None:
            self.open_now -= 1

    plugin = Opens()
    chain = Chain(plugin, [OneClient()])
    assert chain.concurrency is Concurrency.SERIALIZE_CONNECTIONS
    async with serving(chain) as server:
        first = await connect(server)
        await first.go()
        second = await connect(server)
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def second_client() -> None:
                await second.go()
                await second.write(0, b"second")
                done.set()

            nursery.start_soon(second_client)
            await first.write(0, b"first")
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert not done.is_set()
            await first.disconnect()
            assert await first.eof()
        assert done.is_set()
    assert plugin.most == 1
    assert [c[:3] for c in plugin.calls] == [("pwrite", 5, 0), ("pwrite", 6, 0)]


# --- plain def callbacks -------------------------------------------------------------------


async def test_plain_def_callbacks_run_in_worker_threads() -> None:
    main = threading.get_ident()
    seen: dict[str, int] = {}

    class Sync(Plugin):
        name = "sync"
        instances: ClassVar[list[Sync]] = []

        def open(self, readonly: bool, export_name: str, is_tls: bool) -> str:  # type: ignore[override]
            seen["open"] = threading.get_ident()
            return export_name

        def get_size(self, h: Any) -> int:  # type: ignore[override]
            seen["get_size"] = threading.get_ident()
            return 4096

        def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:  # type: ignore[override]
            seen["pread"] = threading.get_ident()
            # A worker thread can reach back into Trio.
            trio.from_thread.run_sync(lambda: seen.setdefault("trio", threading.get_ident()))
            return b"s" * count

        def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:  # type: ignore[override]
            seen["pwrite"] = threading.get_ident()

        def close(self, h: Any) -> None:  # type: ignore[override]
            seen["close"] = threading.get_ident()

    class Async(Filter):
        async def pread(self, next: Next, h: Any, count: int, offset: int, flags: int) -> bytes:
            seen["filter"] = threading.get_ident()
            return await next.pread(count, offset, flags)

    ctx = await Chain(Sync(), [Async()]).top.open(False, "x")
    assert await ctx.pread(3, 0) == b"sss"
    await ctx.pwrite(b"w", 0)
    await ctx.close()
    workers = {k: v for k, v in seen.items() if k not in ("trio", "filter")}
    assert set(workers) == {"open", "get_size", "pread", "pwrite", "close"}
    assert main not in workers.values()
    assert seen["trio"] == main and seen["filter"] == main


async def test_a_filters_plain_def_export_callbacks_and_open_run_in_worker_threads() -> None:
    main = threading.get_ident()
    seen: dict[str, int] = {}

    class SyncFilter(Filter):
        def list_exports(  # type: ignore[override]
            self, below: Layer, readonly: bool, is_tls: bool
        ) -> list[Export]:
            seen["list_exports"] = threading.get_ident()
            return [Export("only")]

        def default_export(  # type: ignore[override]
            self, below: Layer, readonly: bool, is_tls: bool
        ) -> str:
            seen["default_export"] = threading.get_ident()
            return "only"

        def open(  # type: ignore[override]
            self, below: Layer, readonly: bool, export_name: str, is_tls: bool
        ) -> tuple[Next, Any]:
            seen["open"] = threading.get_ident()
            return trio.from_thread.run(below.open, readonly, "", is_tls), export_name

    top = Chain(Base(), [SyncFilter()]).top
    assert list(await top.list_exports(True, False)) == [Export("only")]
    assert await top.default_export(True, False) == "only"
    ctx = await top.open(True, "only")
    assert ctx.handle == "only" and await ctx.pread(4, 0) == bytes(range(4))
    await ctx.close()
    assert set(seen) == {"list_exports", "default_export", "open"}
    assert main not in seen.values()


async def test_layers_name_themselves_in_errors() -> None:
    layer = Layer(Base(), None)
    assert layer.name == "base"
    ctx = await layer.open(True, "")
    with pytest.raises(NBDError) as info:
        await ctx.flush()
    assert info.value.message == "base: flush is not supported"


# --- the callbacks are declared once ------------------------------------------------------


def next_callbacks() -> set[str]:
    """The per-connection callbacks, as Next (chain/next.py) declares them."""
    return {
        name
        for name, value in vars(Next).items()
        if inspect.iscoroutinefunction(value) and not name.startswith("_")
    }


def lacking(cls: type, names: Iterable[str]) -> set[str]:
    return {n for n in names if not inspect.iscoroutinefunction(getattr(cls, n, None))}


def test_every_callback_of_next_is_on_each_base_class_and_forwarded() -> None:
    """The callbacks are written out in several places (docs/architecture.md, "How to
    add a callback", says which and why); mypy checks the contexts against Next, and
    this test, which CI runs, checks each place has every one: the author's base
    classes define it, ForwardingPlugin forwards it, LayerContext and ClientContext
    implement it, CachedCaps answers every capability, each capability of Caps is asked
    from one of them (a LifetimeContext: the next test)."""
    callbacks = next_callbacks()
    assert {"pread", "can_write", "close", "export_description"} <= callbacks
    for cls in (Plugin, Filter, LayerContext, ClientContext):
        assert lacking(cls, callbacks) == set(), cls
    assert {n for n in callbacks if n not in vars(ForwardingPlugin)} == set()
    asked = {ask.callback for _, ask in CAPABILITIES}
    assert asked <= callbacks and len(asked) == len(fields(Caps))
    assert asked == {n for n, v in vars(CachedCaps).items() if inspect.iscoroutinefunction(v)}


GUARDED_CALLS: dict[str, tuple[Any, ...]] = {
    "export_description": (),
    "pread": (1, 0),
    "pwrite": (b"x", 0),
    "flush": (),
    "trim": (1, 0),
    "zero": (1, 0),
    "extents": (1, 0),
    "cache": (1, 0),
    "meta_extents": ("x:runs", 1, 0),
}
"""A call of each callback of a lifetime context that reaches the context it wraps."""


async def test_a_lifetime_context_guards_every_callback_but_the_capabilities() -> None:
    """Each callback of Next that is not a capability (answered from the caps) or close
    (unload's) goes through the lifetime's guard: it works until unload and is refused
    with ESHUTDOWN after. A callback added to Next fails here until it is guarded."""
    asked = {ask.callback for _, ask in CAPABILITIES}
    assert set(GUARDED_CALLS) == next_callbacks() - asked - {"close"}
    async with open_lifetime(Chain(Tagged())) as lifetime:
        shared = await lifetime.open_context(lifetime.chain.top, "", readonly=False)
        for name, args in GUARDED_CALLS.items():
            if name not in ("pwrite", "trim", "zero", "flush"):  # Tagged cannot do these
                await getattr(shared, name)(*args)
    for name, args in GUARDED_CALLS.items():
        with pytest.raises(NBDError) as info:
            await getattr(shared, name)(*args)
        assert info.value.errno == errno.ESHUTDOWN, name


# --- metadata contexts besides base:allocation --------------------------------------------


class Tagged(Base):
    """Offers one context, 'x:runs', whose status alternates every 1000 bytes."""

    async def meta_contexts(self, readonly: bool, export_name: str, is_tls: bool) -> list[str]:
        return ["x:runs"]

    async def meta_extents(
        self, h: Any, context: str, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        if context != "x:runs":
            return await super().meta_extents(h, context, count, offset, flags)
        self.calls.append(("meta_extents", context, count, offset, flags))
        start = offset - offset % 1000
        return [Extent(s, 1000, s // 1000 % 2) for s in range(start, offset + count, 1000)]


class Marks(Filter):
    """Adds its own context, 'y:NAME', in front of the layer below's."""

    name = "marks"

    async def meta_contexts(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> list[str]:
        return [f"y:{export_name}", *await below.meta_contexts(readonly, export_name, is_tls)]

    async def meta_extents(
        self, next: Next, h: Any, context: str, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        if context.startswith("y:"):
            return [Extent(offset, count, 7)]
        return await next.meta_extents(context, count, offset, flags)


async def test_meta_contexts_are_named_per_export_and_answered_clipped() -> None:
    assert await Chain(Base(), [Filter()]).top.meta_contexts(False, "e", False) == []
    plugin = Tagged()
    chain = Chain(plugin, [Filter(), Marks()])  # Filter() nearest the client
    assert await chain.layers[1].meta_contexts(False, "e", False) == ["y:e", "x:runs"]
    # A filter does not pass the contexts below it up unless it says so: it might move
    # or change the data they describe.
    assert await chain.top.meta_contexts(False, "e", False) == []
    ctx = await chain.top.open(False, "e")
    # Through the filters to the plugin, clipped to the range, REQ_ONE honoured.
    assert await ctx.meta_extents("x:runs", 2500, 500) == [
        Extent(500, 500, 0), Extent(1000, 1000, 1), Extent(2000, 1000, 0),
    ]  # fmt: skip
    assert await ctx.meta_extents("x:runs", 2500, 500, CmdFlag.REQ_ONE) == [Extent(500, 500, 0)]
    assert plugin.calls[-1] == ("meta_extents", "x:runs", 2500, 500, CmdFlag.REQ_ONE)
    assert await ctx.meta_extents("y:e", 10, 5) == [Extent(5, 10, 7)]
    with pytest.raises(NBDError) as info:
        await ctx.meta_extents("z:none", 10, 0)
    assert info.value.errno == errno.EINVAL and "no metadata context 'z:none'" in info.value.message
    await ctx.close()


async def test_a_forwarding_plugin_and_a_lifetime_context_forward_meta_extents() -> None:
    @dataclass
    class Held:
        ctx: Next

    class Holder(ForwardingPlugin[Held]):
        name = "holder"

        async def open(self, readonly: bool, export_name: str, is_tls: bool) -> Held:
            return Held(await Chain(Tagged()).top.open(readonly, export_name, is_tls))

    ctx = await Chain(Holder()).top.open(False, "")
    assert await ctx.meta_extents("x:runs", 10, 995) == [Extent(995, 5, 0), Extent(1000, 5, 1)]
    await ctx.close()
    async with open_lifetime(Chain(Tagged())) as lifetime:
        shared = await lifetime.open_context(lifetime.chain.top, "", readonly=False)
        assert await shared.meta_extents("x:runs", 10, 0) == [Extent(0, 10, 0)]
