"""The zip filter through the real ``trionbd`` command, with archives made by Info-ZIP's
zip and real clients: every member copied with nbdcopy and compared byte for byte,
random reads in a deflated member, zip-entry=, members that cannot be served, several
archives in a directory, damaged archives, and zip over gzip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.chain.raw_client import RawClient
from tests.formats.support import write
from tests.formats.test_gzip import sample
from tests.interop.test_compressed_filters import kept_files, random_reads
from tests.support import (
    Running,
    export_info,
    libnbd_python,
    nbdsh,
    read_export,
    trionbd_exit,
    trionbd_process,
)
from trionbd.protocol.constants import Rep

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("zip", "gzip", "nbdcopy", "nbdsh")),
    reason="zip, gzip, nbdcopy and nbdsh are needed",
)

KiB, MiB = 1 << 10, 1 << 20
MTIME = 1_700_000_000
MTIME_TEXT = "2023-11-14T22:13:20Z"
ZIP = "--filter=zip"


def make_tree(root: Path) -> dict[str, bytes]:
    """Files in zip's order (zip -r walks directories in the order given, then their
    entries as the file system lists them: the tests compare as sets where it matters)."""
    files = {
        "disk.img": sample(3 * MiB + 4321, seed=21),
        "stored.bin": os.urandom(200 * KiB),
        "text/numbers.txt": b"".join(b"%d\n" % i for i in range(100_000)),
        "text/ünï cödé.txt": "grüße\n".encode(),
        "empty": b"",
        "deep/a/b/zeros.img": bytes(700 * KiB),
    }
    for name, data in files.items():
        write(root / name, data)
        os.utime(root / name, (MTIME, MTIME))
    (root / "emptydir").mkdir()
    return files


def zip_files(root: Path, out: Path, names: list[str], *args: str) -> Path:
    subprocess.run(["zip", "-q", *args, str(out), *names], cwd=root, check=True)
    return out


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "src"
    return root, make_tree(root)


def archive(tmp_path: Path, tree: tuple[Path, dict[str, bytes]], *args: str) -> Path:
    """All files, ``stored.bin`` stored (zip -n .bin), the rest deflated, plus emptydir/."""
    root, files = tree
    return zip_files(root, tmp_path / "a.zip", [*files, "emptydir"], "-n", ".bin", *args)


def test_every_member_is_an_export(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    _, files = tree
    path = archive(tmp_path, tree)
    with trionbd_process("file", str(path), ZIP) as server:
        with RawClient(server.socket) as client:
            assert client.list_names() == (Rep.ACK, list(files))  # not emptydir/
        for name, data in files.items():
            assert read_export(server.uri_for(name), tmp_path) == data, name
        info = export_info(server.uri)
        assert info["export-name"] == "disk.img"  # the first member is the default
        assert info["is_read_only"]
        assert info["description"].startswith(
            f"regular file, {len(files['disk.img'])} bytes, deflated to "
        )
        assert info["description"].endswith(f", mtime {MTIME_TEXT}")
        stored = export_info(server.uri_for("stored.bin"))["description"]
        assert stored == f"regular file, {200 * KiB} bytes, stored, mtime {MTIME_TEXT}"
        random_reads(server.uri_for("disk.img"), tree[0] / "disk.img", seed=4)


def test_zip_entry_serves_one_member(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    _, files = tree
    path = archive(tmp_path, tree)
    entry = "text/numbers.txt"
    with trionbd_process("file", str(path), ZIP, f"zip-entry={entry}") as server:
        with RawClient(server.socket) as client:
            assert client.list_names() == (Rep.ACK, [entry])
        assert read_export(server.uri_for("any name"), tmp_path) == files[entry]
    missing = trionbd_exit("file", str(path), ZIP, "zip-entry=nope")
    assert missing.returncode == 1
    assert f"zip: zip-entry=nope: {path}" in missing.stderr and "'nope'" in missing.stderr


def test_a_deflated_member_is_kept_inflated_in_a_temporary_file(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """The first read of a deflated member inflates it whole into an unlinked file in
    $TMPDIR; later reads, from any connection, are that file's bytes. One process (each
    worker would keep a file of its own)."""
    _, files = tree
    path = archive(tmp_path, tree)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    expected = tmp_path / "disk.img"
    expected.write_bytes(files["disk.img"])
    env = {**os.environ, "TMPDIR": str(tmp)}
    with trionbd_process("--workers=1", "file", str(path), ZIP, env=env) as server:
        assert kept_files(server.proc.pid, tmp) == []
        uri = server.uri_for("disk.img")
        random_reads(uri, expected, seed=5, count=50)
        assert kept_files(server.proc.pid, tmp) == [len(files["disk.img"])]
        for _ in range(2):
            assert read_export(uri, tmp_path) == files["disk.img"]
        random_reads(uri, expected, seed=6, count=50)
        assert kept_files(server.proc.pid, tmp) == [len(files["disk.img"])]


def test_writes_are_refused(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    path = archive(tmp_path, tree)
    before = path.read_bytes()
    script = """
