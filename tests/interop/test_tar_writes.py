"""Writes, zeroing and trimming through the tar filter land inside the member's data.

Each test writes through the real ``trionbd`` command with real clients (qemu-io, nbdsh),
then checks the archive two ways: byte for byte against the original archive with only
the expected bytes changed (headers and other members untouched), and by extracting it
again with GNU tar and comparing every file.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import pytest

from tests.interop.tar_helpers import (
    TAR,
    KiB,
    MiB,
    data_offsets,
    extract,
    gnu_tar,
    make_sparse,
    nbd_map,
    random_bytes,
    write_tree,
)
from tests.support import export_info, nbdsh, run, seek_map, trionbd_process

NBDSH_ERRORS = """
import errno, json
def attempt(call, *args):
    try:
        call(*args)
    except nbd.Error as e:
        return errno.errorcode[e.errnum]
    return "ok"
"""


def build(tmp: Path, fmt: str) -> tuple[Path, dict[str, bytes]]:
    src = tmp / "src"
    files = {
        "first": random_bytes(700, 1),
        "dir/disk.img": random_bytes(1 * MiB + 3, 2),
        "last.bin": random_bytes(513, 3),
    }
    write_tree(src, files)
    (src / "dir/disk-link").hardlink_to(src / "dir/disk.img")
    members = ["first", "dir", "dir/disk.img", "dir/disk-link", "last.bin"]
    return gnu_tar(tmp / "a.tar", src, members, f"--format={fmt}"), files


def patch(data: bytearray, offset: int, new: bytes) -> None:
    data[offset : offset + len(new)] = new


def check_extracted(archive: Path, tmp: Path, files: Mapping[str, bytes | bytearray]) -> None:
    out = extract(archive, tmp / "extracted")
    for name, data in files.items():
        assert (out / name).read_bytes() == data, name


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_writes_land_in_place(fmt: str, tmp_path: Path) -> None:
    archive, files = build(tmp_path, fmt)
    original = archive.read_bytes()
    offsets = data_offsets(archive)
    expected = bytearray(original)
    new = {name: bytearray(data) for name, data in files.items()}
    a, b = random_bytes(13, 10), random_bytes(4096, 11)
    with trionbd_process(TAR, "file", str(archive)) as server:
        # qemu-io: 5000 bytes of 0xab at offset 1000 of dir/disk.img.
        uri = server.uri_for("dir/disk.img")
        run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 1000 5000", uri])
        patch(new["dir/disk.img"], 1000, b"\xab" * 5000)
        patch(expected, offsets["dir/disk.img"] + 1000, b"\xab" * 5000)
        # nbdsh: the last 13 bytes of last.bin, and through the hard link with FUA.
        nbdsh(server.uri_for("last.bin"), f"h.pwrite(bytes.fromhex({a.hex()!r}), 500)")
        patch(new["last.bin"], 500, a)
        patch(expected, offsets["last.bin"] + 500, a)
        end = len(files["dir/disk.img"]) - len(b)  # the write ends where the member does
        script = f"h.pwrite(bytes.fromhex({b.hex()!r}), {end}, nbd.CMD_FLAG_FUA); h.flush()"
        nbdsh(server.uri_for("dir/disk-link"), script)
        patch(new["dir/disk.img"], end, b)
        patch(expected, offsets["dir/disk.img"] + end, b)
    assert archive.read_bytes() == bytes(expected)
    check_extracted(archive, tmp_path, {**new, "dir/disk-link": new["dir/disk.img"]})


def test_requests_past_the_end_of_a_member_fail_and_change_nothing(tmp_path: Path) -> None:
    archive, files = build(tmp_path, "gnu")
    original = archive.read_bytes()
    size = len(files["first"])
    script = (
        NBDSH_ERRORS
        + f"""
