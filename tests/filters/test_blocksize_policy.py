"""The blocksize-policy filter: advertised constraints as nbdkit's (side by side),
the error policy's EINVALs, and the write-disconnect dropping only the offending
client, whether the server serves the write inline or in a task."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.filters.parity import TRY, both, libnbd, same_output
from tests.filters.recording import recorded
from tests.plugins.test_nbd import caps
from tests.support import random_file, read_export, trionbd_exit, trionbd_process, wait_until
from trionbd.chain import BlockSize, ConfigError, NBDError
from trionbd.filters.blocksize_policy import BlocksizePolicyFilter
from trionbd.plugins.memory import MemoryPlugin

KiB = 1 << 10
MiB = 1 << 20
DEFAULT = BlockSize(1, 4096, 32 * MiB)


@pytest.mark.parametrize(
    ("params", "below", "advertised"),
    [
        ({}, DEFAULT, DEFAULT),
        ({"blocksize_preferred": 32 * KiB}, DEFAULT, BlockSize(1, 32 * KiB, 32 * MiB)),
        ({"blocksize_minimum": 4 * KiB}, DEFAULT, BlockSize(4 * KiB, 4 * KiB, 32 * MiB)),
        ({"blocksize_maximum": MiB}, BlockSize(512, 8192, 4 * MiB), BlockSize(512, 8192, MiB)),
        ({"blocksize_write_disconnect": 1000}, BlockSize(512, 512, MiB), BlockSize(512, 512, 512)),
        (
            {"blocksize_write_disconnect": MiB, "blocksize_maximum": 8 * MiB},
            DEFAULT,
            BlockSize(1, 4096, 8 * MiB),
        ),
    ],
)
def test_constraints(params: dict[str, int], below: BlockSize, advertised: BlockSize) -> None:
    assert BlocksizePolicyFilter(**params).constraints(below) == advertised  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"blocksize_minimum": 3000}, "not a power of two up to 64K"),
        ({"blocksize_minimum": 128 * KiB}, "not a power of two up to 64K"),
        ({"blocksize_preferred": 256}, "not a power of two from 512 to 32M"),
        ({"blocksize_minimum": 4096, "blocksize_maximum": 6000}, "not a multiple"),
        ({"blocksize_minimum": 4096, "blocksize_preferred": 1024}, "minimum is larger"),
        ({"blocksize_preferred": 4096, "blocksize_maximum": 1024}, "preferred is larger"),
        ({"blocksize_minimum": 4096, "blocksize_write_disconnect": 4096}, "must be larger"),
    ],
)
def test_bad_settings(params: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BlocksizePolicyFilter(**params)  # type: ignore[arg-type]


async def test_a_partial_setting_that_clashes_with_the_layer_below_refuses_the_open() -> None:
    chain, _ = recorded(MemoryPlugin(MiB), BlocksizePolicyFilter(blocksize_maximum=1024))
    with pytest.raises(NBDError, match="do not increase"):  # preferred 4096 > maximum
        await chain.top.open(False, "")


async def test_error_policy() -> None:
    policy = BlocksizePolicyFilter(
        "error", blocksize_minimum=512, blocksize_preferred=4096, blocksize_maximum=64 * KiB
    )
    chain, rec = recorded(MemoryPlugin(MiB), policy)
    ctx = await chain.top.open(False, "")
    try:
        assert await ctx.block_size() == BlockSize(512, 4096, 64 * KiB)
        bad = [
            (ctx.pread, (100, 0), "less than the minimum"),
            (ctx.pread, (1024, 100), "not aligned"),
            (ctx.pread, (1000, 0), "not a multiple"),
            (ctx.pread, (128 * KiB, 0), "more than the maximum"),
            (ctx.pwrite, (b"x" * 600, 0), "not a multiple"),
            (ctx.zero, (100, 0), "less than the minimum"),
            (ctx.trim, (512, 1), "not aligned"),
            (ctx.extents, (100, 512), "less than the minimum"),
        ]
        for call, args, message in bad:
            with pytest.raises(NBDError, match=message) as caught:
                await call(*args)  # type: ignore[operator]
            assert caught.value.errno == errno.EINVAL
        assert rec.calls == []  # none reached the layer below
        await ctx.zero(128 * KiB, 0)  # the maximum limits only reads and writes
        await ctx.pwrite(b"y" * 1024, 512)
        assert await ctx.pread(1024, 512) == b"y" * 1024
    finally:
        await ctx.close()


async def test_allow_passes_everything_down() -> None:
    chain, rec = recorded(MemoryPlugin(MiB), BlocksizePolicyFilter(blocksize_minimum=4096))
    ctx = await chain.top.open(False, "")
    try:
        await ctx.pwrite(b"z" * 10, 3)
        assert rec.calls == [("pwrite", 10, 3, 0)]
    finally:
        await ctx.close()


CONFIGURED = ("blocksize-minimum=512", "blocksize-preferred=64K", "blocksize-maximum=1M")


def test_advertised_sizes_match_nbdkit() -> None:
    """All three set: the same numbers. One or two set: the same minimum and preferred;
    the maximum not set is 32M here (what trionbd serves in one request) where nbdkit's
    memory plugin advertises 4294967295."""
    plugin = ("memory", "1M")
    for params in (CONFIGURED, ("blocksize-maximum=1M",), ("blocksize-preferred=32K",)):
        with both("--filter=blocksize-policy", *plugin, *params) as (ours, theirs):
            got, expected = caps(ours.uri)["block_size"], caps(theirs.uri)["block_size"]
        assert isinstance(got, list) and isinstance(expected, list)
        if expected[2] == 0xFFFFFFFF:
            expected[2] = 32 * MiB
        assert got == expected


SCRIPT = (
    TRY
    + """
