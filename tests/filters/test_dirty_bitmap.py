"""The dirty-bitmap filter: its bits against a model, its state file, and what marks
blocks (in-process); real clients reading qemu:dirty-bitmap:NAME are in
tests/interop/test_dirty_bitmap.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import serving
from trionbd.chain import Chain, ConfigError, Extent, StartupError
from trionbd.client import connect_uri
from trionbd.filters.dirty_bitmap import (
    DIRTY,
    MAGIC,
    Bits,
    DirtyBitmapFilter,
    parse_granularity,
    read_state,
)
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import CmdFlag

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB


# --- the bits -------------------------------------------------------------------------------

op = st.tuples(st.booleans(), st.integers(0, 200), st.integers(0, 80))


@given(st.integers(1, 200), st.lists(op, max_size=20), st.integers(0, 199), st.integers(1, 200))
@settings(max_examples=300, deadline=None)
def test_bits_match_a_model(blocks: int, ops: list[tuple[bool, int, int]], q: int, n: int) -> None:
    bits = Bits(blocks)
    model = [False] * blocks
    for value, first, length in ops:
        first = min(first, blocks)
        end = min(first + length, blocks)
        changed = bits.set_range(first, end, value)
        assert changed == any(model[i] != value for i in range(first, end))
        model[first:end] = [value] * (end - first)
    assert [bits[i] for i in range(blocks)] == model
    assert not blocks & 7 or bits.data[-1] >> (blocks & 7) == 0  # no bits past the end
    first = min(q, blocks - 1)
    end = min(first + n, blocks)
    runs = list(bits.runs(first, end))
    assert runs[0][0] == first and runs[-1][1] == end
    for (start, stop, value), nxt in zip(runs, [*runs[1:], None], strict=True):
        assert start < stop and all(model[i] == value for i in range(start, stop))
        if nxt is not None:
            assert nxt[0] == stop and nxt[2] != value
    grown = bits.resized(blocks + 13)
    assert [grown[i] for i in range(blocks + 13)] == model + [True] * 13
    shrunk = bits.resized(blocks // 2)
    assert [shrunk[i] for i in range(blocks // 2)] == model[: blocks // 2]
    assert not blocks // 2 & 7 or shrunk.data[-1] >> (blocks // 2 & 7) == 0


def test_granularity_is_a_power_of_two_from_512_to_2g() -> None:
    assert parse_granularity("4K") == 4096 and parse_granularity("2G") == 1 << 31
    for bad in ("256", "3000", "4G"):
        with pytest.raises(ValueError, match="power of two from 512"):
            parse_granularity(bad)
    with pytest.raises(ConfigError, match="bitmap= needs a name"):
        DirtyBitmapFilter(bitmap="")


# --- through the chain ----------------------------------------------------------------------


async def opened(f: DirtyBitmapFilter, size: int = 10 * G + 100, export: str = ""):  # type: ignore[no-untyped-def]
    chain = Chain(MemoryPlugin(size), [f])
    chain.get_ready()
    return chain, await chain.top.open(False, export)


async def test_writes_zeroes_and_trims_mark_the_blocks_they_touch() -> None:
    f = DirtyBitmapFilter()
    chain, ctx = await opened(f)
    bitmap = f.bitmap("")
    assert (bitmap.name, bitmap.context) == ("default", "qemu:dirty-bitmap:default")
    await ctx.pwrite(b"x", G - 1)  # the last byte of block 0
    await ctx.zero(G + 1, 3 * G)  # blocks 3 to 4 (two bytes into... block 4's first byte)
    await ctx.trim(10, 10 * G + 50)  # the short last block
    await ctx.pread(4096, 6 * G)  # reads mark nothing
    assert bitmap.dirty() == [(0, G), (3 * G, 2 * G), (10 * G, 100)]
    assert bitmap.extents(10 * G + 100, 0) == [
        Extent(0, G, DIRTY), Extent(G, 2 * G, 0), Extent(3 * G, 2 * G, DIRTY),
        Extent(5 * G, 5 * G, 0), Extent(10 * G, 100, DIRTY),
    ]  # fmt: skip
    # Cut at the asked range's ends, whatever the granularity.
    assert bitmap.extents(G, 2 * G + 7) == [Extent(2 * G + 7, G - 7, 0), Extent(3 * G, 7, DIRTY)]
    await ctx.close()
    chain.unload()


async def test_take_clears_at_once_and_mark_ranges_gives_back() -> None:
    f = DirtyBitmapFilter(granularity=4096)
    chain, ctx = await opened(f, MiB)
    bitmap = f.bitmap("")
    await ctx.pwrite(b"a" * 8192, 4096)
    taken = bitmap.take()
    assert taken == [(4096, 8192)] and bitmap.dirty() == []
    await ctx.pwrite(b"b", 4096)  # written after the take: in the next one
    assert bitmap.dirty() == [(4096, 4096)]
    bitmap.mark_ranges(taken)  # the backup failed: back it goes
    assert bitmap.dirty() == [(4096, 8192)]
    bitmap.clear(4096 + 1, 8192)  # only whole blocks inside the range are cleared
    assert bitmap.dirty() == [(4096, 4096)]
    bitmap.clear()
    assert bitmap.dirty() == []
    with pytest.raises(LookupError, match="no bitmap for export 'other'"):
        f.bitmap("other")
    await ctx.close()
    chain.unload()


async def test_each_export_has_its_own_bitmap_named_after_it_or_bitmap() -> None:
    f = DirtyBitmapFilter()
    chain = Chain(MemoryPlugin(MiB), [f])  # memory serves any name
    a, b = await chain.top.open(False, "a"), await chain.top.open(False, "b")
    await a.pwrite(b"x", 0)
    assert f.bitmap("a").dirty() == [(0, G)] and f.bitmap("b").dirty() == []
    assert f.bitmap("b").context == "qemu:dirty-bitmap:b"
    g = DirtyBitmapFilter(bitmap="changes")
    _, c = await opened(g, MiB, "a")
    assert g.bitmap("a").context == "qemu:dirty-bitmap:changes"
    for ctx in (a, b, c):
        await ctx.close()


# --- the state file -------------------------------------------------------------------------


def written(path: Path) -> tuple[bool, dict[str, object]]:
    clean, stored = read_state(str(path), G)
    return clean, {e: (s.name, s.size, s.data) for e, s in stored.items()}


async def test_state_is_written_on_flush_and_fua_and_at_unload(tmp_path: Path) -> None:
    state = tmp_path / "bitmaps"
    f = DirtyBitmapFilter(state=str(state))
    chain, ctx = await opened(f, 8 * G)
    await f.after_fork(None, chain.top)  # type: ignore[arg-type]
    assert written(state) == (False, {"": ("default", 8 * G, b"\0")})  # in use from the start
    await ctx.pwrite(b"x", 0)
    assert written(state)[1][""] == ("default", 8 * G, b"\0")  # not flushed yet
    await ctx.flush()
    assert written(state)[1][""] == ("default", 8 * G, b"\x01")
    await ctx.pwrite(b"x", 2 * G, CmdFlag.FUA)
    assert written(state)[1][""] == ("default", 8 * G, b"\x05")
    await ctx.zero(G, 7 * G, CmdFlag.FUA)
    assert written(state)[1][""] == ("default", 8 * G, b"\x85")
    before = os.stat(state).st_mtime_ns, os.stat(state).st_ino
    await ctx.pwrite(b"y", 0, CmdFlag.FUA)  # block 0 was dirty already: nothing to write
    await ctx.flush()
    assert (os.stat(state).st_mtime_ns, os.stat(state).st_ino) == before
    await ctx.close()
    chain.unload()
    assert written(state) == (True, {"": ("default", 8 * G, b"\x85")})
    assert sorted(os.listdir(tmp_path)) == ["bitmaps"]  # no temporary file left


async def test_state_survives_a_restart_resizes_and_resets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "bitmaps"
    f = DirtyBitmapFilter(state=str(state))
    chain, ctx = await opened(f, 8 * G)
    await ctx.pwrite(b"x", 3 * G)
    await ctx.close()
    chain.unload()
    # Loaded at start, readable before any client comes.
    g = DirtyBitmapFilter(state=str(state))
    g.get_ready()
    assert g.bitmap("").dirty() == [(3 * G, G)]
    # The export grew: what lies past the old end counts as dirty.
    chain, ctx = await opened(g, 10 * G)
    assert g.bitmap("").dirty() == [(3 * G, G), (8 * G, 2 * G)]
    assert "blocks past the old end count as dirty" in caplog.text
    await ctx.close()
    chain.unload()
    h = DirtyBitmapFilter(state=str(state), reset=True)
    chain, ctx = await opened(h, 10 * G)
    assert h.bitmap("").dirty() == []
    await ctx.close()
    chain.unload()
    assert written(state)[1][""] == ("default", 10 * G, b"\0\0")


def test_unclean_state_is_loaded_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "bitmaps"

    async def crash() -> None:
        f = DirtyBitmapFilter(state=str(state))
        chain, ctx = await opened(f, 8 * G)
        await f.after_fork(None, chain.top)  # type: ignore[arg-type]
        await ctx.pwrite(b"x", 0, CmdFlag.FUA)
        await ctx.pwrite(b"x", G)  # not flushed: lost in the crash
        # no unload: the process died

    trio.run(crash)
    f = DirtyBitmapFilter(state=str(state))
    f.get_ready()
    assert "was in use when the server stopped" in caplog.text
    assert f.bitmap("").dirty() == [(0, G)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello\n", "not a trionbd dirty bitmap file"),
        (MAGIC + b"{", "truncated header"),
        (MAGIC + b"{}\n", "bad header"),
        (
            MAGIC + b'{"clean": true, "granularity": 4096, "bitmaps": []}\n',
            "granularity=4096, not 65536",
        ),
        (
            MAGIC + b'{"clean": true, "granularity": 65536, "bitmaps": '
            b'[{"export": "", "name": "d", "size": 1048576}]}\n\x01',
            "the bitmap of export '' is incomplete",
        ),
        (MAGIC + b'{"clean": true, "granularity": 65536, "bitmaps": []}\nxx', "2 stray bytes"),
    ],
)
def test_a_bad_state_file_stops_the_start(tmp_path: Path, content: bytes, message: str) -> None:
    state = tmp_path / "bitmaps"
    state.write_bytes(content)
    with pytest.raises(StartupError, match=message) as e:
        DirtyBitmapFilter(state=str(state)).get_ready()
    assert str(state) in str(e.value)
    DirtyBitmapFilter(state=str(state), reset=True).get_ready()  # reset ignores it


# --- the embedding API while serving ------------------------------------------------------


async def test_a_backup_takes_the_dirty_ranges_while_clients_write() -> None:
    """The backup tool's loop: take the dirty ranges (the bitmap starts over), copy them
    through the server, and find in the next take exactly what was written meanwhile."""
    f = DirtyBitmapFilter(granularity=4096)
    async with serving(Chain(MemoryPlugin(MiB), [f])) as server:
        async with await connect_uri(server.uris[0]) as disk:
            await disk.pwrite(b"a" * 5000, 8192)
            await disk.zero(4096, 65536)
            taken = f.bitmap("").take()
            assert taken == [(8192, 8192), (65536, 4096)]
            await disk.pwrite(b"b", 8192)  # while the backup copies
            await disk.pwrite(b"c", 100_000)
            copied = {offset: await disk.pread(length, offset) for offset, length in taken}
            assert copied[8192][:1] == b"b" and copied[8192][1:5000] == b"a" * 4999
            assert f.bitmap("").dirty() == [(8192, 4096), (98304, 4096)]
