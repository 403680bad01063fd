"""The tar filter through the real ``trionbd`` command, with archives made by GNU tar and
real clients (nbdinfo, nbdcopy, nbdsh, libnbd). Every byte served is compared with the
source file; block status with the source file's SEEK_DATA/SEEK_HOLE map.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.chain.raw_client import RawClient
from tests.interop.tar_helpers import (
    MTIME_TEXT,
    TAR,
    KiB,
    MiB,
    data_offsets,
    gnu_tar,
    make_sparse,
    nbd_map,
    random_bytes,
    write_tree,
)
from tests.support import (
    PYTHON,
    ROOT,
    export_info,
    libnbd_python,
    listing,
    nbdsh,
    read_export,
    run,
    seek_map,
    short_tmpdir,
    trionbd_exit,
    trionbd_process,
    wait_until,
)
from trionbd.protocol.constants import Opt, Rep

# --- regular members, links and the three header formats -------------------------------

LONG_USTAR = "long/" + "d" * 70 + "/" + "f" * 90 + ".img"
"""A 170-byte path that ustar stores by splitting it into prefix and name."""
LONG_COMPONENT = "g" * 150 + ".bin"
"""A 154-byte file name: only GNU (././@LongLink) and pax (path record) can store it."""
LONG_DIR = "e" * 120 + "/inner.dat"

REGULAR = {
    "one-byte": 1,
    "empty": 0,
    "block-511": 511,
    "block-512": 512,
    "block-513": 513,
    "dir/sub/data.bin": 100_000,
    "dir/large.img": 3 * MiB + 7,
    LONG_USTAR: 5000,
}
LONG_ONLY = {LONG_COMPONENT: 7777, LONG_DIR: 1234}


def build_tree(src: Path, long_names: bool) -> dict[str, bytes]:
    """Regular files, links, a directory, a FIFO and a device; returns the exports
    expected (name -> bytes), in archive order, and the member list to give tar."""
    sizes = dict(REGULAR, **(LONG_ONLY if long_names else {}))
    files = {name: random_bytes(size, seed) for seed, (name, size) in enumerate(sizes.items())}
    write_tree(src, files)
    os.link(src / "dir/sub/data.bin", src / "dir/hard")
    os.symlink("dir/large.img", src / "sym")
    os.symlink("../one-byte", src / "dir/rel")
    os.symlink("dir/sub", src / "dirlink")
    os.mkfifo(src / "fifo")
    os.mknod(src / "null-dev", 0o600 | 0o020000, os.makedev(1, 3))
    return files


def members_in_order(files: dict[str, bytes]) -> list[str]:
    return ["dir", "dir/sub", *files, "dir/hard", "sym", "dir/rel", "dirlink", "fifo", "null-dev"]


def expected_exports(files: dict[str, bytes]) -> dict[str, bytes]:
    return {
        **files,
        "dir/hard": files["dir/sub/data.bin"],
        "sym": files["dir/large.img"],
        "dir/rel": files["one-byte"],
    }


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_every_member_is_an_export_served_byte_for_byte(fmt: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = build_tree(src, long_names=fmt != "ustar")
    archive = gnu_tar(tmp_path / "a.tar", src, members_in_order(files), f"--format={fmt}")
    expected = expected_exports(files)
    with trionbd_process(TAR, "file", str(archive)) as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == list(expected)
        for e in exports:
            name = e["export-name"]
            assert e["export-size"] == len(expected[name]), name
            assert read_export(server.uri_for(name), tmp_path) == expected[name], name
        # The default export is the first regular member.
        default = export_info(server.uri)
        assert default["export-name"] == "one-byte"
    by_name = {e["export-name"]: e["description"] for e in exports}
    assert by_name["dir/sub/data.bin"] == (
        f"regular file, 100000 bytes, mode 0644, mtime {MTIME_TEXT}"
    )
    assert by_name["dir/hard"] == by_name["dir/sub/data.bin"] + ", link to 'dir/sub/data.bin'"
    assert by_name["sym"].endswith("link to 'dir/large.img'")


def test_directories_devices_fifos_are_refused_with_a_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = build_tree(src, long_names=True)
    archive = gnu_tar(tmp_path / "a.tar", src, members_in_order(files), "--format=gnu")
    refused = {
        "dir": "'dir' (header at offset 0) is a directory, not a regular file",
        "dir/sub/": "is a directory",
        "fifo": "is a FIFO, not a regular file",
        "null-dev": "is a character device, not a regular file",
        "dirlink": "'dirlink' (resolved to 'dir/sub') (header at offset 512) is a directory",
        "nope": "no member named 'nope'",
        "dir/nope": "no member named 'dir/nope'",
    }
    with trionbd_process(TAR, "file", str(archive)) as server:
        with RawClient(server.socket) as client:
            for name, says in refused.items():
                for option in (Opt.INFO, Opt.GO):
                    result = client.info(name, option)
                    assert result.reply == Rep.ERR_UNKNOWN, name
                    assert result.message.startswith(f"tar: {archive}: "), result.message
                    assert says in result.message, result.message
            # The connection survives and serves a path through a symlinked directory.
            ok = client.info("dirlink/data.bin", Opt.GO)
            assert ok.reply == Rep.ACK and ok.size == 100_000
            assert client.read(0, 100_000) == files["dir/sub/data.bin"]


def test_leading_dot_slash_and_slash_are_removed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = {"a.img": random_bytes(70_000, 1), "sub/b.img": random_bytes(3000, 2)}
    write_tree(src, files)
    dotted = tmp_path / "dotted.tar"
    run(["tar", "-C", str(src), "--sort=name", "-cf", str(dotted), "."])
    absolute = tmp_path / "absolute.tar"
    run(["tar", "-P", "-cf", str(absolute), str(src / "a.img")])
    assert run(["tar", "tf", str(dotted)]).split() == ["./", "./a.img", "./sub/", "./sub/b.img"]
    with trionbd_process(TAR, "file", str(dotted)) as server:
        assert [e["export-name"] for e in listing(server.uri)] == ["a.img", "sub/b.img"]
        for name, data in files.items():
            assert read_export(server.uri_for(name), tmp_path) == data
        # The name as written in the archive finds the member too.
        assert read_export(server.uri_for("./sub/b.img"), tmp_path) == files["sub/b.img"]
    with trionbd_process(TAR, "file", str(absolute)) as server:
        name = str(src / "a.img").lstrip("/")
        assert [e["export-name"] for e in listing(server.uri)] == [name]
        assert read_export(server.uri_for(name), tmp_path) == files["a.img"]


# --- sparse members --------------------------------------------------------------------

SPARSE_LAYOUTS = {
    # name: (size, data ranges); holes everywhere else
    "lead-hole.img": (
        8 * MiB + 1000,
        [
            (64 * KiB, 4 * KiB),
            (1 * MiB, 128 * KiB),
            (2 * MiB + 4 * KiB, 4 * KiB),
            (8 * MiB - 8 * KiB, 8 * KiB + 1000),
        ],
    ),
    "trail-hole.img": (5 * MiB, [(0, 12 * KiB), (3 * MiB, 1 * MiB)]),
    "all-hole.img": (2 * MiB, []),
    "many-regions.img": (4 * MiB, [(i * 64 * KiB, 4 * KiB) for i in range(1, 41)]),
}
SPARSE_OPTIONS = {
    "gnu": ["--format=gnu"],
    "pax-0.0": ["--format=pax", "--sparse-version=0.0"],
    "pax-0.1": ["--format=pax", "--sparse-version=0.1"],
    "pax-1.0": ["--format=pax", "--sparse-version=1.0"],
}


def sparse_archive(tmp: Path, options: list[str]) -> tuple[Path, dict[str, bytes], Path]:
    src = tmp / "src"
    src.mkdir()
    contents = {
        name: make_sparse(src / name, size, ranges, seed)
        for seed, (name, (size, ranges)) in enumerate(SPARSE_LAYOUTS.items())
    }
    contents["plain.bin"] = random_bytes(10_000, 99)
    write_tree(src, {"plain.bin": contents["plain.bin"]})
    archive = gnu_tar(tmp / "sparse.tar", src, list(contents), "-S", *options)
    return archive, contents, src


@pytest.mark.parametrize("kind", list(SPARSE_OPTIONS))
def test_sparse_members_serve_holes_as_zeroes_and_report_them(kind: str, tmp_path: Path) -> None:
    archive, contents, src = sparse_archive(tmp_path, SPARSE_OPTIONS[kind])
    # GNU tar stored only the data: the archive is much smaller than the files.
    assert archive.stat().st_size < 3 * MiB
    with trionbd_process(TAR, "file", str(archive)) as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == list(contents)
        for e in exports:
            name = e["export-name"]
            assert e["export-size"] == len(contents[name])
            assert read_export(server.uri_for(name), tmp_path) == contents[name], name
            if name != "plain.bin":
                assert "(sparse, " in e["description"], e
                assert nbd_map(server.uri_for(name)) == seek_map(src / name), name
        # Some source maps really have holes in the middle (the test means something).
        assert len(seek_map(src / "many-regions.img")) == 81


STRUCTURED_READ = """
import json, nbd
chunks = []
def chunk(subbuf, offset, status, error):
    chunks.append([offset, len(subbuf), status == nbd.READ_HOLE])
    return 0
