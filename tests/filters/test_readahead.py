"""The readahead filter: byte-exact sequential and random reads through real clients,
writes visible at once to every connection, and (in-process, counting the reads that
reach the layer below) the growing windows and the invalidation rules."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import trio
import trio.testing

from tests.support import libnbd_python, nbdsh, random_file, run, trionbd_process
from trionbd.chain import Chain, Plugin
from trionbd.filters.readahead import MAX_WINDOW, MIN_WINDOW, ReadaheadFilter

KIB = 1024
MIB = 1024 * KIB


class Disk(Plugin):
    """A writable in-memory disk that records the reads reaching it. While ``gate`` is
    closed, reads take their bytes at once but wait before returning them."""

    name = "disk"

    def __init__(self, size: int):
        self.data = bytearray(random.Random(5).randbytes(size))
        self.reads: list[tuple[int, int]] = []
        self.gate = trio.Event()
        self.gate.set()

    async def get_size(self, h: Any) -> int:
        return len(self.data)

    async def can_multi_conn(self, h: Any) -> bool:
        return True

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        self.reads.append((offset, count))
        data = bytes(self.data[offset : offset + count])
        await self.gate.wait()
        return data

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.data[offset : offset + len(buf)] = buf

    async def flush(self, h: Any, flags: int) -> None:
        pass


# --- in-process ----------------------------------------------------------------------------


async def test_sequential_reads_fetch_growing_windows() -> None:
    disk = Disk(8 * MIB + 123)
    ctx = await Chain(disk, [ReadaheadFilter()]).top.open(False, "")
    got = b"".join([await ctx.pread(4096, offset) for offset in range(0, 8 * MIB, 4096)])
    assert got == disk.data[: 8 * MIB]
    # Contiguous windows 64K, 128K, ... 4M instead of 2048 reads of 4K; the last window
    # stops at the end of the disk (and so holds the last 123 bytes too).
    windows = [MIN_WINDOW << i for i in range(7)] + [MIN_WINDOW + 123]
    assert disk.reads == [(sum(windows[:i]), n) for i, n in enumerate(windows)]
    assert await ctx.pread(123, 8 * MIB) == disk.data[8 * MIB :]
    assert len(disk.reads) == len(windows)
    await ctx.close()


async def test_the_window_stops_growing_at_the_maximum() -> None:
    disk = Disk(3 * MAX_WINDOW)
    ctx = await Chain(disk, [ReadaheadFilter()]).top.open(False, "")
    offset = 0
    while offset < len(disk.data):
        assert await ctx.pread(MIB, offset) == disk.data[offset : offset + MIB]
        offset += MIB
    assert max(count for _, count in disk.reads) == MAX_WINDOW == 64 * MIB
    await ctx.close()


async def test_random_reads_are_exact_and_cost_at_most_one_read_each() -> None:
    disk = Disk(4 * MIB)
    ctx = await Chain(disk, [ReadaheadFilter()]).top.open(False, "")
    rng = random.Random(1)
    for n in range(300):
        count = rng.randrange(1, 200_000)
        offset = rng.randrange(0, len(disk.data) - count)
        assert await ctx.pread(count, offset) == disk.data[offset : offset + count]
        assert len(disk.reads) <= n + 1
    await ctx.close()


async def test_writes_from_any_connection_drop_overlapping_buffers() -> None:
    disk = Disk(1 * MIB)
    chain = Chain(disk, [ReadaheadFilter()])
    a, b = await chain.top.open(False, ""), await chain.top.open(False, "")
    assert await a.pread(4096, 0) == disk.data[:4096]  # a now holds 0..64K
    assert await a.pread(10, 8000) == disk.data[8000:8010]
    await b.pwrite(b"written by b", 8000)
    assert await a.pread(12, 8000) == b"written by b"
    await a.pwrite(b"a", 100_000)  # outside a's buffer (which was refetched at 8000)
    reads = len(disk.reads)
    assert await a.pread(10, 8100) == disk.data[8100:8110]
    assert len(disk.reads) == reads  # an unrelated write kept the buffer
    await b.zero(100, 8100)
    assert await a.pread(10, 8100) == bytes(10)
    await a.close()
    await b.close()


async def test_a_window_fetched_during_a_write_is_not_kept() -> None:
    disk = Disk(1 * MIB)
    chain = Chain(disk, [ReadaheadFilter()])
    a, b = await chain.top.open(False, ""), await chain.top.open(False, "")
    old = bytes(disk.data[1000:1010])
    disk.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        first: list[bytes] = []

        async def read() -> None:
            first.append(await a.pread(10, 1000))

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()  # a's window holds the old bytes
        disk.gate.set()  # writes do not read: b's write completes while a's read waits
        await b.pwrite(b"0123456789", 1000)
    assert first == [old]  # concurrent with the write: either answer is right
    assert await a.pread(10, 1000) == b"0123456789"  # but the window was not kept
    await a.close()
    await b.close()


async def test_flush_drops_the_buffer_and_cache_fills_it() -> None:
    disk = Disk(1 * MIB)
    ctx = await Chain(disk, [ReadaheadFilter()]).top.open(False, "")
    await ctx.cache(4096, 500_000)
    assert disk.reads == [(500_000, MIN_WINDOW)]
    assert await ctx.pread(4096, 502_000) == disk.data[502_000:506_096]
    assert len(disk.reads) == 1
    disk.data[502_000:502_004] = b"back"  # changed behind the server's back
    assert await ctx.pread(4, 502_000) != b"back"
    await ctx.flush()
    assert await ctx.pread(4, 502_000) == b"back"
    await ctx.close()


# --- real clients --------------------------------------------------------------------------


def test_nbdcopy_and_random_nbdsh_reads_are_exact(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = random_file(path, 16 * MIB + 4097)
    script = """
