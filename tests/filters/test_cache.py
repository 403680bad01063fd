"""The cache filter: what reaches the layer below in each mode (in process, through a
recording filter), write-back on flush, eviction of least recently used blocks with
dirty ones written first, concurrent partial writes of one block; with real clients:
bytes, the unlinked cache file, re-reads that no longer reach the layer below, and the
flags nbdkit's cache filter offers."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.filters.parity import same_caps
from tests.filters.recording import Recording, recorded
from tests.filters.test_cow import overlay_files
from tests.filters.test_offset import HOLE
from tests.support import random_file, read_export, run, trionbd_exit, trionbd_process
from trionbd.chain import CacheMode, Chain, Extent, FuaMode, NBDError, Next, Plugin, ZeroMode
from trionbd.filters.cache import CLEAN, DIRTY, CacheFilter
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import CmdFlag

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 64 * KiB
FUA = int(CmdFlag.FUA)


def cache_filter(**params: Any) -> CacheFilter:
    f = CacheFilter(**params)
    f.get_ready()
    return f


async def filled(size: int = MiB, **params: Any) -> tuple[Next, Recording, MemoryPlugin]:
    """A context of the cache over a recording filter over a memory disk whose every
    byte is set (byte i holds i % 251)."""
    plugin = MemoryPlugin(size)
    ctx0 = await Chain(plugin, []).top.open(False, "")
    await ctx0.pwrite(bytes(i % 251 for i in range(size)), 0)
    await ctx0.close()
    chain, rec = recorded(plugin, cache_filter(**params))
    return await chain.top.open(False, ""), rec, plugin


def pattern(offset: int, count: int) -> bytes:
    return bytes(i % 251 for i in range(offset, offset + count))


async def test_writeback_keeps_writes_until_a_flush() -> None:
    ctx, rec, plugin = await filled()
    try:
        await ctx.pwrite(b"a" * 100, BLOCK + 10)  # partial, not cached: the block is read
        await ctx.pwrite(b"b" * BLOCK, 3 * BLOCK)  # a whole block: nothing to read
        assert rec.calls == [("pread", BLOCK, BLOCK, 0)]
        expected = pattern(BLOCK, 10) + b"a" * 100 + pattern(BLOCK + 110, BLOCK - 110)
        assert await ctx.pread(BLOCK, BLOCK) == expected
        assert await plugin.pread(None, 100, BLOCK + 10, 0) == pattern(BLOCK + 10, 100)
        rec.calls.clear()
        await ctx.flush()
        assert rec.calls == [
            ("pwrite", BLOCK, BLOCK, 0),
            ("pwrite", BLOCK, 3 * BLOCK, 0),
            ("flush", 0, 0, 0),
        ]
        assert await plugin.pread(None, BLOCK, BLOCK, 0) == expected
        rec.calls.clear()
        await ctx.flush()
        assert rec.calls == [("flush", 0, 0, 0)]  # nothing dirty any more
        assert await ctx.pread(BLOCK, 3 * BLOCK) == b"b" * BLOCK
        assert rec.calls == [("flush", 0, 0, 0)]  # served from the cache
    finally:
        await ctx.close()


async def test_fua_writes_go_through_in_writeback_mode() -> None:
    ctx, rec, plugin = await filled()
    try:
        await ctx.pwrite(b"f" * 100, 0, FUA)
        assert rec.calls == [("pwrite", 100, 0, FUA)]  # through at once, nothing read
        assert await plugin.pread(None, 100, 0, 0) == b"f" * 100
        await ctx.pwrite(b"w" * BLOCK, BLOCK)
        await ctx.pwrite(b"x" * 10, BLOCK + 5, FUA)  # into a dirty block: it stays dirty
        rec.calls.clear()
        await ctx.flush()
        assert rec.calls == [("pwrite", BLOCK, BLOCK, 0), ("flush", 0, 0, 0)]
    finally:
        await ctx.close()


async def test_writethrough() -> None:
    ctx, rec, _ = await filled(cache="writethrough")
    try:
        assert await ctx.can_multi_conn()  # the memory plugin's answer
        await ctx.pwrite(b"t" * (2 * BLOCK), BLOCK // 2)  # one whole block, two parts
        assert rec.calls == [("pwrite", 2 * BLOCK, BLOCK // 2, 0)]
        rec.calls.clear()
        assert await ctx.pread(BLOCK, BLOCK) == b"t" * BLOCK  # the whole block was kept
        assert await ctx.pread(10, 0) == pattern(0, 10)  # the partial one was not
        assert rec.calls == [("pread", 10, 0, 0)]
        rec.calls.clear()
        await ctx.flush()
        assert rec.calls == [("flush", 0, 0, 0)]
    finally:
        await ctx.close()


async def test_unsafe_ignores_flush_and_fua() -> None:
    ctx, rec, plugin = await filled(cache="unsafe")
    try:
        assert await ctx.can_fua() is FuaMode.NATIVE
        await ctx.pwrite(b"u" * BLOCK, 0, FUA)
        await ctx.flush()
        assert rec.calls == []
        assert await ctx.pread(BLOCK, 0) == b"u" * BLOCK
    finally:
        await ctx.close()
    assert rec.calls == []  # not even when the last client leaves
    assert await plugin.pread(None, 10, 0, 0) == pattern(0, 10)


async def test_the_last_client_leaving_writes_back() -> None:
    ctx, rec, plugin = await filled()
    await ctx.pwrite(b"l" * 10, 5)
    await ctx.close()
    assert rec.commands() == ["pread", "pwrite", "flush"]
    assert await plugin.pread(None, 20, 0, 0) == pattern(0, 5) + b"l" * 10 + pattern(15, 5)


async def test_flush_over_a_layer_without_one() -> None:
    for mode, offered in (("writeback", True), ("writethrough", False), ("unsafe", True)):
        chain, rec = recorded(MemoryPlugin(MiB), cache_filter(cache=mode), can_flush=False)
        ctx = await chain.top.open(False, "")
        try:
            assert await ctx.can_flush() is offered
            if mode == "writeback":
                await ctx.pwrite(b"w" * BLOCK, 0)
                await ctx.flush()  # written back; the layer below is not flushed
                assert rec.calls == [("pwrite", BLOCK, 0, 0)]
        finally:
            await ctx.close()
    chain, _ = recorded(MemoryPlugin(MiB), cache_filter(), can_flush=False, can_write=False)
    ctx = await chain.top.open(False, "")
    assert not await ctx.can_flush()  # read-only below: nothing to write back
    await ctx.close()


async def test_cache_on_read_and_cache_requests() -> None:
    ctx, rec, _ = await filled(cache_on_read=True)
    try:
        assert await ctx.pread(100, BLOCK - 50) == pattern(BLOCK - 50, 100)
        assert rec.calls == [("pread", 2 * BLOCK, 0, 0)]  # whole blocks, kept
        assert await ctx.pread(2 * BLOCK, 0) == pattern(0, 2 * BLOCK)
        assert await ctx.can_cache() is CacheMode.NATIVE
        await ctx.cache(10, 5 * BLOCK + 3)
        await ctx.cache(10, 5 * BLOCK + 3)
        assert rec.calls == [("pread", 2 * BLOCK, 0, 0), ("pread", BLOCK, 5 * BLOCK, 0)]
    finally:
        await ctx.close()
    ctx, rec, _ = await filled()  # cache-on-read off: reads pass, uncached
    try:
        for _ in range(2):
            assert await ctx.pread(100, 10) == pattern(10, 100)
        assert rec.calls == [("pread", 100, 10, 0)] * 2
    finally:
        await ctx.close()


async def test_cache_on_read_while_a_file_exists(tmp_path: Path) -> None:
    switch = tmp_path / "on"
    ctx, rec, _ = await filled(cache_on_read=str(switch))
    try:
        await ctx.pread(10, 0)
        switch.touch()
        await ctx.pread(10, 0)
        await ctx.pread(10, 0)
        assert rec.calls == [("pread", 10, 0, 0), ("pread", BLOCK, 0, 0)]
    finally:
        await ctx.close()


async def test_zeroing_and_block_status() -> None:
    plugin = MemoryPlugin(MiB)  # all holes
    chain, rec = recorded(plugin, cache_filter())
    ctx = await chain.top.open(False, "")
    try:
        assert await ctx.can_zero() is ZeroMode.NATIVE and await ctx.can_fast_zero()
        with pytest.raises(NBDError) as caught:
            await ctx.zero(BLOCK, 0, CmdFlag.FAST_ZERO)
        assert caught.value.errno == 95  # ENOTSUP
        await ctx.pwrite(b"d" * BLOCK, 2 * BLOCK)
        await ctx.zero(BLOCK, 4 * BLOCK)
        # Dirty blocks are data whatever the layer below says; the rest is its answer.
        assert await ctx.extents(6 * BLOCK, 0) == [
            Extent(0, 2 * BLOCK, HOLE),
            Extent(2 * BLOCK, BLOCK, 0),
            Extent(3 * BLOCK, BLOCK, HOLE),
            Extent(4 * BLOCK, BLOCK, 0),
            Extent(5 * BLOCK, BLOCK, HOLE),
        ]
        rec.calls.clear()
        await ctx.flush()  # the zeroed block is zeroed below, not written
        assert rec.calls == [
            ("pwrite", BLOCK, 2 * BLOCK, 0),
            ("zero", BLOCK, 4 * BLOCK, 0),
            ("flush", 0, 0, 0),
        ]
        assert await ctx.pread(BLOCK, 4 * BLOCK) == bytes(BLOCK)
    finally:
        await ctx.close()


async def test_eviction_of_least_recently_used_blocks() -> None:
    # 1M at most: eviction starts at 95% (16 blocks of 64K held) and goes below 80%
    # (down to 12 blocks).
    ctx, rec, plugin = await filled(4 * MiB, cache_on_read=True, cache_max_size=MiB)
    h = ctx.handle
    try:
        for block in range(15):
            await ctx.pread(10, block * BLOCK)
        await ctx.pwrite(b"D" * 10, 3 * BLOCK)  # block 3: dirty and recently used
        await ctx.pread(10, 0)  # block 0: recently used
        assert h.cached == 15
        rec.calls.clear()
        await ctx.pread(10, 15 * BLOCK)  # the 16th block: reclaim
        assert h.cached == 12
        cached = [b for b in range(16) if h.states[b]]
        assert cached == [0, 3, *range(6, 16)]  # 1, 2, 4, 5 were the oldest
        assert h.states[3] == DIRTY and h.states[0] == CLEAN
        assert rec.commands() == ["pread"]  # clean blocks are dropped, not written
        # A dirty block is written back before it goes: the oldest now are 6 to 14, then
        # 3; every four blocks read evict four.
        for block in range(16, 28):
            await ctx.pread(10, block * BLOCK)
        assert h.states[3] == 0
        assert ("pwrite", BLOCK, 3 * BLOCK, 0) in rec.calls
        assert await plugin.pread(None, 12, 3 * BLOCK, 0) == b"D" * 10 + pattern(3 * BLOCK + 10, 2)
        assert os.fstat(h.fd).st_blocks * 512 <= 16 * BLOCK  # evicted blocks punched out
    finally:
        await ctx.close()


class Gated(Plugin):
    """A disk whose reads wait for ``gate`` (to hold a read-modify-write open)."""

    name = "gated"

    def __init__(self, size: int) -> None:
        self.data = bytearray(itertools.islice(itertools.cycle(range(251)), size))
        self.gate = trio.Event()
        self.gate.set()

    async def get_size(self, h: Any) -> int:
        return len(self.data)

    async def can_multi_conn(self, h: Any) -> bool:
        return True

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        await self.gate.wait()
        return bytes(self.data[offset : offset + count])

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.data[offset : offset + len(buf)] = buf

    async def flush(self, h: Any, flags: int) -> None:
        pass


async def test_concurrent_partial_writes_of_one_block_lose_nothing() -> None:
    plugin = Gated(4 * BLOCK)
    chain = Chain(plugin, [cache_filter()])
    a, b = await chain.top.open(False, ""), await chain.top.open(False, "")
    ops = [
        (a, 10, b"A" * 100),  # partial: reads the block below, then waits
        (b, 5000, b"C" * 300),  # another part of the same block, waits for it
        (b, 0, b"B" * BLOCK),  # the whole block
        (a, BLOCK - 7, b"D" * 14),  # straddles blocks 0 and 1
        (b, 3 * BLOCK, b"E" * 10),  # elsewhere: not held up
    ]
    plugin.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        for ctx, where, data in ops:
            nursery.start_soon(ctx.pwrite, data, where, 0)
            await trio.testing.wait_all_tasks_blocked()
        plugin.gate.set()
    got = await a.pread(4 * BLOCK, 0)
    orders = set()
    for order in itertools.permutations(ops):
        out = bytearray(plugin.data)
        for _, where, data in order:
            out[where : where + len(data)] = data
        orders.add(bytes(out))
    assert got in orders
    await a.flush()
    assert bytes(plugin.data) == got
    await a.close()
    await b.close()


async def test_bad_settings() -> None:
    with pytest.raises(Exception, match="below cache-high-threshold"):
        CacheFilter(cache_max_size=MiB, cache_low_threshold=95, cache_high_threshold=90)
    for bad in ("cache=fast", "cache-min-block-size=1000", "cache-max-size=100K"):
        result = trionbd_exit("--filter=cache", "memory", "1M", bad)
        assert result.returncode == 2
        assert bad.split("=")[0] in result.stderr


def cache_env(directory: Path) -> dict[str, str]:
    directory.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(directory)}


def test_nbdcopy_through_the_cache_in_an_unlinked_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    random_file(path, 8 * MiB + 1000)
    new = random_file(tmp_path / "new.img", 8 * MiB + 1000, seed=4)
    caches = tmp_path / "caches"
    with trionbd_process("--filter=cache", "file", str(path), env=cache_env(caches)) as server:
        run(["nbdcopy", str(tmp_path / "new.img"), server.uri])  # nbdcopy flushes at the end
        assert path.read_bytes() == new
        assert list(caches.iterdir()) == []  # unlinked at once
        (cache_file,) = overlay_files(server.proc.pid, caches)
        assert cache_file.stat().st_size == 8 * MiB + BLOCK  # whole blocks
        assert read_export(server.uri, tmp_path) == new


def test_re_reads_do_not_reach_the_layer_below(tmp_path: Path) -> None:
    """A slow layer (delayed reads) under the cache: the second copy is served from the
    cache, as the log filter between them shows."""
    path = tmp_path / "disk.img"
    data = random_file(path, 4 * MiB)
    log = tmp_path / "log"
    args = ["--filter=cache", "--filter=log", "--filter=delay", "file", str(path)]
    params = [f"logfile={log}", "rdelay=10ms", "cache-on-read=true"]
    with trionbd_process(*args, *params, env=cache_env(tmp_path / "c")) as server:
        assert read_export(server.uri, tmp_path) == data
        reads = log.read_text().count(" Read ")
        assert reads > 0
        assert read_export(server.uri, tmp_path) == data
        assert log.read_text().count(" Read ") == reads


@pytest.mark.parametrize("mode", ["writeback", "writethrough", "unsafe"])
def test_flags_match_nbdkit(mode: str, tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    random_file(path, MiB)
    caps = same_caps(["file", str(path)], "--filter=cache", f"cache={mode}")
    assert caps["can_cache"] is True and caps["can_fast_zero"] is True
    caps = same_caps(["pattern", "1M"], "--filter=cache", f"cache={mode}")  # read-only
    assert caps["can_flush"] is (mode == "unsafe")
