"""The memory plugin: a sparse RAM disk, up to 2^63-1 bytes, trim and zero."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.server.nbdclient import connect
from tests.support import (
    export_info,
    libnbd_python,
    nbdkit_process,
    nbdsh,
    random_file,
    run,
    serving,
    trionbd_process,
)
from trionbd.chain import Chain, ConfigError
from trionbd.chain.params import MAX_SIZE
from trionbd.plugins.memory import PAGE, MemoryPlugin
from trionbd.protocol import Cmd, CmdFlag, DataChunk, HoleChunk, TransmissionFlag
from trionbd.protocol.constants import State

MiB = 1 << 20
HOLE = State.HOLE | State.ZERO


async def test_only_written_pages_take_memory() -> None:
    plugin = MemoryPlugin(1 << 40)
    async with serving(plugin) as server:
        c = await connect(server)
        await c.go(meta=True)
        await c.write(PAGE - 2, b"spans two pages")
        await c.write(1 << 39, b"far away")
        assert sorted(plugin.pages) == [0, 1, (1 << 39) // PAGE]
        assert await c.read(PAGE - 2, 15) == b"spans two pages"
        assert await c.read((1 << 39) - 3, 11) == b"\0\0\0far away"
        [status] = await c.request(Cmd.BLOCK_STATUS, 0, 0xFFFFF000)
        assert status.extents == ((2 * PAGE, 0), (0xFFFFF000 - 2 * PAGE, HOLE))  # type: ignore[union-attr]
        [status] = await c.request(Cmd.BLOCK_STATUS, (1 << 39) - MiB, 2 * MiB)
        assert status.extents == ((MiB, HOLE), (PAGE, 0), (MiB - PAGE, HOLE))  # type: ignore[union-attr]


async def test_zero_and_trim_release_whole_pages_only() -> None:
    plugin = MemoryPlugin(MiB)
    async with serving(plugin) as server:
        c = await connect(server)
        await c.go(meta=True)
        await c.write(0, b"\xff" * (4 * PAGE))
        assert await c.error(Cmd.WRITE_ZEROES, 100, PAGE) == 0  # parts of pages 0 and 1
        assert sorted(plugin.pages) == [0, 1, 2, 3]
        assert await c.error(Cmd.TRIM, PAGE, 2 * PAGE) == 0  # pages 1 and 2 exactly
        assert await c.error(Cmd.WRITE_ZEROES, 3 * PAGE, PAGE, CmdFlag.FAST_ZERO) == 0
        assert sorted(plugin.pages) == [0]
        expected = b"\xff" * 100 + bytes(4 * PAGE - 100)
        assert await c.read(0, 4 * PAGE) == expected
        [status] = await c.request(Cmd.BLOCK_STATUS, 0, MiB)
        assert status.extents == ((PAGE, 0), (MiB - PAGE, HOLE))  # type: ignore[union-attr]


async def test_a_zero_of_exabytes_drops_the_pages_inside_and_keeps_the_edges() -> None:
    """Extended headers bring zeroes and trims of any length: the pages inside are found
    through the sorted index, not walked one by one (2^62 bytes are 2^47 pages)."""
    plugin = MemoryPlugin(MAX_SIZE)
    ctx = await Chain(plugin).top.open(False, "")
    end = (1 << 62) + 10
    spots = (0, 3 * PAGE + 5, 1 << 40, end - 15, end + PAGE)
    for offset in spots:
        await ctx.pwrite(b"\xff" * 20, offset)
    await ctx.zero(end - 10, 10)
    pages = [0, end // PAGE, (end + PAGE) // PAGE]  # page 2^47 - 1 lay wholly inside
    assert plugin.allocated == sorted(plugin.pages) == pages
    assert await ctx.pread(20, 0) == b"\xff" * 10 + bytes(10)
    assert await ctx.pread(20, end - 15) == bytes(15) + b"\xff" * 5
    assert await ctx.pread(20, end + PAGE) == b"\xff" * 20
    assert await ctx.pread(20, 1 << 40) == bytes(20)
    await ctx.trim(MAX_SIZE, 0)
    assert plugin.pages == {} and plugin.allocated == []


async def test_reads_of_unwritten_pages_are_holes() -> None:
    async with serving(MemoryPlugin(MiB)) as server:
        c = await connect(server)
        await c.go()
        await c.write(PAGE, b"x")
        events = await c.request(Cmd.READ, 0, 3 * PAGE)
        assert [type(e) for e in events] == [HoleChunk, DataChunk, HoleChunk]


async def test_largest_size_without_allocating() -> None:
    plugin = MemoryPlugin(MAX_SIZE)
    async with serving(plugin) as server:
        c = await connect(server)
        await c.go(meta=True)
        assert c.size == MAX_SIZE == 2**63 - 1
        await c.write(MAX_SIZE - 5, b"last5")
        assert await c.read(MAX_SIZE - 10, 10) == b"\0" * 5 + b"last5"
        assert len(plugin.pages) == 1
        [status] = await c.request(Cmd.BLOCK_STATUS, MAX_SIZE - 3 * PAGE, 3 * PAGE)
        # The last page starts at 2^63 - PAGE: one byte after this range's first 2 pages.
        assert status.extents == ((2 * PAGE + 1, HOLE), (PAGE - 1, 0))  # type: ignore[union-attr]
        assert await c.error(Cmd.WRITE, MAX_SIZE, 1, data=b"x") != 0


def test_largest_size_with_real_clients() -> None:
    with trionbd_process("memory", str(2**63 - 1)) as server:
        assert run(["nbdinfo", "--size", server.uri]).strip() == str(2**63 - 1)
        out = libnbd_python(
            f"""
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri({server.uri!r})
end = h.get_size()
h.pwrite(b"tail" * 1024, end - 4096 - 7)
assert h.pread(4096, end - 4096 - 7) == b"tail" * 1024
assert h.pread(7, end - 7) == bytes(7)
seen = []
h.block_status((1 << 32) - 4096, 1 << 62, lambda ctx, off, ents, err: seen.extend(ents))
assert seen == [(1 << 32) - 4096, 3], seen
h.zero(4096, end - 4096 - 7)
assert h.pread(4096, end - 4096 - 7) == bytes(4096)
h.shutdown()
print("ok")
"""
        )
        assert out.strip() == "ok"


def test_copy_in_and_out_with_nbdcopy(tmp_path: Path) -> None:
    data = random_file(tmp_path / "src.img", 5 * MiB + 4096)
    with trionbd_process("memory", "8M") as server:
        run(["nbdcopy", str(tmp_path / "src.img"), server.uri])
        run(["nbdcopy", server.uri, str(tmp_path / "back.img")])
    back = (tmp_path / "back.img").read_bytes()
    assert back == data + bytes(8 * MiB - len(data))


def test_size_is_required_and_parsed() -> None:
    with pytest.raises(ConfigError, match="parameter 'size' is required"):
        MemoryPlugin.from_params([])
    with pytest.raises(ConfigError, match="larger than the maximum size"):
        MemoryPlugin.from_params([("size", "8E")])
    assert MemoryPlugin.from_params([("size", "1G")]).size == 1 << 30


# --- against a model ---------------------------------------------------------------------------

SIZE = 16 * PAGE
op = st.tuples(
    st.sampled_from(["write", "zero", "trim"]),
    st.integers(0, SIZE - 1),
    st.integers(1, 3 * PAGE),
)


@given(st.lists(op, max_size=25), st.integers(0, SIZE - 1), st.integers(1, SIZE))
@settings(max_examples=150, deadline=None)
def test_data_and_extents_match_a_model(
    ops: list[tuple[str, int, int]], qoffset: int, qcount: int
) -> None:
    async def check() -> None:
        plugin = MemoryPlugin(SIZE)
        ctx = await Chain(plugin).top.open(False, "")
        model = bytearray(SIZE)
        for i, (kind, offset, count) in enumerate(ops):
            count = min(count, SIZE - offset)
            if kind == "write":
                data = bytes([i % 255 + 1]) * count
                await ctx.pwrite(data, offset)
                model[offset : offset + count] = data
            else:
                await getattr(ctx, kind)(count, offset)
                model[offset : offset + count] = bytes(count)
        assert plugin.allocated == sorted(plugin.pages)
        assert await ctx.pread(SIZE, 0) == model
        count = min(qcount, SIZE - qoffset)
        extents = await ctx.extents(count, qoffset)
        pos = qoffset
        for e in extents:
            assert e.offset == pos and e.length > 0
            for page in range(e.offset // PAGE, (e.offset + e.length - 1) // PAGE + 1):
                assert (page in plugin.pages) == (e.flags == 0)
                if e.flags:
                    assert not any(model[page * PAGE : (page + 1) * PAGE])
            pos += e.length
        assert pos == qoffset + count
        assert all(a.flags != b.flags for a, b in itertools.pairwise(extents))

    trio.run(check)


async def test_flags() -> None:
    async with serving(MemoryPlugin(MiB)) as server:
        c = await connect(server)
        await c.go()
        TF = TransmissionFlag
        assert c.flags == (
            TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES
            | TF.SEND_DF | TF.CAN_MULTI_CONN | TF.SEND_CACHE | TF.SEND_FAST_ZERO
        )  # fmt: skip


def test_cache_is_offered_and_succeeds_as_nbdkit_s_does() -> None:
    """nbdkit's memory plugin offers CACHE; so does ours, and a cache request (over
    the whole disk too) succeeds without changing a byte."""
    script = (
        "h.pwrite(b'x' * 4096, 8192)\n"
        "print(h.can_cache())\n"
        "h.cache(4096, 8192)\n"
        "h.cache(h.get_size(), 0)\n"
        "print(h.pread(4096, 8192) == b'x' * 4096)\n"
    )
    for start in (trionbd_process, nbdkit_process):
        with start("memory", "1M") as server:
            assert export_info(server.uri)["can_cache"] is True
            assert nbdsh(server.uri, script).split() == ["True", "True"]