h.set_strict_mode(0)  # let libnbd send what a careless client would
print(json.dumps([
    attempt(h.pread, 10, {size} - 5),
    attempt(h.pwrite, b"x" * 10, {size} - 5),
    attempt(h.zero, 10, {size} - 5),
    attempt(h.trim, 10, {size} - 5),
    attempt(h.pread, 1, {size}),
    attempt(h.pwrite, b"x", {size}),
    attempt(h.pread, 5, {size} - 5),
    attempt(h.pwrite, b"y" * 5, {size} - 5),
]))
"""
    )
    with trionbd_process(TAR, "file", str(archive)) as server:
        out = json.loads(nbdsh(server.uri_for("first"), script))
    assert out == ["EINVAL", "ENOSPC", "ENOSPC", "EINVAL", "EINVAL", "ENOSPC", "ok", "ok"]
    expected = bytearray(original)
    patch(expected, data_offsets(archive)["first"] + size - 5, b"y" * 5)
    assert archive.read_bytes() == bytes(expected)


def test_zero_and_trim_stay_inside_the_member(tmp_path: Path) -> None:
    archive, files = build(tmp_path, "pax")
    original = archive.read_bytes()
    offsets = data_offsets(archive)
    expected = bytearray(original)
    new = {name: bytearray(data) for name, data in files.items()}
    with trionbd_process(TAR, "file", str(archive)) as server:
        nbdsh(server.uri_for("first"), "h.zero(600, 100)")
        nbdsh(server.uri_for("last.bin"), "h.zero(513, 0, nbd.CMD_FLAG_NO_HOLE)")
        nbdsh(server.uri_for("dir/disk.img"), "h.trim(64 * 1024, 4096); h.flush()")
        info = export_info(server.uri_for("first"))
    assert info["can_trim"] and info["can_zero"]
    for name, offset, length in (
        ("first", 100, 600),
        ("last.bin", 0, 513),
        ("dir/disk.img", 4096, 64 * KiB),  # the file plugin's trim punches a hole
    ):
        patch(new[name], offset, bytes(length))
        patch(expected, offsets[name] + offset, bytes(length))
    assert archive.read_bytes() == bytes(expected)
    check_extracted(archive, tmp_path, {**new, "dir/disk-link": new["dir/disk.img"]})


# --- sparse members ----------------------------------------------------------------------

SPARSE_SIZE = 1 * MiB + 100
SPARSE_DATA = [(64 * KiB, 8 * KiB), (512 * KiB, 4 * KiB), (1 * MiB - 4 * KiB, 4 * KiB + 100)]


def stored_ranges(archive: Path) -> list[tuple[int, int]]:
    """Archive ranges holding member data (by the stdlib's tarfile, for comparison)."""
    out = []
    with tarfile.open(archive) as tar:
        for m in tar:
            if m.isreg():
                sparse = cast("list[tuple[int, int]] | None", m.sparse)
                stored = sum(n for _, n in sparse) if sparse else m.size
                out.append((m.offset_data, stored))
    return out


def outside(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    """``data`` with the given ranges cut out."""
    pieces, pos = [], 0
    for offset, length in sorted(ranges):
        pieces.append(data[pos:offset])
        pos = offset + length
    return b"".join(pieces) + data[pos:]


@pytest.mark.parametrize("options", [["--format=gnu"], ["--format=pax", "--sparse-version=1.0"]])
def test_writes_to_sparse_members(options: list[str], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    content = bytearray(make_sparse(src / "sp.img", SPARSE_SIZE, SPARSE_DATA, 1))
    after = random_bytes(3000, 2)
    write_tree(src, {"after.bin": after})
    archive = gnu_tar(tmp_path / "s.tar", src, ["sp.img", "after.bin"], "-S", *options)
    original = archive.read_bytes()
    source_map = seek_map(src / "sp.img")
    inside = random_bytes(5000, 3)
    straddle = random_bytes(100, 4) + bytes(300)  # ends of region 1, then zeroes in a hole
    script = (
        NBDSH_ERRORS
        + f"""
start = {64 * KiB}
print(json.dumps([
    attempt(h.pwrite, bytes.fromhex({inside.hex()!r}), start + 100),
    attempt(h.pwrite, bytes.fromhex({straddle.hex()!r}), start + 8 * 1024 - 100),
    attempt(h.pwrite, b"x" * 10, 300 * 1024),                 # into a hole
    attempt(h.pwrite, b"d" * 8192, start + 4 * 1024),         # data, then into the hole
    attempt(h.pwrite, b"\\0" * 4096, 200 * 1024),             # zeroes into a hole
    attempt(h.zero, 100 * 1024, 500 * 1024),                  # hole, region 2, hole
    attempt(h.trim, 200 * 1024, 100 * 1024),                  # only a hole
    attempt(h.cache, {SPARSE_SIZE}, 0),
]))
"""
    )
    with trionbd_process(TAR, "file", str(archive)) as server:
        uri = server.uri_for("sp.img")
        out = json.loads(nbdsh(uri, script))
        assert out == ["ok", "ok", "ENOSPC", "ENOSPC", "ok", "ok", "ok", "ok"]
        assert nbd_map(uri) == source_map  # holes stay holes
    patch(content, 64 * KiB + 100, inside)
    patch(content, 64 * KiB + 8 * KiB - 100, straddle)
    patch(content, 512 * KiB, bytes(4 * KiB))
    now = archive.read_bytes()
    assert len(now) == len(original)
    # Nothing outside the stored data changed: headers, sparse maps, padding, end blocks.
    ranges = stored_ranges(archive)
    assert outside(now, ranges) == outside(original, ranges)
    assert now[ranges[1][0] : ranges[1][0] + 3000] == after
    check_extracted(archive, tmp_path, {"sp.img": bytes(content), "after.bin": after})


def test_a_refused_sparse_write_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_sparse(src / "sp.img", SPARSE_SIZE, SPARSE_DATA, 1)
    archive = gnu_tar(tmp_path / "s.tar", src, ["sp.img"], "-S", "--format=gnu")
    original = archive.read_bytes()
    # Region 1 (8 KiB of data), the hole after it, region 2: the hole part is not zero.
    length = 512 * KiB + 100 - 64 * KiB
    script = (
        NBDSH_ERRORS
        + f"""
try:
    h.pwrite(b"Z" * {length}, {64 * KiB})
except nbd.Error as e:
    print(errno.errorcode[e.errnum], e.string)
"""
    )
    with trionbd_process(TAR, "file", str(archive)) as server:
        out = nbdsh(server.uri_for("sp.img"), script)
    assert out.startswith("ENOSPC"), out
    assert archive.read_bytes() == original
