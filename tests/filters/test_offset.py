"""The offset filter: a window of the layer below, checked with nbdcopy, nbdsh and
libnbd against slices of the served file and against its SEEK_DATA/SEEK_HOLE map."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.support import (
    libnbd_python,
    nbdsh,
    random_file,
    run,
    seek_map,
    sparse_file,
    trionbd_exit,
    trionbd_process,
)
from trionbd.chain import Chain, NBDError
from trionbd.filters.offset import OffsetFilter
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import State

HOLE = int(State.HOLE | State.ZERO)

_MAP_SCRIPT = """
import json, nbd
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(URI)
size = h.get_size()
out = []
pos = 0
while pos < size:
    got = []
    def extent(meta, offset, entries, err):
        if meta == nbd.CONTEXT_BASE_ALLOCATION:
            got.extend(entries)
        return 0
    h.block_status(min(size - pos, 1 << 30), pos, extent)
    assert got, "no extents"
    for i in range(0, len(got), 2):
        length, flags = min(got[i], size - pos), got[i + 1]
        if out and out[-1][2] == flags:
            out[-1][1] += length
        else:
            out.append([pos, length, flags])
        pos += length
print(json.dumps(out))
"""


def block_status_map(uri: str) -> list[tuple[int, int, int]]:
    """``(offset, length, flags)`` runs of the whole export, as libnbd sees them
    (neighbours with equal flags merged)."""
    runs = json.loads(libnbd_python(_MAP_SCRIPT.replace("URI", repr(uri))))
    return [(offset, length, flags) for offset, length, flags in runs]


def test_nbdcopy_reads_exactly_the_window(tmp_path: Path) -> None:
    data = random_file(tmp_path / "disk.img", 3 * 1024 * 1024 + 123)
    offset, length = 1024 * 1024 + 512, 1_500_001
    with trionbd_process(
        "--filter=offset", "file", str(tmp_path / "disk.img"), f"offset={offset}", f"range={length}"
    ) as server:
        assert int(run(["nbdinfo", "--size", server.uri])) == length
        run(["nbdcopy", server.uri, str(tmp_path / "copy.img")])
    assert (tmp_path / "copy.img").read_bytes() == data[offset : offset + length]


def test_without_range_the_window_runs_to_the_end(tmp_path: Path) -> None:
    data = random_file(tmp_path / "disk.img", 2 * 1024 * 1024 + 99)
    with trionbd_process("--filter=offset", "file", str(tmp_path / "disk.img"), "offset=1M") as s:
        assert int(run(["nbdinfo", "--size", s.uri])) == len(data) - 1024 * 1024
        run(["nbdcopy", s.uri, str(tmp_path / "copy.img")])
        # A range ending exactly at the end of the file is fine too.
        tail = nbdsh(s.uri, "print(h.pread(1000, h.get_size() - 1000).hex())")
    assert (tmp_path / "copy.img").read_bytes() == data[1024 * 1024 :]
    assert bytes.fromhex(tail) == data[-1000:]


def test_nbdsh_reads_and_writes_land_at_the_shifted_position(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    original = random_file(path, 1024 * 1024)
    offset, length = 100_003, 600_000
    script = f"""
import random
rng = random.Random(5)
size = h.get_size()
assert size == {length}, size
assert h.pread(4096, 0) == open({str(path)!r}, "rb").read()[{offset}:{offset} + 4096]
writes = [(0, 777), (size - 555, 555), (4000, 70000), (300000, 1)]
for where, n in writes:
    h.pwrite(rng.randbytes(n), where)
h.zero(9000, 200000)
h.trim(8192, 400000)
h.flush()
print(h.pread(size, 0).hex())
"""
    with trionbd_process(
        "--filter=offset", "file", str(path), f"offset={offset}", f"range={length}"
    ) as server:
        seen = bytes.fromhex(nbdsh(server.uri, script))
    rng = random.Random(5)
    expected = bytearray(original)
    for where, n in [(0, 777), (length - 555, 555), (4000, 70000), (300000, 1)]:
        expected[offset + where : offset + where + n] = rng.randbytes(n)
    expected[offset + 200000 : offset + 209000] = bytes(9000)
    expected[offset + 400000 : offset + 408192] = bytes(8192)
    assert path.read_bytes() == expected  # nothing outside the window changed
    assert seen == expected[offset : offset + length]


def test_requests_beyond_the_window_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    original = random_file(path, 200_000)
    script = """