import random, hashlib
rng = random.Random(2)
size = h.get_size()
out = hashlib.sha256()
for _ in range(500):
    count = rng.randrange(1, 300000)
    offset = rng.randrange(0, size - count)
    out.update(h.pread(count, offset))
print(out.hexdigest())
"""
    with trionbd_process("--filter=readahead", "file", str(path)) as server:
        run(["nbdcopy", "--request-size=4096", server.uri, str(tmp_path / "small.img")])
        run(["nbdcopy", server.uri, str(tmp_path / "copy.img")])
        digest = nbdsh(server.uri, script).strip()
    assert (tmp_path / "small.img").read_bytes() == data
    assert (tmp_path / "copy.img").read_bytes() == data
    rng = random.Random(2)
    expected = hashlib.sha256()
    for _ in range(500):
        count = rng.randrange(1, 300000)
        offset = rng.randrange(0, len(data) - count)
        expected.update(data[offset : offset + count])
    assert digest == expected.hexdigest()


def test_writes_are_visible_to_every_connection(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = random_file(path, 4 * MIB)
    script = """
import nbd
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(URI)
b.connect_uri(URI)
a.pread(4096, 0)  # a's buffer: 0..64K
b.pwrite(b"B" * 5000, 1000)
print(a.pread(8192, 0).hex())
for offset in range(0, 1 << 20, 4096):  # a's buffer: 960K..1984K
    a.pread(4096, offset)
b.pwrite(b"C" * 10, 1000000)
b.zero(3000, 1100000)
a.pwrite(b"A" * 10, 1000020)
print(a.pread(200000, 960 * 1024).hex())
"""
    with trionbd_process("--filter=readahead", "file", str(path)) as server:
        out = libnbd_python(script.replace("URI", repr(server.uri))).split()
    expected = bytearray(data)
    expected[1000:6000] = b"B" * 5000
    expected[1000000:1000010] = b"C" * 10
    expected[1100000:1103000] = bytes(3000)
    expected[1000020:1000030] = b"A" * 10
    assert bytes.fromhex(out[0]) == expected[:8192]
    assert bytes.fromhex(out[1]) == expected[960 * KIB : 960 * KIB + 200000]
    assert path.read_bytes() == expected
