"""The delay filter: each command waits its own delay, without holding up others
(checked in virtual time), and real clients still get correct data."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.server.nbdclient import memory_client
from tests.support import libnbd_python, random_file, serving, trionbd_process
from trionbd.chain import Chain, ConfigError, NBDError, Next
from trionbd.filters.delay import DelayFilter, parse_delay
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import Cmd, CmdFlag

MiB = 1 << 20


class CachingMemory(MemoryPlugin):
    """A memory disk that accepts cache requests (so they reach the filter)."""

    async def cache(self, h: object, count: int, offset: int, flags: int) -> None:
        pass


async def timed(call: object, *args: object) -> float:
    start = trio.current_time()
    await call(*args)  # type: ignore[operator]
    return trio.current_time() - start


async def test_each_command_waits_its_own_delay(autojump_clock: trio.testing.MockClock) -> None:
    delay = DelayFilter.from_params(
        [
            ("delay-read", "1"),
            ("delay-write", "2"),
            ("delay-zero", "3000ms"),
            ("delay-trim", "4"),
            ("delay-extents", "5"),
            ("delay-cache", "6"),
            ("delay-flush", "7"),
        ]
    )
    chain = Chain(CachingMemory(MiB), [delay])
    ctx: Next = await chain.top.open(False, "", False)
    try:
        assert await timed(ctx.pread, 512, 0) == pytest.approx(1)
        assert await timed(ctx.pwrite, b"x" * 512, 0) == pytest.approx(2)
        assert await timed(ctx.zero, 512, 0) == pytest.approx(3)
        assert await timed(ctx.trim, 512, 0) == pytest.approx(4)
        assert await timed(ctx.extents, 512, 0) == pytest.approx(5)
        assert await timed(ctx.cache, 512, 0) == pytest.approx(6)
        assert await timed(ctx.flush) == pytest.approx(7)
    finally:
        await ctx.close()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # read, write, zero, trim, extents, cache, flush
        ((("rdelay", "100ms"), ("wdelay", "0.5")), (0.1, 0.5, 0.5, 0.5, 0, 0, 0)),
        ((("delay-cache", "3"), ("delay-extents", "2")), (0, 0, 0, 0, 2, 3, 0)),
        ((("wdelay", "1"), ("delay-zero", "2"), ("delay-write", "0")), (0, 0, 2, 1, 0, 0, 0)),
        ((("delay-trim", "250ms"),), (0, 0, 0, 0.25, 0, 0, 0)),
        ((), (0, 0, 0, 0, 0, 0, 0)),
    ],
)
async def test_wdelay_and_rdelay_and_what_wins(
    autojump_clock: trio.testing.MockClock,
    params: tuple[tuple[str, str], ...],
    expected: tuple[float, ...],
) -> None:
    chain = Chain(CachingMemory(MiB), [DelayFilter.from_params(params)])
    ctx = await chain.top.open(False, "", False)
    try:
        times = (
            await timed(ctx.pread, 512, 0),
            await timed(ctx.pwrite, b"x" * 512, 0),
            await timed(ctx.zero, 512, 0),
            await timed(ctx.trim, 512, 0),
            await timed(ctx.extents, 512, 0),
            await timed(ctx.cache, 512, 0),
            await timed(ctx.flush),
        )
    finally:
        await ctx.close()
    assert times == pytest.approx(expected)


async def test_pipelined_reads_wait_one_delay_not_n(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """32 reads sent at once through the server take one delay in all, and every reply
    carries the right data."""
    plugin = MemoryPlugin(MiB)
    chain = Chain(plugin, [DelayFilter(rdelay=0.25, wdelay=0.25)])
    async with serving(chain) as server:
        async with memory_client(server) as client:
            await client.go()
            pattern = bytes(range(256)) * 64  # 16 KiB
            await client.write(0, pattern)
            start = trio.current_time()
            cookies = [await client.send(Cmd.READ, 512 * i, 512) for i in range(32)]
            replies = {}
            for _ in cookies:
                events = await client.reply()
                replies[events[0].cookie] = events  # type: ignore[union-attr]
            elapsed = trio.current_time() - start
            for i, cookie in enumerate(cookies):
                (chunk,) = replies[cookie]
                assert chunk.data == pattern[512 * i : 512 * (i + 1)]  # type: ignore[union-attr]
    assert elapsed == pytest.approx(0.25)


async def test_fast_zero_fails_at_once_with_delay_fast_zero_false(
    autojump_clock: trio.testing.MockClock,
) -> None:
    params = [("delay-zero", "5"), ("delay-fast-zero", "false")]
    chain = Chain(MemoryPlugin(MiB), [DelayFilter.from_params(params)])
    ctx = await chain.top.open(False, "", False)
    try:
        assert await ctx.can_fast_zero()
        start = trio.current_time()
        with pytest.raises(NBDError) as caught:
            await ctx.zero(512, 0, CmdFlag.FAST_ZERO)
        assert caught.value.errno == errno.ENOTSUP
        assert trio.current_time() == start
        assert await timed(ctx.zero, 512, 0) == pytest.approx(5)  # plain zeroing waits
    finally:
        await ctx.close()


async def test_fast_zero_waits_by_default(autojump_clock: trio.testing.MockClock) -> None:
    chain = Chain(MemoryPlugin(MiB), [DelayFilter.from_params([("delay-zero", "5")])])
    ctx = await chain.top.open(False, "", False)
    try:
        assert await timed(ctx.zero, 512, 0, CmdFlag.FAST_ZERO) == pytest.approx(5)
    finally:
        await ctx.close()


async def test_delay_open(autojump_clock: trio.testing.MockClock) -> None:
    chain = Chain(MemoryPlugin(MiB), [DelayFilter.from_params([("delay-open", "1.5")])])
    start = trio.current_time()
    ctx = await chain.top.open(False, "", False)
    assert trio.current_time() - start == pytest.approx(1.5)
    await ctx.close()


def test_the_server_gives_delayed_requests_their_own_tasks() -> None:
    assert not Chain(MemoryPlugin(MiB), [DelayFilter()]).nonblocking


def test_real_client_reads_correct_data_through_the_delay(tmp_path: Path) -> None:
    """libnbd sends 16 reads at once to the real command; all come back right. Timing is
    only bounded loosely here (one read alone waits 200 ms; serial would be 3.2 s)."""
    data = random_file(tmp_path / "disk.img", MiB)
    with trionbd_process("--filter=delay", "file", str(tmp_path / "disk.img"), "rdelay=200ms") as s:
        out = libnbd_python(
            f"""
