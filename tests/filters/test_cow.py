"""The cow filter: writes go to a temporary overlay, the layer below is never written.

Real clients (nbdcopy, nbdsh, libnbd) write through the filter and read back; the
underlying file's checksum must not change. In-process tests hold reads of the layer
below open to force concurrent read-modify-writes of one block."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.filters.test_offset import HOLE, block_status_map
from tests.support import nbdsh, random_file, run, trionbd_exit, trionbd_process
from trionbd.chain import Chain, Plugin
from trionbd.filters.cow import CowFilter
from trionbd.plugins.pattern import pattern_bytes
from trionbd.protocol.constants import CmdFlag

KIB = 1024
BLOCK = 64 * KIB


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def overlay_files(pid: int, directory: Path) -> list[Path]:
    """The overlay files a server process holds open in ``directory`` (unlinked files
    still readable through /proc/PID/fd)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = Path(f"/proc/{pid}/fd/{fd}")
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target.startswith(str(directory) + "/") and target.endswith(" (deleted)"):
            found.append(link)
    return found


def cow_env(directory: Path) -> dict[str, str]:
    directory.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(directory)}


# --- real clients ----------------------------------------------------------------------------


def test_a_full_nbdcopy_write_leaves_the_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    random_file(path, 8 * 1024 * KIB + 4096 + 100)  # the last block is short
    before = sha(path)
    new = random_file(tmp_path / "new.img", path.stat().st_size, seed=2)
    overlays = tmp_path / "overlays"
    with trionbd_process("--filter=cow", "file", str(path), env=cow_env(overlays)) as server:
        assert run(["nbdinfo", "--is", "read-only", server.uri], check=False) == ""
        run(["nbdcopy", str(tmp_path / "new.img"), server.uri])
        run(["nbdcopy", server.uri, str(tmp_path / "back.img")])
        # The overlay is an unlinked file in TMPDIR, as large as the disk.
        assert list(overlays.iterdir()) == []
        (overlay,) = overlay_files(server.proc.pid, overlays)
        assert overlay.stat().st_size == len(new)
        assert overlay.read_bytes() == new
    assert (tmp_path / "back.img").read_bytes() == new
    assert sha(path) == before


