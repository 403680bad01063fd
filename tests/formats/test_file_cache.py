"""Tests for trionbd.formats.blocks.FileCache: decompressed blocks kept in a temporary
file shared by every reader (connection), over gzip files written by gzip(1): every
byte read back, each block decompressed once however many readers want it, reads of
what is in the file served without decompressing, and a file that cannot be written
still giving the right bytes."""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.formats.support import MemoryImage
from tests.formats.test_gzip import INTERVAL, KiB, MiB, sample, tool
from trionbd.formats import FormatError
from trionbd.formats.blocks import BlockFile, FileCache
from trionbd.formats.gzip import GzipIndex, GzipReader, index_gzip

pytestmark = pytest.mark.skipif(not shutil.which("gzip"), reason="gzip is needed")


@pytest.fixture(scope="module")
def data() -> bytes:
    return sample(2 * MiB + 777, seed=3)


@pytest.fixture(scope="module")
def blob(data: bytes) -> bytes:
    return tool(["gzip", "-c"], data)


@pytest.fixture
def file() -> Iterator[BlockFile]:
    f = BlockFile(tempfile.TemporaryFile(), "test")
    yield f
    f.close()


class Connection:
    """One reader of the gzip file, as a connection of the filter has: its own input,
    whose reads are recorded, and a count of the intervals it inflated."""

    def __init__(self, blob: bytes, index: GzipIndex) -> None:
        self.image = MemoryImage(blob)
        self.reader = GzipReader(self.image.pread, index, offload=trio.to_thread.run_sync)
        self.loads: list[int] = []

    async def load(self, i: int) -> bytes:
        self.loads.append(i)
        return await self.reader.load(i)


async def indexed(blob: bytes, file: BlockFile | None = None) -> GzipIndex:
    image = MemoryImage(blob)
    output = None if file is None else file.write
    return await index_gzip(image.pread, len(blob), interval=INTERVAL, output=output)


def cache_of(conn: Connection, file: BlockFile, *, filled: bool = False) -> FileCache:
    r = conn.reader
    return FileCache(r.starts, r.sizes, file, filled=filled, lock=trio.Lock,
                     offload=trio.to_thread.run_sync)  # fmt: skip


async def test_a_second_read_is_served_from_the_file(
    data: bytes, blob: bytes, file: BlockFile
) -> None:
    index = await indexed(blob)
    one, two = Connection(blob, index), Connection(blob, index)
    cache = cache_of(one, file)
    assert await cache.read(0, len(data) + 10, one.load) == data
    assert sorted(one.loads) == list(range(len(one.reader.starts)))
    # Another connection reads everything again, in pieces: nothing is inflated, its
    # input is not read, and the bytes are the same.
    rng = random.Random(1)
    for _ in range(100):
        offset = rng.randrange(len(data))
        n = rng.choice((1, 4096, 70 * KiB, 300 * KiB))
        assert await cache.read(offset, n, two.load) == data[offset : offset + n], offset
    assert two.loads == [] and two.image.reads == []
    assert all(cache.filled)


async def test_reads_across_blocks_in_and_not_in_the_file(
    data: bytes, blob: bytes, file: BlockFile
) -> None:
    """Random reads on a cache filled piece by piece: each read joins bytes from the
    file and bytes just inflated, and each interval is inflated once in all."""
    index = await indexed(blob)
    conn = Connection(blob, index)
    cache = cache_of(conn, file)
    rng = random.Random(2)
    for _ in range(300):
        offset = rng.randrange(len(data) + 1)
        n = rng.choice((0, 1, 512, 4096, 100 * KiB, 500 * KiB))
        assert await cache.read(offset, n, conn.load) == data[offset : offset + n], (offset, n)
    assert len(conn.loads) == len(set(conn.loads))


async def test_concurrent_readers_of_several_connections_inflate_each_interval_once(
    data: bytes, blob: bytes, file: BlockFile
) -> None:
    """As nbdcopy reads: many requests in flight, spread over several connections, in
    sequence: an interval wanted by several of them at once is inflated once."""
    index = await indexed(blob)
    conns = [Connection(blob, index) for _ in range(4)]
    cache = cache_of(conns[0], file)
    got: dict[int, bytes] = {}

    async def read(k: int, offset: int) -> None:
        got[offset] = await cache.read(offset, 24 * KiB, conns[k % 4].load)

    async with trio.open_nursery() as nursery:
        for k, offset in enumerate(range(0, len(data), 24 * KiB)):
            nursery.start_soon(read, k, offset)
    assert b"".join(got[k] for k in sorted(got)) == data
    loads = [i for c in conns for i in c.loads]
    assert sorted(loads) == list(range(len(conns[0].reader.starts)))


async def test_filled_while_indexing(data: bytes, blob: bytes, file: BlockFile) -> None:
    """The gzip filter writes the data to the file during the one pass that indexes it:
    then no read inflates anything."""
    index = await indexed(blob, file)
    assert file.error is None
    conn = Connection(blob, index)
    cache = cache_of(conn, file, filled=True)
    assert await cache.read(0, len(data), conn.load) == data
    assert await cache.read(MiB - 5, 10, conn.load) == data[MiB - 5 : MiB + 5]
    assert conn.loads == [] and conn.image.reads == []


async def test_a_file_that_cannot_be_written_still_gives_the_bytes(
    data: bytes, blob: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk (here: a file open read-only, so every write fails): the failure is
    logged once, reads inflate what they need each time, and the bytes are right."""
    index = await indexed(blob)
    conn = Connection(blob, index)
    with tempfile.NamedTemporaryFile() as tmp, Path(tmp.name).open("rb") as readonly:  # noqa: ASYNC230
        file = BlockFile(readonly, "test input")
        cache = cache_of(conn, file)
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                assert await cache.read(0, len(data), conn.load) == data
        assert file.error is not None and not any(cache.filled)
    blocks = len(conn.reader.starts)
    assert sorted(conn.loads) == sorted(list(range(blocks)) * 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test input: cannot keep decompressed data" in warnings[0]


async def test_a_failed_inflation_is_an_error_and_tried_again(
    data: bytes, blob: bytes, file: BlockFile
) -> None:
    """Input damaged after indexing: the read fails (FormatError naming the offset),
    nothing is marked as in the file, and a read after the input is repaired works."""
    index = await indexed(blob)
    conn = Connection(blob, index)
    cache = cache_of(conn, file)
    saved = bytes(conn.image.data)
    middle = len(blob) // 2
    conn.image.data[middle : middle + 64] = bytes(64)
    with pytest.raises(FormatError, match="offset"):
        await cache.read(0, len(data), conn.load)
    conn.image.data[:] = saved
    assert await cache.read(0, len(data), conn.load) == data
