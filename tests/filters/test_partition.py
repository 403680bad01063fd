"""The partition filter over disks partitioned by sfdisk (MBR with logical partitions,
GPT with eight partitions), every partition filled with its own random bytes and read
back through the filter with nbdcopy; writes, block status and refusals."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from tests.filters.test_offset import block_status_map
from tests.support import nbdsh, random_file, run, seek_map, trionbd_exit, trionbd_process

MIB = 1024 * 1024
SECTOR = 512

MBR_LAYOUT = """label: dos
start=2048, size=10240, type=83
size=8192, type=c
type=5
size=6144, type=83
size=4097, type=82
type=83
"""
GPT_LAYOUT = "label: gpt\n" + "".join(f"size={2048 + 8 * i + 1}\n" for i in range(1, 9))

Parts = dict[int, tuple[int, int, str]]
"""Partition number -> (offset, length, type), in bytes."""
Disk = tuple[Path, Parts, dict[int, bytes]]
"""An image, its partitions, and the bytes written into each partition."""


def partition_disk(path: Path, size: int, layout: str) -> Parts:
    """Make a ``size``-byte sparse image partitioned by sfdisk; return its partitions."""
    with open(path, "wb") as f:
        f.truncate(size)
    run(["sfdisk", "-q", str(path)], input=layout)
    return read_table(path)


def read_table(path: Path) -> Parts:
    """The partitions of an image as sfdisk reads them."""
    table = json.loads(run(["sfdisk", "--json", str(path)]))["partitiontable"]
    return {
        int(p["node"][len(str(path)) :]): (p["start"] * SECTOR, p["size"] * SECTOR, p["type"])
        for p in table["partitions"]
    }


def fill(path: Path, parts: Parts) -> dict[int, bytes]:
    """Write distinct random bytes over every partition except an MBR extended one."""
    contents = {}
    with open(path, "r+b") as f:
        for number, (offset, length, kind) in parts.items():
            if kind in ("5", "f", "85"):
                continue
            data = random.Random(number).randbytes(length)
            f.seek(offset)
            f.write(data)
            contents[number] = data
    return contents


@pytest.fixture
def mbr(tmp_path: Path) -> Disk:
    path = tmp_path / "mbr.img"
    parts = partition_disk(path, 40 * MIB, MBR_LAYOUT)
    assert sorted(parts) == [1, 2, 3, 5, 6, 7]
    return path, parts, fill(path, parts)


@pytest.fixture
def gpt(tmp_path: Path) -> Disk:
    path = tmp_path / "gpt.img"
    parts = partition_disk(path, 20 * MIB, GPT_LAYOUT)
    assert sorted(parts) == list(range(1, 9))
    return path, parts, fill(path, parts)


def copy_partition(tmp_path: Path, image: Path, number: int) -> tuple[int, bytes]:
    out = tmp_path / f"part{number}.img"
    with trionbd_process("--filter=partition", "file", str(image), f"partition={number}") as s:
        size = int(run(["nbdinfo", "--size", s.uri]))
        run(["nbdcopy", s.uri, str(out)])
    return size, out.read_bytes()


def test_mbr_primary_and_logical_partitions(tmp_path: Path, mbr: Disk) -> None:
    path, parts, contents = mbr
    before = path.read_bytes()
    for number in (1, 2, 5, 6, 7):
        size, data = copy_partition(tmp_path, path, number)
        assert size == parts[number][1]
        assert data == contents[number], f"partition {number}"
    assert path.read_bytes() == before


def test_gpt_with_eight_partitions(tmp_path: Path, gpt: Disk) -> None:
    path, parts, contents = gpt
    for number in range(1, 9):
        size, data = copy_partition(tmp_path, path, number)
        assert size == parts[number][1]
        assert data == contents[number], f"partition {number}"


def test_writes_land_inside_the_logical_partition(tmp_path: Path, mbr: Disk) -> None:
    path, parts, _ = mbr
    offset, length, _ = parts[6]  # 4097 sectors: not a multiple of 4096 bytes
    before = path.read_bytes()
    script = """