h.set_strict_mode(0)   # let libnbd send what breaks the advertised constraints
attempt("small read", h.pread, 100, 0)
attempt("unaligned read", h.pread, 1024, 100)
attempt("large read", h.pread, 2 * 1048576, 0)
attempt("odd write", h.pwrite, b"w" * 1000, 0)
attempt("small zero", h.zero, 100, 0)
attempt("large zero", h.zero, 2 * 1048576, 0)
attempt("unaligned trim", h.trim, 512, 1)
attempt("good write", h.pwrite, b"g" * 4096, 4096)
print(h.pread(4096, 4096) == b"g" * 4096)
"""
)


@pytest.mark.parametrize("policy", ["allow", "error"])
def test_error_policy_answers_match_nbdkit(policy: str) -> None:
    params = (*CONFIGURED, f"blocksize-error-policy={policy}")
    with both("--filter=blocksize-policy", "memory", "4M", *params) as (ours, theirs):
        out = same_output([ours.uri, theirs.uri], SCRIPT)
    assert ("errno EINVAL" in out) == (policy == "error")


@pytest.mark.parametrize("below", [[], ["--filter=delay"]], ids=["inline", "task"])
def test_write_disconnect_drops_only_that_client(below: list[str], tmp_path: Path) -> None:
    """A write over the limit loses its connection without a reply (libnbd reports the
    connection gone); another client keeps being served, and its data is right."""
    path = tmp_path / "disk.img"
    data = random_file(path, 4 * MiB)
    args = ["--filter=blocksize-policy", *below, "file", str(path)]
    with trionbd_process(*args, "blocksize-write-disconnect=1M") as server:
        other = libnbd(server.uri, "print(h.get_block_size(nbd.SIZE_MAXIMUM))")
        assert other.strip() == str(MiB)
        out = libnbd(
            server.uri,
            TRY
            + """
attempt("small", h.pwrite, b"s" * 65536, 0)
attempt("large", h.pwrite, b"l" * (1048576 + 512), 0)
print(h.aio_is_dead() or h.aio_is_closed())
""",
        )
        lines = out.splitlines()
        assert lines[0] == "small ok"
        assert lines[1].startswith("large errno") and lines[2] == "True"
        assert read_export(server.uri, tmp_path) == b"s" * 65536 + data[65536:]
        wait_until(
            lambda: "over blocksize-write-disconnect=1048576; disconnecting" in server.stderr,
            "the server logs why it dropped the client",
        )


def test_bad_parameters_exit_with_status_2() -> None:
    result = trionbd_exit("--filter=blocksize-policy", "memory", "1M", "blocksize-minimum=3")
    assert result.returncode == 2
    assert "blocksize-minimum=3 is not a power of two" in result.stderr
