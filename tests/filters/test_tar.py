"""In-process tests of the tar filter: when and how member maps are built, and what each
request becomes in the layer below (real clients are in tests/interop/test_tar_*.py).

Archives are written by GNU tar; the layer below is a plugin serving them from memory
that records every call, so the tests can check the exact requests the filter makes.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.interop.tar_helpers import (
    KiB,
    MiB,
    data_offsets,
    gnu_tar,
    make_sparse,
    random_bytes,
    write_tree,
)
from tests.support import run, seek_map, serving
from trionbd.chain import (
    Chain,
    Export,
    Extent,
    NBDError,
    Next,
    Plugin,
    Sparse,
    StartupError,
    clip_extents,
)
from trionbd.filters import _formats
from trionbd.filters.tar import TarFilter
from trionbd.formats import BlockingRead
from trionbd.formats.tar import TarIndex, scan_tar
from trionbd.nursery import open_lifetime
from trionbd.plugins.file import FilePlugin
from trionbd.protocol.constants import CmdFlag, State

HOLE = State.HOLE | State.ZERO


class Archives(Plugin):
    """Exports held in memory (``""`` alone: the single shape), writable, recording calls.

    ``pread`` returns the very object it records, so a test can tell a copy from the
    original. Exports may be added or removed while serving.
    """

    name = "archives"

    def __init__(self, exports: dict[str, bytes]):
        self.data = {name: bytearray(data) for name, data in exports.items()}
        self.calls: list[tuple[Any, ...]] = []
        self.last_read: bytes = b""
        self.failing = False
        """Reads fail with EIO (a disk error) while this is true."""
        self.listings = 0

    async def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        self.listings += 1
        return [Export(name) for name in self.data]

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> str:
        if export_name not in self.data:
            raise NBDError(errno.ENOENT, f"archives: no export {export_name!r}")
        self.calls.append(("open", export_name, readonly))
        return export_name

    async def close(self, h: str) -> None:
        self.calls.append(("close", h))

    async def get_size(self, h: str) -> int:
        return len(self.data[h])

    async def pread(self, h: str, count: int, offset: int, flags: int) -> bytes:
        if self.failing:
            raise NBDError(errno.EIO, f"archives: cannot read {h!r} at {offset}")
        self.last_read = bytes(self.data[h][offset : offset + count])
        self.calls.append(("pread", h, count, offset))
        return self.last_read

    async def pwrite(self, h: str, buf: bytes, offset: int, flags: int) -> None:
        self.calls.append(("pwrite", h, len(buf), offset, flags))
        self.data[h][offset : offset + len(buf)] = buf

    async def zero(self, h: str, count: int, offset: int, flags: int) -> None:
        self.calls.append(("zero", h, count, offset, flags))
        self.data[h][offset : offset + count] = bytes(count)

    async def trim(self, h: str, count: int, offset: int, flags: int) -> None:
        self.calls.append(("trim", h, count, offset, flags))

    async def cache(self, h: str, count: int, offset: int, flags: int) -> None:
        self.calls.append(("cache", h, count, offset, flags))

    async def extents(self, h: str, count: int, offset: int, flags: int) -> Iterable[Extent]:
        # A hole in every 64 KiB of the archive: [32 KiB, 36 KiB) (data at 0 too).
        self.calls.append(("extents", h, count, offset, flags))
        out = []
        pos, end = offset, offset + count
        while pos < end:
            block = pos - pos % (64 * KiB)
            for start, stop, kind in (
                (block, block + 32 * KiB, 0),
                (block + 32 * KiB, block + 36 * KiB, HOLE),
                (block + 36 * KiB, block + 64 * KiB, 0),
            ):
                if start <= pos < stop:
                    out.append(Extent(pos, min(stop, end) - pos, kind))
                    pos = min(stop, end)
        return out

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == kind]


def regular_archive(tmp: Path) -> tuple[bytes, dict[str, bytes], dict[str, int]]:
    src = tmp / "src"
    files = {"first": random_bytes(700, 1), "disk.img": random_bytes(300 * KiB, 2)}
    write_tree(src, files)
    archive = gnu_tar(tmp / "a.tar", src, list(files))
    return archive.read_bytes(), files, data_offsets(archive)


SPARSE_SIZE = 2 * MiB + 300
SPARSE_DATA = [(64 * KiB, 8 * KiB), (1 * MiB, 4 * KiB), (2 * MiB - 4 * KiB, 4 * KiB + 300)]


def sparse_archive(tmp: Path) -> tuple[bytes, bytes, list[tuple[int, int, int]]]:
    """An archive (pax, sparse 1.0) holding sp.img; its bytes, content and hole map."""
    src = tmp / "src"
    src.mkdir(parents=True)
    content = make_sparse(src / "sp.img", SPARSE_SIZE, SPARSE_DATA, 3)
    archive = gnu_tar(tmp / "s.tar", src, ["sp.img"], "-S", "--format=pax")
    return archive.read_bytes(), content, seek_map(src / "sp.img")


async def opened(chain: Chain, name: str, readonly: bool = False) -> Next:
    return await chain.top.open(readonly, name)


def clip(runs: list[tuple[int, int, int]], offset: int, count: int) -> list[tuple[int, int, int]]:
    out = []
    for start, length, kind in runs:
        lo, hi = max(start, offset), min(start + length, offset + count)
        if lo < hi:
            out.append((lo, hi - lo, kind))
    return out


# --- when maps are built ---------------------------------------------------------------


async def test_the_map_is_built_at_start_up_through_one_lifetime_context(tmp_path: Path) -> None:
    _, files, _ = regular_archive(tmp_path)
    tar = TarFilter()
    plugin = FilePlugin(file=str(tmp_path / "a.tar"))
    async with serving(Chain(plugin, [tar])) as server:
        # No client has connected: the map is there, read through one shared context.
        (archive,) = tar.indexes.cached().values()
        assert [e.name for e in archive.exports] == list(files)
        (shared,) = server.lifetime.contexts
        assert shared.owner == "tar" and shared.inner.readonly and shared.export_name == ""
        for name, data in files.items():
            uri = server.uris[0].replace("nbd+unix:///", f"nbd+unix:///{name}")
            out = tmp_path / "copy"
            await trio.to_thread.run_sync(functools.partial(run, ["nbdcopy", uri, str(out)]))
            assert out.read_bytes() == data
        assert server.lifetime.contexts == [shared] and not shared.closed
    assert shared.closed


async def test_product_maps_are_built_on_first_use_once_and_kept(tmp_path: Path) -> None:
    a, files, _ = regular_archive(tmp_path)
    plugin = Archives({"a.tar": a, "b.tar": a})
    tar = TarFilter()
    chain = Chain(plugin, [tar])

    def header_reads() -> list[str]:
        # Headers are read through read-only contexts; clients here open read-write.
        return [name for _, name, readonly in plugin.of("open") if readonly]

    async with open_lifetime(chain):
        assert plugin.calls == []  # nothing is read at start-up
        contexts: list[Next] = []

        async def client() -> None:
            contexts.append(await opened(chain, "b.tar/disk.img"))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(client)
        assert header_reads() == ["b.tar"] and list(tar.indexes.cached()) == ["b.tar"]
        assert plugin.calls[:2] == [("open", "b.tar", True), plugin.calls[1]]
        exports = await chain.top.list_exports(False, False)
        assert [e.name for e in exports] == [f"{x}/{n}" for x in ("a.tar", "b.tar") for n in files]
        await chain.top.list_exports(False, False)
        assert header_reads() == ["b.tar", "a.tar"]
        # The contexts that read headers were closed; the clients' are open and serve.
        assert [c[1] for c in plugin.of("close")] == ["b.tar", "a.tar"]
        for ctx in contexts:
            assert await ctx.pread(10, 5) == files["disk.img"][5:15]
            await ctx.close()


async def test_the_default_export_reads_only_the_archives_it_needs(tmp_path: Path) -> None:
    a, _, _ = regular_archive(tmp_path)
    plugin = Archives({"empty.tar": bytes(10240), "a.tar": a, "b.tar": a})
    chain = Chain(plugin, [TarFilter()])
    async with open_lifetime(chain):
        assert await chain.top.default_export(False, False) == "a.tar/first"
        assert [c[1] for c in plugin.of("open")] == ["empty.tar", "a.tar"]


async def test_a_malformed_archive_is_remembered_a_missing_one_is_not(tmp_path: Path) -> None:
    good, files, _ = regular_archive(tmp_path)
    bad = bytearray(good)
    bad[1] ^= 1  # the first header's checksum no longer matches
    plugin = Archives({"bad.tar": bytes(bad), "good.tar": good})
    chain = Chain(plugin, [TarFilter()])
    async with open_lifetime(chain):
        for _ in range(2):
            with pytest.raises(NBDError) as caught:
                await opened(chain, "bad.tar/first")
            assert caught.value.errno == errno.EIO
            assert caught.value.message == "tar: bad.tar: bad header checksum at offset 0"
        assert len([c for c in plugin.of("open") if c[1] == "bad.tar"]) == 1
        exports = await chain.top.list_exports(False, False)
        assert [e.name for e in exports] == [f"good.tar/{n}" for n in files]
        # An archive that appears later is served (the failure to open it was not kept).
        with pytest.raises(NBDError) as caught:
            await chain.top.open(False, "new.tar/first")
        assert caught.value.errno == errno.ENOENT
        plugin.data["new.tar"] = bytearray(good)
        ctx = await opened(chain, "new.tar/first")
        assert await ctx.pread(700, 0) == files["first"]
        await ctx.close()
        # Nor is a read error of the layer below.
        plugin.data["later.tar"] = bytearray(good)
        plugin.failing = True
        with pytest.raises(NBDError) as caught:
            await opened(chain, "later.tar/first")
        assert caught.value.errno == errno.EIO
        assert caught.value.message == "tar: later.tar: archives: cannot read 'later.tar' at 0"
        plugin.failing = False
        ctx = await opened(chain, "later.tar/first")
        assert await ctx.pread(700, 0) == files["first"]
        await ctx.close()


async def test_a_single_malformed_archive_fails_start_up_naming_the_filter(tmp_path: Path) -> None:
    good, _, _ = regular_archive(tmp_path)
    chain = Chain(Archives({"": good[:1000]}), [TarFilter()])
    with pytest.RaisesGroup(StartupError, flatten_subgroups=True) as caught:
        async with open_lifetime(chain):
            pass
    (error,) = caught.value.exceptions
    assert str(error) == (
        "tar: archives export '': truncated archive: member 'first' (header at offset 0) "
        "has 700 bytes of data at offset 512, past the end of the archive (1000 bytes)"
    )


async def test_opening_lists_the_layer_below_again_only_for_an_unknown_archive(
    tmp_path: Path,
) -> None:
    a, files, _ = regular_archive(tmp_path)
    plugin = Archives({"a.tar": a, "b.tar": a})
    chain = Chain(plugin, [TarFilter()])
    async with open_lifetime(chain):
        assert plugin.listings == 1  # at start-up, to see the shape
        for name in ("a.tar/first", "b.tar/disk.img", "a.tar/disk.img"):
            ctx = await opened(chain, name)
            await ctx.close()
        assert await chain.top.default_export(False, False) == "a.tar/first"
        assert plugin.listings == 1
        # An archive that appeared since is found: the miss lists the layer below again.
        plugin.data["c.tar"] = bytearray(a)
        ctx = await opened(chain, "c.tar/first")
        assert await ctx.pread(700, 0) == files["first"]
        await ctx.close()
        assert plugin.listings == 2
        with pytest.raises(NBDError) as caught:
            await opened(chain, "d.tar/first")
        assert caught.value.errno == errno.ENOENT and plugin.listings == 3
        # A listing lists the layer below afresh.
        exports = await chain.top.list_exports(False, False)
        assert [e.name for e in exports][-2:] == ["c.tar/first", "c.tar/disk.img"]
        assert plugin.listings == 4


async def test_reading_a_slow_archive_logs_its_progress(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trionbd")
    data, _, _ = regular_archive(tmp_path)

    class Slow(Archives):
        async def pread(self, h: str, count: int, offset: int, flags: int) -> bytes:
            await trio.sleep(2)  # on the mock clock: 2 s pass, no wall time
            return await super().pread(h, count, offset, flags)

    async with open_lifetime(Chain(Slow({"": data}), [TarFilter()])):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "trionbd.chain.container"]
    # No read has finished one second in: no member yet.
    assert lines[0] == "tar: still reading the index of archives export '': 0 members so far"
    assert re.fullmatch(
        r"tar: read the index of archives export '': 2 exports in \d+\.\d s", lines[-1]
    )


# --- headers are read by tarfile in a worker thread ------------------------------------


async def test_cancellation_reaches_a_waiting_pread(tmp_path: Path) -> None:
    data, _, _ = regular_archive(tmp_path)
    started = trio.Event()

    async def stuck(offset: int, length: int) -> bytes:
        started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def scan(read: BlockingRead) -> TarIndex:
        return scan_tar(read, len(data))

    with trio.move_on_after(5) as outer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_formats.in_thread, scan, stuck, trio.CapacityLimiter(1))
            await started.wait()
            nursery.cancel_scope.cancel()
    assert not outer.cancelled_caught


async def test_the_worker_thread_comes_from_the_limiter(tmp_path: Path) -> None:
    data, files, _ = regular_archive(tmp_path)
    limiter = trio.CapacityLimiter(1)
    seen = []

    async def pread(offset: int, length: int) -> bytes:
        seen.append(limiter.borrowed_tokens)
        return data[offset : offset + length]

    def scan(read: BlockingRead) -> TarIndex:
        return scan_tar(read, len(data))

    index = await _formats.in_thread(scan, pread, limiter)
    assert list(index) == list(files) and seen and set(seen) == {1}
    assert limiter.borrowed_tokens == 0


# --- what each request becomes below ---------------------------------------------------


async def test_a_regular_member_is_one_shifted_call_below_and_no_copy(tmp_path: Path) -> None:
    data, files, offsets = regular_archive(tmp_path)
    plugin = Archives({"": data})
    chain = Chain(plugin, [TarFilter()])
    base = offsets["disk.img"]
    async with open_lifetime(chain):
        ctx = await opened(chain, "disk.img")
        assert await ctx.get_size() == 300 * KiB
        plugin.calls.clear()
        got = await ctx.pread(1000, 5000)
        assert plugin.calls == [("pread", "", 1000, base + 5000)]
        assert got is plugin.last_read and got == files["disk.img"][5000:6000]
        plugin.calls.clear()
        await ctx.pwrite(b"abc", 7, CmdFlag.FUA)
        await ctx.zero(100, 200, CmdFlag.NO_HOLE)
        await ctx.trim(4096, 8192, 0)
        await ctx.cache(512, 0, 0)
        assert plugin.calls == [
            ("pwrite", "", 3, base + 7, CmdFlag.FUA),
            ("zero", "", 100, base + 200, CmdFlag.NO_HOLE),
            ("trim", "", 4096, base + 8192, 0),
            ("cache", "", 512, base, 0),
        ]
        # Block status is the archive's, shifted to the member; REQ_ONE gives one extent.
        extents = await ctx.extents(300 * KiB, 0, 0)
        below = clip_extents(
            "archives", await plugin.extents("", 300 * KiB, base, 0), 300 * KiB, base
        )
        assert extents == [Extent(e.offset - base, e.length, e.flags) for e in below]
        assert [e.offset for e in extents if e.flags] == [
            o - base for o in range(32 * KiB, base + 300 * KiB, 64 * KiB)
        ]
        assert len(await ctx.extents(300 * KiB, 0, CmdFlag.REQ_ONE)) == 1
        # Requests outside the member never reach the layer below.
        plugin.calls.clear()
        for call, code in (
            (ctx.pread(2, 300 * KiB - 1), errno.EINVAL),
            (ctx.pwrite(b"xy", 300 * KiB - 1), errno.ENOSPC),
            (ctx.zero(2, 300 * KiB - 1), errno.ENOSPC),
            (ctx.trim(2, 300 * KiB - 1), errno.EINVAL),
            (ctx.extents(2, 300 * KiB - 1), errno.EINVAL),
        ):
            with pytest.raises(NBDError) as caught:
                await call
            assert caught.value.errno == code
            assert "beyond the end of member 'disk.img' (307200 bytes)" in caught.value.message
        assert plugin.calls == []
        await ctx.close()
    assert data[:base] == bytes(plugin.data[""][:base])  # headers untouched


async def test_sparse_reads_and_block_status_match_the_source(tmp_path: Path) -> None:
    data, content, holes = sparse_archive(tmp_path)
    plugin = Archives({"": data})
    chain = Chain(plugin, [TarFilter()])
    rng = random.Random(7)
    boundaries = sorted(
        {0, SPARSE_SIZE} | {o for o, n in SPARSE_DATA} | {o + n for o, n in SPARSE_DATA}
    )
    ranges = [(a, b - a) for a in boundaries for b in boundaries if a < b]
    ranges += [(max(0, a + d), 1 + e) for a in boundaries for d in (-1, 0, 1) for e in (0, 1, 4096)]
    for _ in range(300):
        offset = rng.randrange(SPARSE_SIZE)
        ranges.append((offset, rng.randrange(1, SPARSE_SIZE - offset + 1)))
    async with open_lifetime(chain):
        ctx = await opened(chain, "sp.img", readonly=True)
        for offset, count in ranges:
            count = min(count, SPARSE_SIZE - offset)
            if count <= 0:
                continue
            got = await ctx.pread(count, offset)
            assert got == content[offset : offset + count], (offset, count)
            expected_holes = [(o - offset, n) for o, n, k in clip(holes, offset, count) if k]
            assert list(got.holes if isinstance(got, Sparse) else ()) == expected_holes
            extents = await ctx.extents(count, offset)
            runs = [(e.offset, e.length, e.flags) for e in extents]
            assert runs == clip(holes, offset, count)[: len(runs)]
            assert runs and runs[-1][0] + runs[-1][1] == offset + count  # all answered


async def test_sparse_writes_go_to_stored_regions_or_are_refused_whole(tmp_path: Path) -> None:
    data, content, _ = sparse_archive(tmp_path)
    plugin = Archives({"": data})
    chain = Chain(plugin, [TarFilter()])
    with tarfile.open(tmp_path / "s.tar") as t:
        base = t.getmember("sp.img").offset_data  # region 1 is stored first, at base
    async with open_lifetime(chain):
        ctx = await opened(chain, "sp.img")
        plugin.calls.clear()
        # Spanning region 1, the hole after it (non-zero bytes there) and region 2.
        with pytest.raises(NBDError) as caught:
            await ctx.pwrite(b"\1" * (1 * MiB + 100 - 64 * KiB), 64 * KiB)
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.message == (
            f"tar: write of {1 * MiB + 100 - 64 * KiB} bytes at offset {64 * KiB} puts data into "
            f"the hole [{72 * KiB}, {1 * MiB}) of sparse member 'sp.img': the archive stores no "
            "bytes there (nothing written)"
        )
        assert plugin.calls == []
        # The same range with zeroes in the hole: two writes, one per stored region.
        buf = b"\2" * 8 * KiB + bytes(1 * MiB - 72 * KiB) + b"\3" * 100
        await ctx.pwrite(buf, 64 * KiB, CmdFlag.FUA)
        assert plugin.calls == [
            ("pwrite", "", 8 * KiB, base, CmdFlag.FUA),
            ("pwrite", "", 100, base + 8 * KiB, CmdFlag.FUA),
        ]
        # NO_HOLE asks for allocated zeroes, which a hole has no bytes for: region 1 and
        # 4 KiB of the hole after it are refused whole; inside a region it passes down.
        plugin.calls.clear()
        with pytest.raises(NBDError) as caught:
            await ctx.zero(12 * KiB, 64 * KiB, CmdFlag.NO_HOLE)
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.message == (
            f"tar: zero of {12 * KiB} bytes at offset {64 * KiB} with NO_HOLE needs allocated "
            f"bytes in the hole [{72 * KiB}, {76 * KiB}) of sparse member 'sp.img': the archive "
            "stores no bytes there (nothing written)"
        )
        assert plugin.calls == []
        await ctx.zero(4 * KiB, 64 * KiB + 100, CmdFlag.NO_HOLE)
        assert plugin.calls == [("zero", "", 4 * KiB, base + 100, CmdFlag.NO_HOLE)]
        plugin.calls.clear()
        await ctx.zero(SPARSE_SIZE, 0, 0)
        await ctx.trim(SPARSE_SIZE - 64 * KiB, 64 * KiB, 0)
        await ctx.cache(10, 0, 0)  # only a hole: nothing to do below
        stored = [(base, 8 * KiB), (base + 8 * KiB, 4 * KiB), (base + 12 * KiB, 4 * KiB + 300)]
        assert plugin.calls == [("zero", "", n, o, 0) for o, n in stored] + [
            ("trim", "", n, o, 0) for o, n in stored
        ]
        assert await ctx.pread(SPARSE_SIZE, 0) == bytes(SPARSE_SIZE)
        await ctx.close()
    assert content[64 * KiB : 72 * KiB] != bytes(8 * KiB)  # there was data to zero


# --- damaged archives never crash the server -------------------------------------------


async def test_mutated_archives_give_a_clean_error_or_sound_exports(tmp_path: Path) -> None:
    data, _, _ = regular_archive(tmp_path)
    sparse, _, _ = sparse_archive(tmp_path / "sparse")
    rng = random.Random(11)
    outcomes = {"refused": 0, "served": 0}
    for i in range(120):
        raw = bytearray(sparse if i % 2 else data)
        headers = [o for o in range(0, len(raw), 512) if o < 4096]
        for _ in range(rng.randrange(1, 4)):
            at = rng.choice(headers) + rng.randrange(512)
            raw[at] = rng.randrange(256)
        if i % 5 == 0:
            del raw[rng.randrange(len(raw)) :]
        # Product shape: listing never fails; opening gives NBDError or sound exports.
        chain = Chain(Archives({"x.tar": bytes(raw), "y.tar": data}), [TarFilter()])
        async with open_lifetime(chain):
            names = [e.name for e in await chain.top.list_exports(True, False)]
            assert names[-2:] == ["y.tar/first", "y.tar/disk.img"]
            for name in names:
                await read_everything(chain, name)
        # Single shape: StartupError naming the filter, or sound exports.
        chain = Chain(Archives({"": bytes(raw)}), [TarFilter()])
        try:
            async with open_lifetime(chain):
                for export in await chain.top.list_exports(True, False):
                    await read_everything(chain, export.name)
            outcomes["served"] += 1
        except* StartupError as group:
            for error in group.exceptions:
                assert str(error).startswith("tar: archives export '': "), error
            outcomes["refused"] += 1
    assert outcomes["refused"] > 10 and outcomes["served"] > 10, outcomes


async def read_everything(chain: Chain, name: str) -> None:
    try:
        ctx = await opened(chain, name, readonly=True)
    except NBDError:
        return
    try:
        size = await ctx.get_size()
        if size:
            assert len(await ctx.pread(size, 0)) == size
            await ctx.extents(size, 0)
    finally:
        await ctx.close()