import random
rng = random.Random(9)
size = h.get_size()
for where, n in [(0, 1000), (size - 333, 333), (70000, 200000)]:
    h.pwrite(rng.randbytes(n), where)
h.zero(4096, 300000)
h.flush()
print(h.pread(size, 0).hex())
"""
    with trionbd_process("--filter=partition", "file", str(path), "partition=6") as server:
        seen = bytes.fromhex(nbdsh(server.uri, script))
    rng = random.Random(9)
    expected = bytearray(before)
    for where, n in [(0, 1000), (length - 333, 333), (70000, 200000)]:
        expected[offset + where : offset + where + n] = rng.randbytes(n)
    expected[offset + 300000 : offset + 304096] = bytes(4096)
    assert path.read_bytes() == expected  # the EBRs and the other partitions are intact
    assert seen == expected[offset : offset + length]
    assert read_table(path) == parts


def test_block_status_of_a_partition_is_shifted(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    parts = partition_disk(path, 20 * MIB, GPT_LAYOUT)
    offset, length, _ = parts[3]
    with open(path, "r+b") as f:
        for where, n in [(0, 4096), (200 * 1024, 12 * 1024), (length - 4096, 4096)]:
            f.seek(offset + where)
            f.write(random.Random(where).randbytes(n))
    with trionbd_process("--filter=partition", "file", str(path), "partition=3") as server:
        got = block_status_map(server.uri)
    expected = seek_map(path, offset, offset + length)
    assert len(expected) >= 4  # data and holes alternate
    assert got == expected


def overlapping_mbr(path: Path) -> None:
    mbr = bytearray(SECTOR)
    for i, (start, count) in enumerate([(2048, 4096), (4096, 4096)]):
        entry = struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3), start, count)
        mbr[446 + 16 * i : 462 + 16 * i] = entry
    mbr[510:] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.write(mbr)
        f.truncate(8 * MIB)


def test_bad_tables_fail_their_client_and_the_server_keeps_serving(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    parts = partition_disk(images / "good.img", 20 * MIB, GPT_LAYOUT)
    contents = fill(images / "good.img", parts)
    random_file(images / "blank.img", 1 * MIB)
    overlapping_mbr(images / "overlap.img")
    partition_disk(images / "two.img", 8 * MIB, "label: gpt\nsize=2048\nsize=2048\n")
    with trionbd_process("-v", "--filter=partition", "file", f"dir={images}", "partition=3") as s:
        for name in ("blank.img", "overlap.img", "two.img"):
            out = run(["nbdinfo", "--size", s.uri_for(name)], check=False)
            assert out == "", (name, out)
        run(["nbdcopy", s.uri_for("good.img"), str(tmp_path / "copy.img")])
        log = s.stderr
    assert (tmp_path / "copy.img").read_bytes() == contents[3]
    assert "export 'blank.img': no MBR or GPT partition table found" in log
    assert "export 'overlap.img': MBR partition 2 (sectors 4096..8191) overlaps partition 1" in log
    assert "export 'two.img': partition 3 not found (table has: 1, 2)" in log


def test_the_extended_partition_is_refused(tmp_path: Path, mbr: Disk) -> None:
    path, _, _ = mbr
    with trionbd_process("-v", "--filter=partition", "file", str(path), "partition=3") as s:
        assert run(["nbdinfo", "--size", s.uri], check=False) == ""
        log = s.stderr
    assert "partition 3 is the MBR extended partition (type 0x05)" in log
    assert "logical partitions 5 and up" in log


@pytest.mark.parametrize("value", ["0", "-1", "one"])
def test_bad_partition_numbers_exit_with_status_2(tmp_path: Path, value: str) -> None:
    random_file(tmp_path / "disk.img", 1000)
    result = trionbd_exit(
        "--filter=partition", "file", str(tmp_path / "disk.img"), f"partition={value}"
    )
    assert result.returncode == 2, result.stderr
    assert "partition" in result.stderr and value in result.stderr