buf = h.pread_structured(COUNT, OFFSET, chunk)
print(json.dumps({"chunks": sorted(chunks), "data": buf.hex()}))
"""


def test_structured_reads_of_sparse_members_carry_hole_chunks(tmp_path: Path) -> None:
    archive, contents, src = sparse_archive(tmp_path, SPARSE_OPTIONS["pax-1.0"])
    name = "lead-hole.img"
    offset, count = 60 * KiB, 2 * MiB + 100 * KiB  # starts in a hole, ends in one
    with trionbd_process(TAR, "file", str(archive)) as server:
        script = STRUCTURED_READ.replace("COUNT", str(count)).replace("OFFSET", str(offset))
        out = json.loads(nbdsh(server.uri_for(name), script))
    assert bytes.fromhex(out["data"]) == contents[name][offset : offset + count]
    holes = [(o, n) for o, n, hole in out["chunks"] if hole]
    expected = []
    for start, length, kind in seek_map(src / name):
        lo, hi = max(start, offset), min(start + length, offset + count)
        if kind == 3 and lo < hi:
            expected.append((lo, hi - lo))
    assert holes == expected
    assert len(holes) == 4
    covered = sorted((o, n) for o, n, _ in out["chunks"])
    assert sum(n for _, n in covered) == count


def test_block_status_of_a_regular_member_is_the_archive_shifted(tmp_path: Path) -> None:
    """The archive file itself may be sparse: a punched hole inside a member's data
    shows in the member's map at the member's offsets."""
    src = tmp_path / "src"
    data = random_bytes(1 * MiB, 5)
    write_tree(src, {"first": random_bytes(700, 4), "disk.img": data})
    archive = gnu_tar(tmp_path / "a.tar", src, ["first", "disk.img"])
    start = 4 * 512  # header, 700 bytes of data padded to 1024, header
    assert data_offsets(archive)["disk.img"] == start
    hole_at = 256 * KiB  # 4 KiB-aligned in the archive file
    run(["fallocate", "-p", "-o", str(hole_at), "-l", str(128 * KiB), str(archive)])
    expected = bytearray(data)
    expected[hole_at - start : hole_at - start + 128 * KiB] = bytes(128 * KiB)
    with trionbd_process(TAR, "file", str(archive)) as server:
        assert read_export(server.uri_for("disk.img"), tmp_path) == expected
        assert nbd_map(server.uri_for("disk.img")) == [
            (0, hole_at - start, 0),
            (hole_at - start, 128 * KiB, 3),
            (hole_at - start + 128 * KiB, len(data) - (hole_at - start + 128 * KiB), 0),
        ]


# --- many members, no members ----------------------------------------------------------


def test_an_archive_of_10000_members(tmp_path: Path) -> None:
    count = 10_000
    src = tmp_path / "src"
    files = {f"many/f{i:05d}": random_bytes(i % 700, i) for i in range(count)}
    write_tree(src, files)
    (tmp_path / "list").write_text("\n".join(files) + "\n")
    archive = tmp_path / "many.tar"
    run(
        ["tar", "-C", str(src), "--no-recursion", "-cf", str(archive), "-T", str(tmp_path / "list")]
    )
    started = time.perf_counter()
    # nbdinfo --list asks INFO of every export within one handshake: on a loaded machine
    # 10000 of them can outlast the default 10 s handshake timeout.
    with trionbd_process("--handshake-timeout=0", TAR, "file", str(archive)) as server:
        ready = time.perf_counter() - started
        started = time.perf_counter()
        exports = listing(server.uri)
        listed = time.perf_counter() - started
        assert [e["export-name"] for e in exports] == list(files)
        assert [e["export-size"] for e in exports] == [len(d) for d in files.values()]
        # Every member, read through its own connection, against the source file.
        started = time.perf_counter()
        out = libnbd_python(
            READ_EVERY_MEMBER.replace("URI", repr(server.uri)).replace("SRC", repr(str(src))),
            timeout=600,
        )
        read_all = time.perf_counter() - started
    assert out.split() == [str(count), "0"]
    print(
        f"\n10000 members: server ready in {ready:.2f} s (headers read at start-up), "
        f"nbdinfo --list --json {listed:.2f} s, every member read {read_all:.2f} s"
    )


READ_EVERY_MEMBER = """
import nbd, os, urllib.parse
src = SRC
names = []
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(URI)
h.opt_list(lambda name, desc: names.append(name))
h.opt_abort()
socket = urllib.parse.parse_qs(urllib.parse.urlparse(URI).query)["socket"][0]
bad = 0
for name in names:
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(socket)
    size = h.get_size()
    data = h.pread(size, 0) if size else b""
    h.shutdown()
    with open(os.path.join(src, name), "rb") as f:
        bad += f.read() != data
