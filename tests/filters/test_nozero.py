"""The nozero filter: each zeromode/fastzeromode pair advertises what nbdkit's does
(checked side by side) and sends the layer below what the mode says."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.filters.parity import TRY, both, same_caps, same_output
from tests.filters.recording import recorded
from tests.support import random_file, read_export, run, trionbd_process
from trionbd.chain import NBDError, ZeroMode
from trionbd.filters.nozero import NoZeroFilter
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import CmdFlag

MiB = 1 << 20


@pytest.mark.parametrize(
    ("zeromode", "fastzeromode", "zero", "fast"),
    [
        ("none", "default", ZeroMode.NONE, False),
        ("none", "slow", ZeroMode.NONE, False),
        ("emulate", "default", ZeroMode.EMULATE, True),
        ("emulate", "none", ZeroMode.EMULATE, False),
        ("notrim", "default", ZeroMode.NATIVE, True),
        ("plugin", "none", ZeroMode.NATIVE, False),
        ("plugin", "slow", ZeroMode.NATIVE, True),
        ("plugin", "ignore", ZeroMode.NATIVE, True),
    ],
)
async def test_what_is_advertised(
    zeromode: str, fastzeromode: str, zero: ZeroMode, fast: bool
) -> None:
    chain, _ = recorded(MemoryPlugin(MiB), NoZeroFilter(zeromode, fastzeromode))
    ctx = await chain.top.open(False, "")
    try:
        assert (await ctx.can_zero(), await ctx.can_fast_zero()) == (zero, fast)
    finally:
        await ctx.close()


async def test_what_reaches_the_layer_below() -> None:
    async def zero_calls(zeromode: str, fastzeromode: str, flags: int) -> list[object]:
        chain, rec = recorded(MemoryPlugin(MiB), NoZeroFilter(zeromode, fastzeromode))
        ctx = await chain.top.open(False, "")
        try:
            await ctx.pwrite(b"x" * 8192, 0)
            rec.calls.clear()
            try:
                await ctx.zero(8192, 0, flags)
            except NBDError as e:
                return [e.errno]
            calls: list[object] = list(rec.calls)
            assert await ctx.pread(8192, 0) == bytes(8192)
            return calls
        finally:
            await ctx.close()

    assert await zero_calls("emulate", "default", 0) == [("pwrite", 8192, 0, 0)]
    assert await zero_calls("emulate", "default", CmdFlag.FAST_ZERO) == [errno.ENOTSUP]
    assert await zero_calls("emulate", "ignore", CmdFlag.FAST_ZERO) == [errno.ENOTSUP]
    assert await zero_calls("notrim", "default", 0) == [("zero", 8192, 0, CmdFlag.NO_HOLE)]
    assert await zero_calls("plugin", "default", CmdFlag.FAST_ZERO) == [
        ("zero", 8192, 0, CmdFlag.FAST_ZERO)
    ]
    assert await zero_calls("plugin", "slow", CmdFlag.FAST_ZERO) == [errno.ENOTSUP]
    assert await zero_calls("plugin", "ignore", CmdFlag.FAST_ZERO) == [("zero", 8192, 0, 0)]


async def test_passing_modes_need_a_layer_below_that_zeroes() -> None:
    for zeromode in ("notrim", "plugin"):
        chain, _ = recorded(MemoryPlugin(MiB), NoZeroFilter(zeromode), can_zero=ZeroMode.NONE)
        with pytest.raises(NBDError, match=f"zeromode={zeromode} needs a layer below"):
            await chain.top.open(False, "")
        ctx = await chain.top.open(True, "")  # read-only: nothing to zero, nothing refused
        await ctx.close()


SCRIPT = (
    TRY
    + """
h.pwrite(b"x" * 262144, 0)
if h.can_zero():
    attempt("zero", h.zero, 65536, 0)
    if h.can_fast_zero():
        attempt("fast zero", h.zero, 65536, 131072, nbd.CMD_FLAG_FAST_ZERO)
print(h.pread(65536, 0) == bytes(65536), h.pread(65536, 131072) == bytes(65536))
"""
)


@pytest.mark.parametrize(
    ("zeromode", "fastzeromode"),
    [
        ("none", "default"),
        ("emulate", "default"),
        ("emulate", "none"),
        ("notrim", "default"),
        ("plugin", "none"),
        ("plugin", "slow"),
        ("plugin", "ignore"),
    ],
)
def test_side_by_side_with_nbdkit(zeromode: str, fastzeromode: str) -> None:
    """Same flags offered, same answers to zero and fast zero requests, same bytes."""
    args = ("--filter=nozero", f"zeromode={zeromode}", f"fastzeromode={fastzeromode}")
    same_caps(["memory", "1M"], *args)
    with both(*args[:1], "memory", "1M", *args[1:]) as (ours, theirs):
        same_output([ours.uri, theirs.uri], SCRIPT)


def test_nbdcopy_writes_zeroes_itself_without_zeroing(tmp_path: Path) -> None:
    random_file(tmp_path / "disk.img", 2 * MiB)
    source = bytearray(random_file(tmp_path / "src.img", 2 * MiB, seed=5))
    source[MiB : MiB + 65536] = bytes(65536)  # a run of zeroes nbdcopy would zero
    (tmp_path / "src.img").write_bytes(source)
    with trionbd_process("--filter=nozero", "file", str(tmp_path / "disk.img")) as server:
        run(["nbdcopy", str(tmp_path / "src.img"), server.uri])
        assert read_export(server.uri, tmp_path) == source
