"""The truncate filter: sizes worked out as nbdkit does, zeroes past the layer below's
end, writes there only of zeroes; side by side with nbdkit's truncate filter."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.filters.parity import TRY, both, same_caps, same_output
from tests.filters.recording import recorded
from tests.support import random_file, read_export, run, sparse_file, trionbd_exit
from trionbd.chain import Extent, NBDError
from trionbd.filters.truncate import TruncateFilter
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import UNALLOCATED

KiB = 1 << 10
MiB = 1 << 20


@pytest.mark.parametrize(
    ("params", "real", "size"),
    [
        ({}, 1000, 1000),
        ({"truncate": 512}, 1000, 512),
        ({"truncate": 5000}, 1000, 5000),
        ({"round_up": 512}, 1000, 1024),
        ({"round_up": 512}, 1024, 1024),
        ({"round_down": 512}, 1000, 512),
        ({"round_down": 4096}, 1000, 0),
        ({"truncate": 5000, "round_up": 4096}, 1000, 8192),
        ({"truncate": 5000, "round_up": 4096, "round_down": 8192}, 1000, 8192),
    ],
)
def test_sizes(params: dict[str, int], real: int, size: int) -> None:
    assert TruncateFilter(**params).new_size(real) == size


async def test_larger_reads_zeroes_and_takes_only_zeroes_past_the_end() -> None:
    chain, rec = recorded(MemoryPlugin(1000), TruncateFilter(truncate=3000))
    ctx = await chain.top.open(False, "")
    try:
        assert await ctx.get_size() == 3000
        await ctx.pwrite(b"a" * 1000, 0)
        assert await ctx.pread(1500, 500) == b"a" * 500 + bytes(1000)
        await ctx.pwrite(b"b" * 100 + bytes(400), 900)  # zeroes past the end: accepted
        rec.calls.clear()
        with pytest.raises(NBDError) as caught:
            await ctx.pwrite(b"c" * 200 + b"\1", 900)
        assert caught.value.errno == errno.ENOSPC
        assert rec.calls == []  # nothing of a refused write reaches the layer below
        await ctx.zero(2000, 500)
        await ctx.trim(1000, 2000)
        assert rec.calls == [("zero", 500, 500, 0)]  # clipped; the tail needs nothing
        assert await ctx.pread(3000, 0) == b"a" * 500 + bytes(2500)
        extents = await ctx.extents(2000, 1000)
        assert extents == [Extent(1000, 2000, UNALLOCATED)]
        assert await ctx.can_fast_zero()
    finally:
        await ctx.close()


async def test_smaller_hides_the_rest() -> None:
    chain, _ = recorded(MemoryPlugin(MiB), TruncateFilter(round_down=4096, truncate=10000))
    ctx = await chain.top.open(False, "")
    try:
        assert await ctx.get_size() == 8192
        await ctx.cache(8192, 0)
        assert [e.length for e in await ctx.extents(8192, 0)] == [8192]
    finally:
        await ctx.close()


def test_bad_parameters_exit_with_status_2() -> None:
    for bad in ("round-up=3", "round-down=0", "truncate=lots"):
        result = trionbd_exit("--filter=truncate", "memory", "1M", bad)
        assert result.returncode == 2
        assert bad.split("=")[0] in result.stderr


SCRIPT = (
    TRY
    + """
size = h.get_size()
h.pwrite(b"d" * 4096, 0)
attempt("zeroes past the end", h.pwrite, bytes(8192), size - 8192)
attempt("data past the end", h.pwrite, b"e" * 8192, size - 8192)
attempt("zero across the end", h.zero, 8192, size - 8192)
attempt("trim across the end", h.trim, 8192, size - 8192)
print(h.pread(size, 0) == b"d" * 4096 + bytes(size - 4096))
"""
)


@pytest.mark.parametrize(
    "params", [("truncate=1000000",), ("round-up=64K",), ("truncate=3M", "round-down=1M")]
)
def test_side_by_side_with_nbdkit(params: tuple[str, ...], tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    sparse_file(path, MiB + 1000, [(65536, 4096), (MiB, 1000)])
    same_caps(["file", str(path)], "--filter=truncate", *params)
    with both("--filter=truncate", "file", str(path), *params) as (ours, theirs):
        assert run(["nbdinfo", "--map", ours.uri]) == run(["nbdinfo", "--map", theirs.uri])
    with both("--filter=truncate", "memory", str(MiB + 1000), *params) as (ours, theirs):
        out = same_output([ours.uri, theirs.uri], SCRIPT)
    assert out.splitlines()[-1] == "True"


def test_round_up_copies_the_unaligned_tail(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = random_file(path, 3 * MiB + 100)
    with both("--filter=truncate", "file", str(path), "round-up=4K") as (ours, theirs):
        assert read_export(ours.uri, tmp_path) == data + bytes(4096 - 100)
        assert read_export(theirs.uri, tmp_path) == data + bytes(4096 - 100)