try:
    h.pwrite(b"x" * 512, 0)
except nbd.Error as e:
    print("refused", e.errno)
"""
    with trionbd_process("file", str(path), ZIP) as server:
        for name in ("stored.bin", "disk.img"):
            assert nbdsh(server.uri_for(name), script).split() == ["refused", "EPERM"], name
    assert path.read_bytes() == before


def test_members_that_cannot_be_served_are_listed_and_refused(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, files = tree
    path = zip_files(root, tmp_path / "a.zip", ["disk.img"])
    zip_files(root, path, ["text/numbers.txt"], "-P", "secret")
    zip_files(root, path, ["deep/a/b/zeros.img"], "-Z", "bzip2")
    with trionbd_process("file", str(path), ZIP) as server:
        with RawClient(server.socket) as client:
            assert client.list_names()[1] == ["disk.img", "text/numbers.txt", "deep/a/b/zeros.img"]
            for name, why in (("text/numbers.txt", "encrypted"),
                              ("deep/a/b/zeros.img", "compressed with bzip2")):  # fmt: skip
                refused = client.info(name)
                assert refused.reply == Rep.ERR_POLICY, refused
                assert refused.message == (
                    f"zip: {path}: member {name!r} cannot be served: {why}"
                ), refused.message
        listed = {e["export-name"]: e["description"] for e in _listing(server)}
        size = len(files["text/numbers.txt"])
        assert listed["text/numbers.txt"].startswith(f"regular file, {size} bytes, ")
        assert "cannot be served: encrypted" in listed["text/numbers.txt"]
        assert read_export(server.uri_for("disk.img"), tmp_path) == files["disk.img"]


def _listing(server: Running) -> list[dict[str, str]]:
    """Names and descriptions as NBD_OPT_LIST gives them (nbdinfo --list would open
    every export, and fail on those that cannot be served)."""
    script = f"""
import nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri({server.uri!r})
seen = []
h.opt_list(lambda name, description: seen.append((name, description)) or 0)
for name, description in seen:
    print(name + "\\t" + description)
