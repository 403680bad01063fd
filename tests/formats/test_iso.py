"""Tests for trionbd.formats.iso against images written by genisoimage: Rock Ridge,
Joliet and plain names, deep (relocated) directories, multi-extent files, and damage
giving a FormatError, never wrong bytes."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.formats.support import MemoryImage, write
from trionbd.formats import FormatError
from trionbd.formats.iso import SECTOR, IsoFile, IsoImage, read_iso

pytestmark = pytest.mark.skipif(not shutil.which("genisoimage"), reason="genisoimage is needed")

DEEP = "/d1/d2/d3/d4/d5/d6/d7/d8/d9/deep.txt"


def make_tree(root: Path) -> dict[str, bytes]:
    rng = random.Random(6)
    files = {
        "/numbers.txt": b"".join(b"%d\n" % i for i in range(50_000)),
        "/a/b/random.bin": rng.randbytes(300_001),
        "/a/Ünïcode name with spaces.txt": b"hello\n",
        "/a/empty": b"",
        DEEP: b"deep down\n",
    }
    for path, data in files.items():
        write(root / path.lstrip("/"), data)
    return files


def mkiso(root: Path, out: Path, *args: str) -> bytes:
    subprocess.run(["genisoimage", "-quiet", *args, "-o", str(out), str(root)], check=True)
    return out.read_bytes()


def contents(blob: bytes, f: IsoFile) -> bytes:
    return b"".join(
        bytes(s.length) if s.physical is None else blob[s.physical : s.physical + s.length]
        for s in f.segments(0, f.size)
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("src")
    return root, make_tree(root)


@pytest.mark.parametrize(
    ("args", "names"),
    [(("-R", "-J"), "rock ridge"), (("-J",), "joliet"), (("-r",), "rock ridge")],
)
async def test_files_read_back(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path, args: tuple[str, ...], names: str
) -> None:
    root, files = tree
    blob = mkiso(root, tmp_path / "x.iso", *args)
    image = await read_iso(MemoryImage(blob).pread, len(blob))
    assert image.names == names
    if names == "joliet":  # Joliet keeps names, but no deeper than 8 levels
        files = {p: d for p, d in files.items() if p != DEEP}
    assert sorted(f.path for f in image.files if f.path in files) == sorted(files)
    for f in image.files:
        if f.path in files:
            assert contents(blob, f) == files[f.path], f.path
            assert f.mtime > 1_600_000_000


async def test_plain_iso9660_names(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, files = tree
    blob = mkiso(root, tmp_path / "x.iso")
    image = await read_iso(MemoryImage(blob).pread, len(blob))
    assert image.names == "iso9660"
    f = image.lookup("/A/B/RANDOM.BIN")
    assert f is not None and contents(blob, f) == files["/a/b/random.bin"]


async def test_multi_extent_file(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    """Files of 4 GiB and more are split in extents (records with the same name, all
    but the last flagged); made here by joining two files' records (genisoimage would
    need a 4 GiB file)."""
    root = tmp_path / "two"
    write(root / "part1", b"A" * 5000)
    write(root / "part2", b"B" * 3000)
    blob = bytearray(mkiso(root, tmp_path / "x.iso"))
    first = blob.find(b"PART1.;1")
    second = blob.find(b"PART2.;1")
    blob[second : second + 5] = b"PART1"
    blob[first - 33 + 25] |= 0x80  # "more extents follow"
    image = await read_iso(MemoryImage(blob).pread, len(blob))
    (f,) = image.files
    assert f.path == "/PART1" and f.size == 8000 and len(f.extents) == 2
    assert contents(bytes(blob), f) == b"A" * 5000 + b"B" * 3000
    assert [s.length for s in f.segments(4000, 2000)] == [1000, 1000]


async def rr_image(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> tuple[bytes, IsoImage]:
    blob = mkiso(tree[0], tmp_path / "x.iso", "-R")
    return blob, await read_iso(MemoryImage(blob).pread, len(blob))


async def test_damage_is_a_clean_error(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    blob, image = await rr_image(tree, tmp_path)
    pvd = 16 * SECTOR
    root_extent = int.from_bytes(blob[pvd + 156 + 2 : pvd + 156 + 6], "little") * SECTOR
    numbers = image.lookup("/numbers.txt")
    assert numbers is not None
    record = blob.find(b"NUMBERS.TXT;1", root_extent) - 33
    cases: list[tuple[str, int, bytes, str]] = [
        ("identifier", pvd + 1, b"CD002", "bad identifier"),
        ("block size", pvd + 128, b"\x00\x03", "logical block size"),
        ("record length", root_extent, b"\x05", f"directory record at offset {root_extent}"),
        ("extent", record + 2, (len(blob) // SECTOR + 10).to_bytes(4, "little"), "outside"),
        ("loop", record + 2, blob[pvd + 158 : pvd + 162], "directory"),
    ]
    for what, at, value, words in cases:
        bad = bytearray(blob)
        bad[at : at + len(value)] = value
        if what == "loop":
            bad[record + 25] |= 2  # numbers.txt becomes a directory: the root again
            bad[record + 10 : record + 14] = blob[pvd + 156 + 10 : pvd + 156 + 14]
        with pytest.raises(FormatError) as e:
            await read_iso(MemoryImage(bad).pread, len(bad))
        assert words in str(e.value), (what, str(e.value))
    with pytest.raises(FormatError, match="terminator"):
        await read_iso(MemoryImage(blob[: 17 * SECTOR]).pread, 17 * SECTOR)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.data())
async def test_any_single_damage_is_an_error_or_harmless(
    tree: tuple[Path, dict[str, bytes]], tmp_path_factory: pytest.TempPathFactory,
    draw: st.DataObject,
) -> None:  # fmt: skip
    """Damage anywhere in the metadata: a FormatError, or every file still under its name
    maps to bytes inside the image (its data is not checked: ISO 9660 has no checksums)."""
    blob = bytearray(mkiso(tree[0], tmp_path_factory.mktemp("h") / "x.iso", "-R", "-J"))
    metadata_end = 16 * SECTOR + 40 * SECTOR
    blob[draw.draw(st.integers(16 * SECTOR, metadata_end))] = draw.draw(st.integers(0, 255))
    try:
        image = await read_iso(MemoryImage(blob).pread, len(blob))
    except FormatError:
        return
    for f in image.files:
        for s in f.segments(0, f.size):
            assert s.physical is not None and s.physical + s.length <= len(blob)
