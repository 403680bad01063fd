"""The iso filter through the real ``trionbd`` command, with images made by genisoimage
and real clients: every file copied with nbdcopy and compared byte for byte, Rock Ridge,
Joliet and plain names, iso-file=, a multi-extent file, several images in a directory,
damaged images.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.chain.raw_client import RawClient
from tests.formats.support import write
from tests.formats.test_iso import DEEP, make_tree
from tests.support import export_info, nbdsh, read_export, trionbd_exit, trionbd_process
from trionbd.protocol.constants import Rep

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("genisoimage", "nbdcopy", "nbdsh")),
    reason="genisoimage, nbdcopy and nbdsh are needed",
)

ISO = "--filter=iso"


def mkiso(root: Path, out: Path, *args: str) -> Path:
    subprocess.run(["genisoimage", "-quiet", *args, "-o", str(out), str(root)], check=True)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("src")
    return root, make_tree(root)


@pytest.mark.parametrize("args", [("-R", "-J"), ("-J",)], ids=["rock-ridge", "joliet"])
def test_every_file_is_an_export_sorted_by_path(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path, args: tuple[str, ...]
) -> None:
    root, files = tree
    if args == ("-J",):  # Joliet keeps names, but no deeper than 8 levels
        files = {p: d for p, d in files.items() if p != DEEP}
    image = mkiso(root, tmp_path / "x.iso", *args)
    with trionbd_process("file", str(image), ISO) as server:
        with RawClient(server.socket) as client:
            reply, names = client.list_names()
        assert reply == Rep.ACK
        assert names == sorted(names) and set(files) <= set(names), names
        for path, data in files.items():
            assert read_export(server.uri_for(path), tmp_path) == data, path
        # A client may leave out the leading slash.
        assert read_export(server.uri_for("numbers.txt"), tmp_path) == files["/numbers.txt"]
        info = export_info(server.uri)
        assert info["export-name"] == names[0] and info["is_read_only"]
        assert info["description"].startswith(f"regular file, {len(files[names[0]])} bytes, mtime ")


def test_plain_names_and_iso_file(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, files = tree
    image = mkiso(root, tmp_path / "x.iso")
    with trionbd_process("file", str(image), ISO, "iso-file=/A/B/RANDOM.BIN") as server:
        with RawClient(server.socket) as client:
            assert client.list_names() == (Rep.ACK, ["/A/B/RANDOM.BIN"])
        assert read_export(server.uri_for("whatever"), tmp_path) == files["/a/b/random.bin"]
    missing = trionbd_exit("file", str(image), ISO, "iso-file=/nope")
    assert missing.returncode == 1
    assert f"iso: iso-file=/nope: {image}" in missing.stderr, missing.stderr


def test_a_multi_extent_file_is_one_export(tmp_path: Path) -> None:
    """Files of 4 GiB and more are recorded in several extents; made here by joining two
    files' records (as tests/formats/test_iso.py does: genisoimage would need 4 GiB)."""
    root = tmp_path / "two"
    write(root / "part1", b"A" * 5000)
    write(root / "part2", b"B" * 3000)
    blob = bytearray(mkiso(root, tmp_path / "x.iso").read_bytes())
    first = blob.find(b"PART1.;1")
    second = blob.find(b"PART2.;1")
    blob[second : second + 5] = b"PART1"
    blob[first - 33 + 25] |= 0x80  # "more extents follow"
    image = tmp_path / "multi.iso"
    image.write_bytes(bytes(blob))
    with trionbd_process("file", str(image), ISO) as server:
        with RawClient(server.socket) as client:
            assert client.list_names() == (Rep.ACK, ["/PART1"])
        assert read_export(server.uri, tmp_path) == b"A" * 5000 + b"B" * 3000


def test_writes_are_refused(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    image = mkiso(tree[0], tmp_path / "x.iso", "-R")
    before = image.read_bytes()
    script = """
try:
    h.pwrite(b"x" * 512, 0)
except nbd.Error as e:
    print("refused", e.errno)
"""
    with trionbd_process("file", str(image), ISO) as server:
        assert nbdsh(server.uri_for("/numbers.txt"), script).split() == ["refused", "EPERM"]
    assert image.read_bytes() == before


def test_several_images_in_a_directory(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, files = tree
    d = tmp_path / "isos"
    d.mkdir()
    mkiso(root, d / "a.iso", "-R")
    damaged = bytearray(mkiso(root, d / "b.iso", "-R").read_bytes())
    damaged[16 * 2048 + 1] ^= 0xFF  # the primary volume descriptor's identifier
    (d / "b.iso").write_bytes(bytes(damaged))
    with trionbd_process("file", f"dir={d}", ISO) as server:
        with RawClient(server.socket) as client:
            reply, names = client.list_names()
            assert reply == Rep.ACK
            assert {f"a.iso{p}" for p in files} <= set(names), names
            assert not [n for n in names if n.startswith("b.iso")]
            refused = client.info("b.iso/numbers.txt")
            assert refused.reply == Rep.ERR_UNKNOWN
            assert "volume descriptor at offset 32768: bad identifier" in refused.message
        assert (
            read_export(server.uri_for("a.iso/a/b/random.bin"), tmp_path)
            == (files["/a/b/random.bin"])
        )
        log = server.stderr
    assert "b.iso" in log


def test_a_damaged_image_stops_the_start_up(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    blob = mkiso(tree[0], tmp_path / "x.iso", "-R").read_bytes()
    for name, damaged, says in (
        ("short.iso", blob[: 17 * 2048], "before the volume descriptor set terminator"),
        ("notiso.iso", bytes(40 * 2048), "volume descriptor at offset 32768: bad identifier"),
    ):
        path = tmp_path / name
        path.write_bytes(damaged)
        result = trionbd_exit("file", str(path), ISO)
        assert result.returncode == 1
        assert f"iso: {path}: " in result.stderr and says in result.stderr, result.stderr