"""
    return [
        {"export-name": n, "description": d}
        for n, d in (line.split("\t", 1) for line in libnbd_python(script).splitlines())
    ]


def test_several_archives_in_a_directory(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, files = tree
    d = tmp_path / "zips"
    d.mkdir()
    zip_files(root, d / "a.zip", ["disk.img", "empty"])
    zip_files(root, d / "b.zip", ["text/numbers.txt"], "-0")
    damaged = bytearray(zip_files(root, d / "c.zip", ["stored.bin"]).read_bytes())
    cd = damaged.rfind(b"PK\x01\x02")
    damaged[cd + 1] ^= 0xFF
    (d / "c.zip").write_bytes(bytes(damaged))
    (d / "notes.txt").write_text("not a zip\n")
    with trionbd_process("file", f"dir={d}", ZIP) as server:
        with RawClient(server.socket) as client:
            assert client.list_names() == (
                Rep.ACK, ["a.zip/disk.img", "a.zip/empty", "b.zip/text/numbers.txt"],
            )  # fmt: skip
            refused = client.info("c.zip/stored.bin")
            assert refused.reply == Rep.ERR_UNKNOWN
            assert refused.message.startswith(
                f"zip: c.zip: zip: central directory entry 0 at offset {cd}: bad signature"
            ) or refused.message.startswith(
                f"zip: c.zip: central directory entry 0 at offset {cd}: bad signature"
            ), refused.message
        for name in ("a.zip/disk.img", "b.zip/text/numbers.txt"):
            assert read_export(server.uri_for(name), tmp_path) == files[name.split("/", 1)[1]]
        log = server.stderr
    assert "c.zip" in log and "notes.txt" in log  # not listed, and why


def test_damaged_archives(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    path = archive(tmp_path, tree)
    blob = path.read_bytes()
    end = blob.rfind(b"PK\x05\x06")
    cases = {
        "truncated.zip": (blob[:end], "no end of central directory record"),
        "cd.zip": (_flip(blob, blob.find(b"PK\x01\x02")), "bad signature"),
    }
    for name, (damaged, says) in cases.items():
        bad = tmp_path / name
        bad.write_bytes(damaged)
        result = trionbd_exit("file", str(bad), ZIP)
        assert result.returncode == 1, result.stderr
        assert f"zip: {bad}: " in result.stderr and says in result.stderr, result.stderr
        assert "offset" in result.stderr or "last" in result.stderr
    # A damaged local header is found when its member is opened; the others are served.
    local = blob.find(b"PK\x03\x04", blob.find(b"PK\x03\x04") + 1)  # stored.bin's
    bad = tmp_path / "local.zip"
    bad.write_bytes(_flip(blob, local))
    with trionbd_process("file", str(bad), ZIP) as server:
        with RawClient(server.socket) as client:
            refused = client.info("stored.bin")
            assert refused.reply == Rep.ERR_UNKNOWN
            assert f"local header of 'stored.bin' at offset {local}: bad signature" in (
                refused.message
            ), refused.message
        assert read_export(server.uri_for("disk.img"), tmp_path) == tree[1]["disk.img"]


def _flip(blob: bytes, pos: int) -> bytes:
    return blob[:pos] + bytes([blob[pos] ^ 0xFF]) + blob[pos + 1 :]


def test_a_damaged_deflated_member_fails_its_reads(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """Its CRC-32 (checked while its checkpoints are made, at its first read) or its
    deflate data is wrong: reads fail with EIO and the message; others are served."""
    path = archive(tmp_path, tree)
    blob = bytearray(path.read_bytes())
    pos = blob.find(b"disk.img") + 8 + 100 * KiB  # inside disk.img's deflate data
    blob[pos] ^= 0x01
    path.write_bytes(bytes(blob))
    script = """
try:
    h.pread(4096, 0)
    h.pread(4096, h.get_size() - 4096)
    print("read")
except nbd.Error as e:
    print("failed", e.errno)
"""
    with trionbd_process("-v", "file", str(path), ZIP) as server:
        assert nbdsh(server.uri_for("disk.img"), script).split() == ["failed", "EIO"]
        assert read_export(server.uri_for("stored.bin"), tmp_path) == tree[1]["stored.bin"]
        log = server.stderr
    assert "zip: " in log and "'disk.img'" in log


def test_zip_over_gzip_and_the_hint_for_compressed_archives(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    path = archive(tmp_path, tree)
    gz = tmp_path / "a.zip.gz"
    gz.write_bytes(subprocess.run(["gzip", "-c", str(path)], stdout=subprocess.PIPE,
                                  check=True).stdout)  # fmt: skip
    with trionbd_process("file", str(gz), ZIP, "--filter=gzip") as server:
        assert read_export(server.uri_for("disk.img"), tmp_path) == tree[1]["disk.img"]
    hint = trionbd_exit("file", str(gz), ZIP)
    assert hint.returncode == 1
    assert "this looks like gzip: add --filter=gzip" in hint.stderr, hint.stderr
