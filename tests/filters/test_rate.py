"""The rate filter: token bucket arithmetic checked exactly in virtual time (Trio's
autojump clock), global and per-connection buckets, reads and writes apart, rates
changed through files; a real client gets every byte, no faster than the limit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.filters.parity import same_caps
from tests.support import random_file, read_export, trionbd_exit, trionbd_process
from trionbd.chain import Chain, Next, parse_seconds
from trionbd.filters.rate import Bucket, RateFilter, parse_rate
from trionbd.plugins.memory import MemoryPlugin

KiB = 1 << 10
MiB = 1 << 20


def test_bucket_arithmetic() -> None:
    bucket = Bucket(rate=1000, burst=2.0)  # 2000 bits when full
    assert bucket.take(1500, now=10.0) == 0  # full at its first use
    assert bucket.take(1000, now=10.0) == 0.5  # 500 there: wait for the other 500
    assert bucket.take(1000, now=10.0) == 1.5  # after those, in turn
    assert bucket.take(0, now=11.5) == 0  # paid off
    assert bucket.take(100, now=100.0) == 0  # a long pause fills it to 2000, not more
    assert bucket.take(1900, now=100.0) == 0
    assert bucket.take(1, now=100.0) == 0.001
    assert bucket.take(5000, now=100.001) == pytest.approx(5)  # more than it holds: fine
    bucket.set_rate(4000, now=101.001)  # 1 s paid at 1000, 4000 to go at 4000 a second
    assert bucket.capacity == 8000
    assert bucket.take(4000, now=102.001) == pytest.approx(1)
    bucket.set_rate(10, now=104.001)  # 4000 came in at 4000 a second, cut to the new 20
    assert (bucket.capacity, bucket.level) == (20, 20)
    assert Bucket(rate=0, burst=2.0).take(10**12, now=0.0) == 0  # no limit


async def timed(call: object, *args: object) -> float:
    start = trio.current_time()
    await call(*args)  # type: ignore[operator]
    return trio.current_time() - start


async def open_two(rate_filter: RateFilter) -> tuple[Next, Next]:
    chain = Chain(MemoryPlugin(MiB), [rate_filter])
    return await chain.top.open(False, ""), await chain.top.open(False, "")


async def test_a_connection_waits_for_its_bits(autojump_clock: trio.testing.MockClock) -> None:
    # 8000 bits/s is 1000 bytes/s; burstiness 1 s lets the first 1000 bytes through.
    a, b = await open_two(RateFilter(connection_rate=8000, burstiness=1.0))
    try:
        assert await timed(a.pread, 1000, 0) == 0
        assert await timed(a.pread, 3000, 0) == pytest.approx(3.0)
        assert await timed(a.pwrite, b"x" * 1000, 0) == 0  # writes have their own bucket
        assert await timed(b.pread, 1000, 0) == 0  # and each connection its own
        await trio.sleep(10)
        assert await timed(a.pread, 1500, 0) == pytest.approx(0.5)  # refilled to 1000 only
        assert await timed(a.flush) == 0  # flush, zero, trim are free
        assert await timed(a.zero, 100 * KiB, 0) == 0
    finally:
        await a.close()
        await b.close()


async def test_the_global_limit_is_shared(autojump_clock: trio.testing.MockClock) -> None:
    a, b = await open_two(RateFilter(rate=8000, burstiness=1.0))
    try:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.pread, 3000, 0)
            nursery.start_soon(b.pread, 3000, 0)
        # 6000 bytes at 1000 bytes/s, the first 1000 free: 5 s for both together.
        assert trio.current_time() - start == pytest.approx(5.0)
    finally:
        await a.close()
        await b.close()


async def test_global_then_connection_limit(autojump_clock: trio.testing.MockClock) -> None:
    a, _ = await open_two(RateFilter(rate=80000, connection_rate=8000, burstiness=1.0))
    try:
        # The global bucket (10000 bytes/s, 10000 free) lets it pass; the connection's
        # (1000 bytes/s, 1000 free) holds it: 4 s.
        assert await timed(a.pread, 5000, 0) == pytest.approx(4.0)
    finally:
        await a.close()


async def test_rate_files(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    rate_file = tmp_path / "rate"
    limited = RateFilter(rate=8000, burstiness=1.0, rate_file=str(rate_file))
    a, _ = await open_two(limited)
    try:
        assert await timed(a.pread, 2000, 0) == pytest.approx(1.0)  # no file yet: 8000
        rate_file.write_text("16000\n")
        assert await timed(a.pread, 2000, 0) == pytest.approx(1.0)  # 2000 bytes/s, empty
        rate_file.write_text("not a rate\n")  # ignored, with a warning
        assert await timed(a.pread, 2000, 0) == pytest.approx(1.0)
        rate_file.unlink()  # the last rate read stays
        assert await timed(a.pread, 2000, 0) == pytest.approx(1.0)
        rate_file.write_text("1M")
        await a.pread(1, 0)  # the new rate counts from this request on
        await trio.sleep(1)  # which fills the bucket with 1 Mibit in a second
        assert await timed(a.pread, 100 * KiB, 0) == 0
    finally:
        await a.close()


async def test_connection_rate_file_starts_unlimited(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rate_file = tmp_path / "conn-rate"
    a, _ = await open_two(RateFilter(connection_rate_file=str(rate_file), burstiness=1.0))
    try:
        assert await timed(a.pread, 512 * KiB, 0) == 0
        rate_file.write_text("8000")
        # Set to 8000 with an empty bucket (it held nothing at rate 0): 2000 bytes, 2 s.
        assert await timed(a.pread, 2000, 0) == pytest.approx(2.0)
    finally:
        await a.close()


def test_parsers() -> None:
    assert parse_rate("1M") == MiB
    assert parse_seconds("0.5") == 0.5
    for bad in ("0", "fast"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    for bad in ("0", "-1", "inf", "soon"):
        with pytest.raises(ValueError):
            parse_seconds(bad)


def test_bad_parameters_exit_with_status_2() -> None:
    for bad in ("rate=0", "connection-rate=lots", "burstiness=-2"):
        result = trionbd_exit("--filter=rate", "memory", "1M", bad)
        assert result.returncode == 2
        assert bad.split("=")[0] in result.stderr
    both = trionbd_exit("--filter=rate", "memory", "1M", "burstiness=1", "burst-seconds=1")
    assert both.returncode == 2
    assert "give burstiness= or burst-seconds=, not both" in both.stderr


async def test_burst_seconds_is_another_name_for_burstiness() -> None:
    assert RateFilter(rate=8000, burst_seconds=0.5).burst == 0.5
    assert RateFilter(rate=8000).burst == 2.0


def test_a_real_client_gets_every_byte_no_faster_than_the_limit(tmp_path: Path) -> None:
    """1 MiB (8 Mibit) at 2 Mibit/s with 2 s of burst: the first half passes at once,
    the second takes 2 s. Only a lower bound is checked (a slow machine is slower)."""
    path = tmp_path / "disk.img"
    data = random_file(path, MiB)
    with trionbd_process("--filter=rate", "file", str(path), "rate=2M") as server:
        start = time.monotonic()
        assert read_export(server.uri, tmp_path) == data
        assert time.monotonic() - start >= 1.5
    same_caps(["file", str(path)], "--filter=rate", "rate=2M")
