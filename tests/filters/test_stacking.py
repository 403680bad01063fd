"""Filters stack in command-line order (the first --filter is nearest the client).

``--filter=cow --filter=partition``: the partition is cut out first, and cow overlays
only the partition. ``--filter=partition --filter=cow``: cow overlays the whole disk and
the partition filter reads the table and the partition through it. Clients see the same
bytes either way; the overlay (read through /proc/PID/fd, although it is unlinked) and
block status show which order ran. Also: ``--help`` lists every filter's summary."""

from __future__ import annotations

import ast
import hashlib
import random
from pathlib import Path

import pytest

from tests.filters.test_cow import cow_env, overlay_files
from tests.filters.test_offset import HOLE, block_status_map
from tests.filters.test_partition import GPT_LAYOUT, fill, partition_disk
from tests.support import PYTHON, ROOT, nbdsh, run, trionbd_process

MIB = 1024 * 1024
BLOCK = 64 * 1024
WRITE_SCRIPT = """
import random
rng = random.Random(8)
size = h.get_size()
h.pwrite(rng.randbytes(5000), 1000)
h.pwrite(rng.randbytes(100), size - 100)
print(h.pread(size, 0).hex())
"""


def expected_after_writes(partition: bytes) -> bytes:
    rng = random.Random(8)
    out = bytearray(partition)
    out[1000:6000] = rng.randbytes(5000)
    out[len(out) - 100 :] = rng.randbytes(100)
    return bytes(out)


@pytest.mark.parametrize("cow_nearest_plugin", [False, True])
def test_the_order_decides_what_cow_overlays(tmp_path: Path, cow_nearest_plugin: bool) -> None:
    path = tmp_path / "disk.img"
    parts = partition_disk(path, 20 * MIB, GPT_LAYOUT)
    contents = fill(path, parts)
    offset, length, _ = parts[3]
    assert offset % BLOCK == 0 and length % BLOCK != 0
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    order = ["--filter=partition", "--filter=cow"]
    if not cow_nearest_plugin:
        order.reverse()
    overlays = tmp_path / "overlays"
    with trionbd_process(*order, "file", str(path), "partition=3", env=cow_env(overlays)) as server:
        seen = bytes.fromhex(nbdsh(server.uri, WRITE_SCRIPT))
        (overlay_fd,) = overlay_files(server.proc.pid, overlays)
        overlay = overlay_fd.read_bytes()
    expected = expected_after_writes(contents[3])
    assert seen == expected  # the client cannot tell the orders apart
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # nor can the file
    # What cow saw: the whole disk (with the partition written) or the partition alone.
    if cow_nearest_plugin:
        base = offset
        view = bytearray(path.read_bytes())
        view[offset : offset + length] = expected
    else:
        base, view = 0, bytearray(expected)
    # The overlay holds exactly the two blocks the writes touched, at cow's own offsets
    # (read-modify-write copied their other bytes from below), and zeroes elsewhere:
    # the table the partition filter read through cow was never copied.
    assert len(overlay) == len(view)
    wanted = bytearray(len(view))
    for block in ((base + 1000) // BLOCK, (base + length - 1) // BLOCK):
        wanted[block * BLOCK : (block + 1) * BLOCK] = view[block * BLOCK : (block + 1) * BLOCK]
    assert overlay == wanted


@pytest.mark.parametrize("cow_nearest_plugin", [False, True])
def test_block_alignment_follows_the_order(tmp_path: Path, cow_nearest_plugin: bool) -> None:
    """Partition 1 starts at sector 2049, off the 64 KiB cow grid of the disk: trimming
    the partition's first 64 KiB punches one whole overlay block when cow sits above the
    partition, but only zeroes parts of two disk blocks when cow sits below it."""
    path = tmp_path / "disk.img"
    parts = partition_disk(path, 8 * MIB, "label: dos\nstart=2049, size=8000, type=83\n")
    contents = fill(path, parts)
    order = ["--filter=partition", "--filter=cow"]
    if not cow_nearest_plugin:
        order.reverse()
    with trionbd_process(
        *order, "file", str(path), "partition=1", env=cow_env(tmp_path / "t")
    ) as server:
        seen = bytes.fromhex(nbdsh(server.uri, "h.trim(65536, 0); print(h.pread(70000, 0).hex())"))
        extents = block_status_map(server.uri)
    assert seen == bytes(BLOCK) + contents[1][BLOCK:70000]
    if cow_nearest_plugin:
        assert extents[0] == (0, parts[1][1], 0)  # all data: the zeroes were written
    else:
        assert extents[0] == (0, BLOCK, HOLE)


def test_offset_over_partition_is_a_window_of_the_partition(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    parts = partition_disk(path, 20 * MIB, GPT_LAYOUT)
    contents = fill(path, parts)
    with trionbd_process(
        "--filter=offset",
        "--filter=partition",
        "file",
        str(path),
        "partition=5",
        "offset=1000",
        "range=5000",
    ) as server:
        run(["nbdcopy", server.uri, str(tmp_path / "copy.img")])
    assert (tmp_path / "copy.img").read_bytes() == contents[5][1000:6000]


def module_summary(name: str) -> str:
    """The first line of a filter module's docstring, without the ``name:`` prefix."""
    source = (ROOT / "trionbd" / "filters" / f"{name}.py").read_text()
    doc = ast.get_docstring(ast.parse(source))
    assert doc is not None
    first = doc.split("\n", 1)[0]
    assert first.startswith(f"{name}: ")
    return first[len(name) + 2 :]


def test_help_lists_each_filter_with_its_one_line_summary() -> None:
    out = run([PYTHON, "-m", "trionbd", "--help"])
    lines = out.splitlines()
    for name in ("offset", "partition", "cow", "readahead"):
        summary = module_summary(name)
        assert any(line.split() == [name, *summary.split()] for line in lines), (name, out)
        manual = run([PYTHON, "-m", "trionbd", f"--filter={name}", "--help"])
        assert manual.startswith(f"{name}: {summary}")
        assert "Example" in manual
    manual = run([PYTHON, "-m", "trionbd", "--filter=cow", "--help"])
    for param in ("cow-block-size=", "cow-on-read=", "cow-on-cache="):
        assert param in manual
