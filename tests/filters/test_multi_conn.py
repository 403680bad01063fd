"""The multi-conn filter: modes resolved and advertised as nbdkit's, flushes replicated
to the connections that need them and skipped where tracking allows; side by side
with nbdkit's multi-conn filter (its log filter under both shows every flush of every
connection)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from tests.filters.parity import requests_below
from tests.filters.recording import Recording
from tests.support import random_file, read_export, run, trionbd_process
from trionbd.chain import Chain, FuaMode, Layer, NBDError, Next
from trionbd.filters.multi_conn import MultiConnFilter
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import CmdFlag

MiB = 1 << 20


class Numbered(Recording):
    """Records flushes by the number of the context of the layer below that got them."""

    def __init__(self, **caps: Any) -> None:
        super().__init__(**caps)
        self.count = itertools.count(1)
        self.flushed: list[int] = []

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, int]:
        return await below.open(readonly, export_name, is_tls), next(self.count)

    async def flush(self, next: Next, h: Any, flags: int) -> None:
        self.flushed.append(h)
        await next.flush(flags)


async def opened(
    mc: MultiConnFilter, n: int, names: tuple[str, ...] = (), **caps: Any
) -> tuple[list[Next], Numbered]:
    below = Numbered(**caps)
    chain = Chain(MemoryPlugin(MiB), [mc, below])
    ctxs = [await chain.top.open(False, names[i] if names else "") for i in range(n)]
    return ctxs, below


async def close_all(ctxs: list[Next]) -> None:
    for ctx in ctxs:
        await ctx.close()


async def test_auto_follows_the_layer_below() -> None:
    (a,), _ = await opened(MultiConnFilter(), 1)
    assert await a.can_multi_conn()  # plugin mode over the memory plugin
    await a.close()
    (a, b), below = await opened(MultiConnFilter(), 2, can_multi_conn=False)
    try:
        assert await a.can_multi_conn()  # emulated
        await a.pwrite(b"x", 0)
        await b.flush()
        assert below.flushed == [1]  # only the context that wrote needed it
    finally:
        await close_all([a, b])


async def test_emulate_replicates_flushes_and_fua() -> None:
    (a, b, c), below = await opened(MultiConnFilter("emulate"), 3)
    try:
        assert await a.can_fua() is FuaMode.EMULATE  # native below, but every one flushes
        await a.pwrite(b"x", 0)
        await b.pwrite(b"y", 1)
        await c.flush()
        assert below.flushed == [1, 2]
        await c.flush()
        assert below.flushed == [1, 2]  # all clean: nothing to do
        await b.pread(1, 0)  # b may now cache what a writes next
        await a.pwrite(b"z", 0, CmdFlag.FUA)  # a write and a replicated flush
        assert below.flushed == [1, 2, 1, 2]
        assert below.commands().count("pwrite") == 3
    finally:
        await close_all([a, b, c])


@pytest.mark.parametrize(
    ("track", "flushed"),
    [("connection", [1]), ("fast", [1, 2]), ("off", [1, 2, 1, 2])],
)
async def test_tracking_in_emulate_mode(track: str, flushed: list[int]) -> None:
    (a, b), below = await opened(MultiConnFilter("emulate", track), 2)
    try:
        await a.pwrite(b"x", 0)
        await b.flush()
        await a.flush()
        assert below.flushed == flushed
    finally:
        await close_all([a, b])


async def test_plugin_and_disable_do_not_replicate() -> None:
    for mode, advertised in (("plugin", False), ("disable", False), ("unsafe", True)):
        (a, b), below = await opened(MultiConnFilter(mode), 2, can_multi_conn=False)
        try:
            assert await a.can_multi_conn() is advertised
            await a.pwrite(b"x", 0)
            await b.flush()
            assert below.flushed == [2]
        finally:
            await close_all([a, b])


async def test_emulating_needs_flush_below() -> None:
    below = Numbered(can_flush=False)
    chain = Chain(MemoryPlugin(MiB), [MultiConnFilter("emulate"), below])
    with pytest.raises(NBDError, match="needs flush"):
        await chain.top.open(False, "")


async def test_export_names_group_flushes_when_asked() -> None:
    names = ("a", "b", "a")
    for by_name, flushed in ((False, [1, 2]), (True, [1])):
        mc = MultiConnFilter("emulate", multi_conn_exportname=by_name)
        ctxs, below = await opened(mc, 3, names)
        try:
            await ctxs[0].pwrite(b"x", 0)
            await ctxs[1].pwrite(b"x", 0)
            await ctxs[2].flush()
            assert below.flushed == flushed
        finally:
            await close_all(ctxs)
        assert mc.groups == {}  # the last close of a group removes it


SCRIPT = """
h2 = nbd.NBD()
h2.connect_uri(uri)
h.pwrite(b"x" * 4096, 0)
h2.pread(4096, 0)
h2.flush()
h2.flush()
h.pread(512, 0)
if h2.can_fua():
    h2.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_FUA)
h.flush()
h2.zero(4096, 8192)
h2.flush()
print(h.can_multi_conn(), h.can_fua(), h.pread(512, 0) == h2.pread(512, 0))
"""


@pytest.mark.parametrize(
    ("mode", "track", "flushes"),
    [
        ("auto", "connection", 2),  # plugin mode: the memory plugin has multi-conn
        ("emulate", "connection", 5),
        ("emulate", "fast", 6),
        ("emulate", "off", 10),
        ("plugin", "fast", 2),
        ("disable", "off", 4),
        ("unsafe", "conn", 2),
    ],
)
def test_side_by_side_with_nbdkit(mode: str, track: str, flushes: int, tmp_path: Path) -> None:
    """Two connections: the same answers, and the same flushes reach each connection's
    context below, in the same order (``flushes`` of them, of the script's four)."""
    params = [f"multi-conn-mode={mode}", f"multi-conn-track-dirty={track}"]
    lines = requests_below(["--filter=multi-conn"], ["memory", "1M"], params, SCRIPT, tmp_path)
    assert sum(" Flush id" in line for line in lines) == flushes


def test_nbdcopy_over_four_connections(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    random_file(path, 8 * MiB)
    data = random_file(tmp_path / "new.img", 8 * MiB, seed=9)
    args = ("--filter=multi-conn", "file", str(path), "multi-conn-mode=emulate")
    with trionbd_process(*args) as server:
        assert "can_multi_conn: true" in run(["nbdinfo", server.uri])
        run(["nbdcopy", "-C", "4", "--flush", str(tmp_path / "new.img"), server.uri])
        assert read_export(server.uri, tmp_path) == data
    assert path.read_bytes() == data