import nbd, time
h = nbd.NBD()
h.connect_uri({s.uri!r})
bufs = [nbd.Buffer(65536) for _ in range(16)]
start = time.monotonic()
for i, b in enumerate(bufs):
    h.aio_pread(b, 65536 * i)
while h.aio_in_flight() > 0:
    h.poll(-1)
print(time.monotonic() - start)
open({str(tmp_path / "copy")!r}, "wb").write(b"".join(b.to_bytearray() for b in bufs))
h.shutdown()
"""
        )
    assert (tmp_path / "copy").read_bytes() == data
    assert 0.2 <= float(out) < 2.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("2", 2.0), ("0.5", 0.5), ("100ms", 0.1), ("1500ms", 1.5), ("2.5ms", 0.0025)],
)
def test_parse_delay(text: str, seconds: float) -> None:
    assert parse_delay(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "-1", "1s", "ms", "1 m s", "fast", "1e3"])
def test_parse_delay_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a delay"):
        parse_delay(text)


def test_rdelay_and_delay_read_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rdelay and delay-read are the same setting"):
        DelayFilter.from_params([("rdelay", "1"), ("delay-read", "2")])
    cmd = [sys.executable, "-m", "trionbd", "-f", "-U", str(tmp_path / "sock")]
    result = subprocess.run(
        [*cmd, "--filter=delay", "memory", "1M", "rdelay=soon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "bad value for rdelay=soon" in result.stderr