print(len(names), bad)
"""


def test_an_empty_archive_has_no_exports(tmp_path: Path) -> None:
    archive = tmp_path / "empty.tar"
    run(["tar", "-cf", str(archive), "--files-from", "/dev/null"])
    assert archive.stat().st_size == 10240
    with trionbd_process(TAR, "file", str(archive)) as server:
        assert listing(server.uri) == []
        with RawClient(server.socket) as client:
            assert client.list_names() == (Rep.ACK, [])
            for name in ("", "x", "a/b"):
                result = client.info(name, Opt.GO)
                assert result.reply == Rep.ERR_UNKNOWN, name
                assert str(archive) in result.message
            assert "has no regular members" in client.info("", Opt.GO).message


# --- malformed archives ----------------------------------------------------------------


def two_member_archive(path: Path, src: Path) -> None:
    """``a`` (1000 bytes: header at 0, data 512-1512) and ``b`` (3000 bytes: header at
    1536, data 2048-5048), then the end-of-archive zeros (10240 bytes in all)."""
    write_tree(src, {"a": random_bytes(1000, 1), "b": random_bytes(3000, 2)})
    gnu_tar(path, src, ["a", "b"], "--format=gnu")
    assert path.stat().st_size == 10240


def set_size_field(path: Path, header: int, size: int) -> None:
    """Rewrite the size field of the header at ``header`` and fix its checksum."""
    raw = bytearray(path.read_bytes())
    raw[header + 124 : header + 136] = f"{size:011o}\0".encode()
    raw[header + 148 : header + 156] = b" " * 8
    raw[header + 148 : header + 156] = f"{sum(raw[header : header + 512]):06o}\0 ".encode()
    path.write_bytes(raw)


def corrupt(path: Path, how: str) -> None:
    if how == "bad checksum":
        raw = bytearray(path.read_bytes())
        raw[1536 + 1] ^= 0x40  # the second header's name
        path.write_bytes(raw)
    elif how == "truncated header":
        os.truncate(path, 1536 + 100)
    elif how == "truncated data":
        os.truncate(path, 3000)
    elif how == "size beyond the end":
        set_size_field(path, 1536, 50_000)
    else:
        raise AssertionError(how)


MALFORMED = {
    "bad checksum": "bad header checksum at offset 1536",
    "truncated header": "truncated header at offset 1536",
    "truncated data": "truncated archive: member 'b' (header at offset 1536) has 3000 bytes",
    "size beyond the end": "member 'b' (header at offset 1536) has 50000 bytes of data at "
    "offset 2048, past the end of the archive (10240 bytes)",
}


@pytest.mark.parametrize("how", list(MALFORMED))
def test_a_malformed_single_archive_stops_start_up(how: str, tmp_path: Path) -> None:
    archive = tmp_path / "bad.tar"
    two_member_archive(archive, tmp_path / "src")
    corrupt(archive, how)
    result = trionbd_exit(TAR, "file", str(archive))
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"trionbd: tar: {archive}: "), result.stderr
    assert MALFORMED[how] in result.stderr, result.stderr


@pytest.mark.parametrize("how", list(MALFORMED))
def test_a_malformed_archive_among_several_is_refused_alone(how: str, tmp_path: Path) -> None:
    d = tmp_path / "archives"
    d.mkdir()
    two_member_archive(d / "bad.tar", tmp_path / "src1")
    corrupt(d / "bad.tar", how)
    src = tmp_path / "src2"
    files = {"x": random_bytes(5000, 7), "sub/y": random_bytes(12_345, 8)}
    write_tree(src, files)
    gnu_tar(d / "good.tar", src, list(files))
    (d / "notes.txt").write_text("not an archive, but long enough to hold a header\n" * 20)
    # One process: each worker would log the refusal of the archive at start-up.
    with trionbd_process("--workers=1", TAR, "file", f"dir={d}") as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == ["good.tar/x", "good.tar/sub/y"]
        with RawClient(server.socket) as client:
            for option in (Opt.INFO, Opt.GO):
                result = client.info("bad.tar/a", option)
                assert result.reply == Rep.ERR_UNKNOWN
                assert result.message.startswith("tar: bad.tar: "), result.message
                assert MALFORMED[how] in result.message
                result = client.info("notes.txt/x", option)
                assert result.reply == Rep.ERR_UNKNOWN
                assert result.message.startswith("tar: notes.txt: "), result.message
            ok = client.info("good.tar/sub/y", Opt.GO)
            assert ok.reply == Rep.ACK
            assert client.read(0, 12_345) == files["sub/y"]
        for name, data in files.items():
            assert read_export(server.uri_for(f"good.tar/{name}"), tmp_path) == data
        log = server.stderr
    warning = next(line for line in log.splitlines() if "tar: bad.tar: " in line)
    assert warning.startswith("trionbd: tar: bad.tar: ") and warning.endswith(" (not listed)")
    assert MALFORMED[how] in warning
    assert re.search(r"^trionbd: tar: notes\.txt: .* \(not listed\)$", log, re.MULTILINE)


# --- several archives: ARCHIVE/MEMBER --------------------------------------------------


def test_archives_of_a_directory_are_named_archive_slash_member(tmp_path: Path) -> None:
    d = tmp_path / "archives"
    d.mkdir()
    trees = {
        "a.tar": {"x": random_bytes(3000, 1), "dir/y.img": random_bytes(200_000, 2)},
        "b.tar": {"y": random_bytes(1, 3), "x": random_bytes(513, 4)},
    }
    for i, (archive, files) in enumerate(trees.items()):
        write_tree(tmp_path / f"src{i}", files)
        gnu_tar(d / archive, tmp_path / f"src{i}", list(files), "--format=pax")
    expected = {f"{a}/{name}": data for a, files in trees.items() for name, data in files.items()}
    with trionbd_process(TAR, "file", f"dir={d}") as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == [
            "a.tar/x",
            "a.tar/dir/y.img",
            "b.tar/y",
            "b.tar/x",
        ]
        for e in exports:
            name = e["export-name"]
            assert e["export-size"] == len(expected[name])
            size = len(expected[name])
            assert e["description"].startswith(f"regular file, {size} byte{'s' * (size != 1)},")
            assert read_export(server.uri_for(name), tmp_path) == expected[name]
        default = export_info(server.uri)
        assert default["export-name"] == "a.tar/x"
        with RawClient(server.socket) as client:
            result = client.info("c.tar/x", Opt.GO)
            assert result.reply == Rep.ERR_UNKNOWN
            assert "names are EXPORT/ITEM" in result.message
            result = client.info("a.tar/nope", Opt.GO)
            assert result.reply == Rep.ERR_UNKNOWN
            assert result.message == "tar: a.tar: no member named 'nope'"


# --- tar-entry -------------------------------------------------------------------------


def test_tar_entry_serves_that_member_to_every_client(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = {"first": random_bytes(100, 1), "disk/root.img": random_bytes(300_000, 2)}
    write_tree(src, files)
    archive = gnu_tar(tmp_path / "a.tar", src, list(files))
    with trionbd_process(TAR, "file", str(archive), "tar-entry=./disk/root.img") as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == ["disk/root.img"]
        assert exports[0]["description"].startswith("regular file, 300000 bytes")
        for uri in (server.uri, server.uri_for("disk/root.img"), server.uri_for("first")):
            assert read_export(uri, tmp_path) == files["disk/root.img"]
        default = export_info(server.uri)
        assert default["export-name"] == "disk/root.img"


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("nope", "no member named 'nope'"),
        ("disk", "'disk' (header at offset 0) is a directory, not a regular file"),
    ],
)
def test_a_missing_tar_entry_stops_start_up(entry: str, says: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"disk/root.img": random_bytes(1000, 1)})
    archive = gnu_tar(tmp_path / "a.tar", src, ["disk", "disk/root.img"])
    result = trionbd_exit(TAR, "file", str(archive), f"tar-entry={entry}")
    assert result.returncode == 1
    assert result.stderr == f"trionbd: tar: tar-entry={entry}: {archive}: {says}\n"


def test_tar_entry_over_several_archives_serves_each_archives_member(tmp_path: Path) -> None:
    d = tmp_path / "archives"
    d.mkdir()
    disks = {}
    for i, archive in enumerate(["a.tar", "b.tar", "c.tar"]):
        files = {"other": random_bytes(10, i), "disk.img": random_bytes(5000 + i, 10 + i)}
        if archive == "c.tar":
            del files["disk.img"]
        write_tree(tmp_path / f"src{i}", files)
        gnu_tar(d / archive, tmp_path / f"src{i}", list(files))
        disks[archive] = files.get("disk.img")
    args = ("--workers=1", TAR, "file", f"dir={d}", "tar-entry=disk.img")  # one log line
    with trionbd_process(*args) as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == ["a.tar", "b.tar"]
        for archive in ("a.tar", "b.tar"):
            assert read_export(server.uri_for(archive), tmp_path) == disks[archive]
        with RawClient(server.socket) as client:
            result = client.info("c.tar", Opt.GO)
            assert result.reply == Rep.ERR_UNKNOWN
            assert result.message == "tar: c.tar: no member named 'disk.img'"
        log = server.stderr
    assert "trionbd: tar: c.tar: no member named 'disk.img' (not listed)" in log


# --- capabilities, manual, the README command ------------------------------------------

CAPS = (
    "can_flush",
    "can_fua",
    "can_multi_conn",
    "can_cache",
    "can_trim",
    "can_zero",
    "can_fast_zero",
    "is_read_only",
    "is_rotational",
    "can_df",
)


@pytest.mark.parametrize("readonly", [False, True])
def test_capabilities_are_those_of_the_layer_below(readonly: bool, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"disk.img": random_bytes(64 * KiB, 1)})
    archive = gnu_tar(tmp_path / "a.tar", src, ["disk.img"])
    flags = ["-r"] if readonly else []
    with trionbd_process(*flags, "file", str(archive)) as plain:
        below = export_info(plain.uri)
    with trionbd_process(*flags, TAR, "file", str(archive)) as server:
        info = export_info(server.uri)
    assert {k: info[k] for k in CAPS} == {k: below[k] for k in CAPS}
    assert info["is_read_only"] is readonly
    assert info["export-size"] == 64 * KiB
    assert "base:allocation" in info["contexts"]


def test_help_shows_the_manual() -> None:
    out = run([PYTHON, "-m", "trionbd", "--filter=tar", "--help"], cwd=ROOT)
    assert out.startswith("tar: serve the members of a tar archive as exports.\n")
    assert "\n  tar-entry=NAME " in out
    assert "trionbd file disk.tar --filter=tar" in out


def test_the_readme_command(tmp_path: Path) -> None:
    """``trionbd file disk.tar --filter=tar`` run from the directory holding disk.tar (on
    a Unix socket instead of TCP port 10809, which a test cannot count on). It goes to
    the background, so it is stopped through its pidfile."""
    src = tmp_path / "src"
    files = {"boot.img": random_bytes(2 * MiB, 1), "root.img": random_bytes(3 * MiB + 1, 2)}
    write_tree(src, files)
    gnu_tar(tmp_path / "disk.tar", src, list(files))
    trionbd = str(Path(PYTHON).parent / "trionbd")
    with short_tmpdir() as tmp:
        sock, pidfile = str(tmp / "sock"), tmp / "pid"
        proc = subprocess.Popen(
            [trionbd, "--print-uri", "-U", sock, "-P", str(pidfile), "file", "disk.tar",
             "--filter=tar"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            uri = proc.stdout.readline().strip()
            assert uri == f"nbd+unix:///?socket={sock}", uri
            assert [e["export-name"] for e in listing(uri)] == list(files)
            assert read_export(uri, tmp_path) == files["boot.img"]
            root = f"nbd+unix:///root.img?socket={sock}"
            assert read_export(root, tmp_path) == files["root.img"]
            _, err = proc.communicate(timeout=20)  # the parent, exited once serving
            assert proc.returncode == 0, err
        finally:
            if pidfile.exists():
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
                wait_until(lambda: not pidfile.exists(), "the server removed its pidfile")
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Traceback" not in err