def test_partial_writes_merge_with_the_layer_below(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    original = random_file(path, 1024 * KIB + 100)
    before = sha(path)
    size = len(original)
    writes = [
        (1, 10),
        (BLOCK - 5, 10),
        (3 * BLOCK, BLOCK),
        (5 * BLOCK + 7, 3 * BLOCK),
        (size - 50, 50),
    ]
    script = f"""
import random, nbd
rng = random.Random(3)
for where, n in {writes!r}:
    h.pwrite(rng.randbytes(n), where, nbd.CMD_FLAG_FUA if where % 2 else 0)
h.flush()
print(h.pread(h.get_size(), 0).hex())
"""
    with trionbd_process("--filter=cow", "file", str(path), env=cow_env(tmp_path / "t")) as server:
        seen = bytes.fromhex(nbdsh(server.uri, script))
    rng = random.Random(3)
    expected = bytearray(original)
    for where, n in writes:
        expected[where : where + n] = rng.randbytes(n)
    assert seen == expected
    assert sha(path) == before


def test_trims_and_zeroes_read_as_zero_and_report_holes(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    original = random_file(path, 1024 * KIB)
    before = sha(path)
    script = """
import nbd
h.trim(2 * 65536, 65536)            # blocks 1, 2: whole blocks -> holes
h.zero(100000, 300000)              # 300000..400000: partial ends, block 5 whole
h.zero(65536, 8 * 65536, nbd.CMD_FLAG_NO_HOLE)  # block 8 as real zeroes: data
h.trim(100, 700000)                 # inside block 10: zeroes, data
h.zero(65536, 15 * 65536)           # block 15 (last), then written again partly
h.pwrite(b"x" * 10, 15 * 65536 + 20)
print(h.pread(h.get_size(), 0).hex())
"""
    expected = bytearray(original)
    for start, stop in [
        (BLOCK, 3 * BLOCK),
        (300000, 400000),
        (8 * BLOCK, 9 * BLOCK),
        (700000, 700100),
        (15 * BLOCK, 16 * BLOCK),
    ]:
        expected[start:stop] = bytes(stop - start)
    expected[15 * BLOCK + 20 : 15 * BLOCK + 30] = b"x" * 10
    with trionbd_process("--filter=cow", "file", str(path), env=cow_env(tmp_path / "t")) as server:
        seen = bytes.fromhex(nbdsh(server.uri, script))
        extents = block_status_map(server.uri)
    assert seen == expected
    assert extents == [
        (0, BLOCK, 0),
        (BLOCK, 2 * BLOCK, HOLE),
        (3 * BLOCK, 2 * BLOCK, 0),
        (5 * BLOCK, BLOCK, HOLE),
        (6 * BLOCK, 10 * BLOCK, 0),
    ]
    assert sha(path) == before


def test_block_status_merges_the_overlay_with_the_layer_below(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(1024 * KIB)
        for where in (0, 8 * BLOCK):
            f.seek(where)
            f.write(random.Random(where).randbytes(BLOCK))
    before = sha(path)
    script = "h.pwrite(b'data', 200000); h.trim(65536, 0); h.zero(65536, 12 * 65536)"
    with trionbd_process("--filter=cow", "file", str(path), env=cow_env(tmp_path / "t")) as server:
        nbdsh(server.uri, script)
        extents = block_status_map(server.uri)
    assert extents == [
        (0, 3 * BLOCK, HOLE),  # trimmed in the overlay, then a hole of the file
        (3 * BLOCK, BLOCK, 0),  # written: block 3
        (4 * BLOCK, 4 * BLOCK, HOLE),  # the file's hole
        (8 * BLOCK, BLOCK, 0),  # the file's data
        (9 * BLOCK, 7 * BLOCK, HOLE),  # the file's hole, and block 12 zeroed
    ]
    assert sha(path) == before


def test_two_clients_writing_interleaved_sectors_of_the_same_blocks(tmp_path: Path) -> None:
    """Each client writes every other 512-byte sector of the same 2 MiB (so every block
    gets read-modify-writes from both), many requests in flight, both at once. The delay
    filter below cow makes each read of an old block wait, so writes pile up meanwhile."""
    path = tmp_path / "disk.img"
    original = random_file(path, 4 * 1024 * KIB)
    before = sha(path)
    writer = """
import random, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
parity = int(sys.argv[2])
rng = random.Random(parity)
for sector in range(parity, 4096, 2):
    while h.aio_in_flight() >= 32:
        h.poll(-1)
    h.aio_pwrite(rng.randbytes(512), 100000 + sector * 512)
while h.aio_in_flight():
    h.poll(-1)
h.shutdown()
"""
    with trionbd_process(
        "--filter=cow",
        "--filter=delay",
        "file",
        str(path),
        "rdelay=2ms",
        env=cow_env(tmp_path / "t"),
    ) as server:
        procs = [
            subprocess.Popen(["/usr/bin/python3", "-c", writer, server.uri, str(p)]) for p in (0, 1)
        ]
        assert [p.wait(120) for p in procs] == [0, 0]
        run(["nbdcopy", server.uri, str(tmp_path / "back.img")])
    expected = bytearray(original)
    for parity in (0, 1):
        rng = random.Random(parity)
        for sector in range(parity, 4096, 2):
            where = 100000 + sector * 512
            expected[where : where + 512] = rng.randbytes(512)
    assert (tmp_path / "back.img").read_bytes() == expected
    assert sha(path) == before


def test_a_read_only_plugin_becomes_writable(tmp_path: Path) -> None:
    size = 3 * BLOCK + 1000
    script = """
h.pwrite(b"hello", 70000)
h.zero(5000, 0)
print(h.pread(h.get_size(), 0).hex())
"""
    with trionbd_process("--filter=cow", "pattern", str(size), env=cow_env(tmp_path / "t")) as s:
        assert run(["nbdinfo", "--is", "read-only", s.uri], check=False) == ""
        seen = bytes.fromhex(nbdsh(s.uri, script))
        info = run(["nbdinfo", s.uri])
    expected = bytearray(pattern_bytes(size, 0))
    expected[70000:70005] = b"hello"
    expected[0:5000] = bytes(5000)
    assert seen == expected
    for flag in ("can_multi_conn: true", "can_flush: true", "can_fua: true", "can_trim: true"):
        assert flag in info
    assert "block_size_preferred: 65536" in info


def test_clients_of_one_export_share_the_overlay(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    random_file(path, 512 * KIB)
    with trionbd_process("--filter=cow", "file", str(path), env=cow_env(tmp_path / "t")) as s:
        nbdsh(s.uri, "h.pwrite(b'shared!', 1234)")
        assert nbdsh(s.uri, "print(h.pread(7, 1234).decode())").strip() == "shared!"


def test_bad_parameters_and_an_unusable_tmpdir_exit_with_status_2(tmp_path: Path) -> None:
    random_file(tmp_path / "disk.img", 1000)
    base = ["--filter=cow", "file", str(tmp_path / "disk.img")]
    for extra, env, message in [
        (["cow-block-size=1000"], None, "not a power of two from 4096 to 2G"),
        (["cow-block-size=2048"], None, "not a power of two"),
        (["cow-on-read=maybe"], None, "not a boolean"),
        ([], {**os.environ, "TMPDIR": str(tmp_path / "missing")}, "cannot create the overlay"),
    ]:
        result = trionbd_exit(*base, *extra, env=env)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr, result.stderr


# --- in-process: the layer below under control ---------------------------------------------


class Gated(Plugin):
    """A read-only disk of random bytes whose reads wait for ``gate`` and are counted."""

    name = "gated"

    def __init__(self, size: int):
        self.data = random.Random(11).randbytes(size)
        self.reads: list[tuple[int, int]] = []
        self.gate = trio.Event()
        self.gate.set()

    async def get_size(self, h: Any) -> int:
        return len(self.data)

    async def can_multi_conn(self, h: Any) -> bool:
        return True

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        self.reads.append((offset, count))
        await self.gate.wait()
        return self.data[offset : offset + count]


def apply(base: bytes, ops: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(base)
    for where, data in ops:
        out[where : where + len(data)] = data
    return bytes(out)


async def test_concurrent_read_modify_writes_of_one_block_lose_nothing() -> None:
    plugin = Gated(4 * BLOCK)
    chain = Chain(plugin, [CowFilter()])
    a, b = await chain.top.open(False, ""), await chain.top.open(False, "")
    ops = [
        (a, (10, b"A" * 100)),  # partial: reads the block below, then waits
        (b, (0, b"B" * BLOCK)),  # the whole block, while A waits
        (b, (5000, b"C" * 300)),  # another part of the same block
        (a, (BLOCK - 7, b"D" * 14)),  # straddles blocks 0 and 1
    ]
    plugin.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        for ctx, (where, data) in ops:
            nursery.start_soon(ctx.pwrite, data, where, 0)
            await trio.testing.wait_all_tasks_blocked()
        plugin.gate.set()
    got = await a.pread(2 * BLOCK, 0)
    # All four writes ran concurrently: the result must be one of their serial orders.
    orders = {
        apply(plugin.data[: 2 * BLOCK], [op for _, op in p]) for p in itertools.permutations(ops)
    }
    assert got in orders
    await a.close()
    await b.close()
    chain.unload()


async def read_twice(setting: bool | str, offset: int, count: int) -> list[tuple[int, int]]:
    """Read the same range twice through cow with ``cow-on-read=setting``; the reads
    that reached the layer below."""
    plugin = Gated(4 * BLOCK)
    chain = Chain(plugin, [CowFilter(cow_on_read=setting)])
    ctx = await chain.top.open(False, "")
    for _ in range(2):
        assert await ctx.pread(count, offset) == plugin.data[offset : offset + count]
    await ctx.close()
    chain.unload()
    return plugin.reads


async def test_cow_on_read_copies_blocks_into_the_overlay(tmp_path: Path) -> None:
    assert await read_twice(False, 100, BLOCK + 10) == [(100, BLOCK + 10)] * 2
    assert await read_twice(True, 100, BLOCK + 10) == [(0, BLOCK), (BLOCK, BLOCK)]
    switch = tmp_path / "copy-now"
    assert await read_twice(str(switch), 100, BLOCK + 10) == [(100, BLOCK + 10)] * 2
    switch.touch()
    assert await read_twice(str(switch), 100, BLOCK + 10) == [(0, BLOCK), (BLOCK, BLOCK)]


async def test_cache_requests_copy_up_with_cow_on_cache() -> None:
    plugin = Gated(4 * BLOCK)
    chain = Chain(plugin, [CowFilter(cow_on_cache=True)])
    ctx = await chain.top.open(False, "")
    await ctx.cache(10, BLOCK + 5)
    assert plugin.reads == [(BLOCK, BLOCK)]
    assert await ctx.pread(BLOCK, BLOCK) == plugin.data[BLOCK : 2 * BLOCK]
    assert plugin.reads == [(BLOCK, BLOCK)]  # served from the overlay
    await ctx.close()
    chain.unload()


async def test_fast_zero_and_no_hole_zeroes() -> None:
    plugin = Gated(4 * BLOCK)
    chain = Chain(plugin, [CowFilter()])
    ctx = await chain.top.open(False, "")
    await ctx.zero(BLOCK, 0, CmdFlag.FAST_ZERO)
    await ctx.zero(BLOCK, BLOCK, CmdFlag.NO_HOLE)
    assert await ctx.pread(2 * BLOCK, 0) == bytes(2 * BLOCK)
    states = [e.flags for e in await ctx.extents(4 * BLOCK, 0)]
    assert states == [int(HOLE), 0]  # zeroed block, then real zeroes and unwritten data
    assert plugin.reads == []  # whole blocks never read the layer below
    await ctx.close()
    chain.unload()


def test_export_names_get_their_own_overlays(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    one = random_file(images / "one.img", 300 * KIB)
    two = random_file(images / "two.img", 200 * KIB, seed=2)
    script = """
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(sys.argv[2].encode(), 0)
"""
    with trionbd_process("--filter=cow", "file", f"dir={images}", env=cow_env(tmp_path / "t")) as s:
        for name in ("one.img", "two.img"):
            run(["/usr/bin/python3", "-c", script, s.uri_for(name), name])
        first = [
            nbdsh(s.uri_for(n), "print(h.pread(7, 0).decode())").strip()
            for n in ("one.img", "two.img")
        ]
        assert len(overlay_files(s.proc.pid, tmp_path / "t")) == 2
    assert first == ["one.img", "two.img"]
    assert (images / "one.img").read_bytes() == one and (images / "two.img").read_bytes() == two


@pytest.mark.parametrize("block_size", ["4k", "1M"])
def test_other_block_sizes(tmp_path: Path, block_size: str) -> None:
    path = tmp_path / "disk.img"
    original = random_file(path, 3 * 1024 * KIB + 17)
    before = sha(path)
    script = """
import random
rng = random.Random(4)
for where, n in [(3, 5000), (1048570, 20), (2000000, 1048576), (h.get_size() - 9, 9)]:
    h.pwrite(rng.randbytes(n), where)
print(h.pread(h.get_size(), 0).hex())
"""
    with trionbd_process(
        "--filter=cow",
        "file",
        str(path),
        f"cow-block-size={block_size}",
        env=cow_env(tmp_path / "t"),
    ) as server:
        seen = bytes.fromhex(nbdsh(server.uri, script))
    rng = random.Random(4)
    expected = bytearray(original)
    for where, n in [(3, 5000), (1048570, 20), (2000000, 1048576), (len(original) - 9, 9)]:
        expected[where : where + n] = rng.randbytes(n)
    assert seen == expected
    assert sha(path) == before
