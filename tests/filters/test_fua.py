"""The fua filter: what each fuamode advertises and what reaches the layer below, in
process and side by side with nbdkit's fua filter (its log filter under both shows the
requests that arrive below)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.filters.parity import requests_below, same_caps
from tests.filters.recording import recorded
from tests.support import random_file, read_export, run, trionbd_process
from trionbd.chain import FuaMode, NBDError
from trionbd.filters.fua import FUAMODES, FuaFilter
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import CmdFlag

MiB = 1 << 20
FUA = int(CmdFlag.FUA)


@pytest.mark.parametrize(
    ("mode", "fua", "write", "flush"),
    [
        # mode, advertised FUA, what a FUA write sends below, what a flush sends below
        ("none", FuaMode.NONE, None, [("flush", 0, 0, 0)]),
        (
            "emulate",
            FuaMode.EMULATE,
            [("pwrite", 512, 0, 0), ("flush", 0, 0, 0)],
            [("flush", 0, 0, 0)],
        ),
        ("native", FuaMode.NATIVE, [("pwrite", 512, 0, FUA)], [("flush", 0, 0, 0)]),
        ("force", FuaMode.NATIVE, [("pwrite", 512, 0, FUA)], []),
        ("pass", FuaMode.NATIVE, [("pwrite", 512, 0, FUA)], [("flush", 0, 0, 0)]),
        ("discard", FuaMode.NATIVE, [("pwrite", 512, 0, 0)], []),
    ],
)
async def test_each_mode(
    mode: str, fua: FuaMode, write: list[object] | None, flush: list[object]
) -> None:
    chain, rec = recorded(MemoryPlugin(MiB), FuaFilter(mode))
    ctx = await chain.top.open(False, "")
    try:
        assert await ctx.can_fua() is fua
        if write is not None:
            await ctx.pwrite(b"x" * 512, 0, FUA)
            assert rec.calls == write
        rec.calls.clear()
        await ctx.pwrite(b"y" * 512, 0)  # without FUA: force adds it, the others do not
        assert rec.calls == [("pwrite", 512, 0, FUA if mode == "force" else 0)]
        rec.calls.clear()
        await ctx.flush()
        assert rec.calls == flush
        assert await ctx.pread(512, 0) == b"y" * 512
    finally:
        await ctx.close()


async def test_trim_and_zero_get_the_same_treatment() -> None:
    chain, rec = recorded(MemoryPlugin(MiB), FuaFilter("force"))
    ctx = await chain.top.open(False, "")
    try:
        await ctx.trim(512, 0)
        await ctx.zero(512, 512)
        assert rec.calls == [("trim", 512, 0, FUA), ("zero", 512, 512, FUA)]
    finally:
        await ctx.close()


async def test_modes_that_need_flush_or_fua_below_refuse_the_open() -> None:
    cases: list[tuple[str, dict[str, object], str]] = [
        ("emulate", {"can_flush": False}, "needs flush"),
        ("native", {"can_fua": FuaMode.NONE}, "needs FUA"),
        ("force", {"can_fua": FuaMode.NONE}, "needs FUA"),
    ]
    for mode, lacking, message in cases:
        chain, _ = recorded(MemoryPlugin(MiB), FuaFilter(mode), **lacking)
        with pytest.raises(NBDError, match=f"fuamode={mode} {message}"):
            await chain.top.open(False, "")
        ctx = await chain.top.open(True, "")  # read-only: the filter changes nothing
        await ctx.close()


async def test_force_and_discard_offer_flush_even_without_it_below() -> None:
    for mode in ("force", "discard"):
        chain, rec = recorded(MemoryPlugin(MiB), FuaFilter(mode), can_flush=False)
        ctx = await chain.top.open(False, "")
        try:
            assert await ctx.can_flush()
            await ctx.flush()
            assert rec.calls == []
        finally:
            await ctx.close()


SCRIPT = """
h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA) if h.can_fua() else h.pwrite(b"x" * 4096, 0)
h.pwrite(b"y" * 4096, 4096)
h.zero(4096, 8192, nbd.CMD_FLAG_FUA) if h.can_fua() else h.zero(4096, 8192)
h.trim(4096, 12288, nbd.CMD_FLAG_FUA) if h.can_fua() else h.trim(4096, 12288)
h.flush()
assert h.pread(8192, 0) == b"x" * 4096 + b"y" * 4096
"""


@pytest.mark.parametrize("mode", [m for m in FUAMODES if m != "none"])
def test_side_by_side_with_nbdkit(mode: str, tmp_path: Path) -> None:
    """The same flags are offered and the same requests reach the layer below. (nbdkit
    1.32 refuses fuamode=none, its default, by a slip in its parser; it is checked
    against the default instead.)"""
    path = tmp_path / "disk.img"
    random_file(path, MiB)
    same_caps(["file", str(path)], "--filter=fua", f"fuamode={mode}")
    lines = requests_below(
        ["--filter=fua"], ["memory", "1M"], [f"fuamode={mode}"], SCRIPT, tmp_path
    )
    assert sum(line.startswith("connection=1 Write ") for line in lines) == 2


def test_default_mode_matches_nbdkit_and_copies_correctly(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    random_file(path, 4 * MiB)
    caps = same_caps(["file", str(path)], "--filter=fua")
    assert caps["can_fua"] is False and caps["can_flush"] is True
    requests_below(["--filter=fua"], ["memory", "1M"], [], SCRIPT, tmp_path)
    data = random_file(tmp_path / "new.img", 4 * MiB, seed=3)
    with trionbd_process("--filter=fua", "file", str(path), "fuamode=none") as server:
        run(["nbdcopy", str(tmp_path / "new.img"), server.uri])
        assert read_export(server.uri, tmp_path) == data
    assert path.read_bytes() == data