import nbd
for call in (lambda: h.pread(2, 99_999), lambda: h.pwrite(b"xy", 99_999)):
    try:
        call()
    except nbd.Error as e:
        print("refused", e.errno)
    else:
        print("accepted")
"""
    with trionbd_process(
        "--filter=offset", "file", str(path), "offset=50000", "range=100000"
    ) as server:
        out = nbdsh(server.uri, script).split("\n")
    assert out[0].startswith("refused") and out[1].startswith("refused"), out
    assert path.read_bytes() == original


@pytest.mark.parametrize(("offset", "length"), [(5000, 1_000_000), (0, None), (12345, 77777)])
def test_block_status_is_shifted(tmp_path: Path, offset: int, length: int | None) -> None:
    path = tmp_path / "sparse.img"
    size = 2 * 1024 * 1024
    data = sparse_file(
        path,
        size,
        [(0, 4096), (64 * 1024, 3 * 4096), (300 * 1024, 100 * 1024), (size - 8192, 8192)],
    )
    args = ["--filter=offset", "file", str(path), f"offset={offset}"]
    if length is not None:
        args.append(f"range={length}")
    end = size if length is None else offset + length
    with trionbd_process(*args) as server:
        got = block_status_map(server.uri)
        run(["nbdcopy", server.uri, str(tmp_path / "copy.img")])
    expected = seek_map(path, offset, end)
    assert any(flags == HOLE for _, _, flags in expected)  # the test means something
    assert any(flags == 0 for _, _, flags in expected)
    assert got == expected
    assert (tmp_path / "copy.img").read_bytes() == data[offset:end]


async def test_a_window_past_the_end_refuses_the_open_with_both_numbers() -> None:
    chain = Chain(MemoryPlugin(1000), [OffsetFilter(offset=1001)])
    with pytest.raises(NBDError) as info:
        await chain.top.open(False, "")
    assert "offset=1001" in info.value.message and "1000 bytes" in info.value.message
    chain = Chain(MemoryPlugin(1000), [OffsetFilter(offset=600, range=401)])
    with pytest.raises(NBDError) as info:
        await chain.top.open(False, "")
    assert "offset+range=600+401=1001" in info.value.message
    assert "1000 bytes" in info.value.message
    # The exact fit is fine, also an empty window at the very end.
    for offset, length in ((600, 400), (1000, None)):
        ctx = await Chain(MemoryPlugin(1000), [OffsetFilter(offset, length)]).top.open(False, "")
        assert await ctx.get_size() == 1000 - offset
        await ctx.close()


def test_a_bad_window_fails_that_client_and_the_server_keeps_serving(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    big = random_file(images / "big.img", 300_000)
    random_file(images / "small.img", 120_000, seed=2)
    with trionbd_process(
        "-v", "--filter=offset", "file", f"dir={images}", "offset=100000", "range=150000"
    ) as server:
        failed = run(["nbdinfo", server.uri_for("small.img")], check=False)
        assert failed == "" or "export-size" not in failed
        run(["nbdcopy", server.uri_for("big.img"), str(tmp_path / "copy.img")])
        log = server.stderr
    assert "offset+range=100000+150000=250000 is beyond the end" in log
    assert "export 'small.img' has 120000 bytes" in log
    assert (tmp_path / "copy.img").read_bytes() == big[100000:250000]


def test_bad_parameters_exit_with_status_2(tmp_path: Path) -> None:
    random_file(tmp_path / "disk.img", 1000)
    result = trionbd_exit("--filter=offset", "file", str(tmp_path / "disk.img"), "offset=x")
    assert result.returncode == 2
    assert "offset=x" in result.stderr and "not a size" in result.stderr
