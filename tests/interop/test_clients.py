"""Real clients against the real ``trionbd`` command: nbdinfo, nbdcopy, qemu-img, qemu-io,
nbdsh (libnbd). Every byte served or written is compared with its source.

One server (``file dir=DIR``) serves the whole module; each test puts its own image in
DIR and uses its own export name.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    Running,
    nbdsh,
    random_file,
    run,
    seek_map,
    short_tmpdir,
    trionbd_process,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def images() -> Iterator[tuple[Path, Running]]:
    with short_tmpdir() as tmp, trionbd_process("file", f"dir={tmp}") as server:
        yield tmp, server


def sparse_image(path: Path, tail: int = 1000) -> bytes:
    """An 8 MiB image of data and holes, plus ``tail`` bytes of data (qemu rounds sizes
    up to 512 bytes: give it tail=0)."""
    with open(path, "wb") as f:
        f.truncate(8 * MiB + tail)
        for offset, size in [(0, 4096), (MiB, 300 * 1024), (5 * MiB - 512, 8192), (8 * MiB, tail)]:
            f.seek(offset)
            f.write(os.urandom(size))
    return path.read_bytes()


# --- nbdinfo ---------------------------------------------------------------------------------


def test_nbdinfo_plain_and_json(images: tuple[Path, Running]) -> None:
    tmp, server = images
    random_file(tmp / "info.img", 3 * MiB + 512)
    uri = server.uri_for("info.img")
    text = run(["nbdinfo", uri])
    assert "export-size: 3146240" in text
    info = json.loads(run(["nbdinfo", "--json", uri]))
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    [export] = info["exports"]
    assert export["export-name"] == "info.img"
    assert export["export-size"] == 3 * MiB + 512
    assert export["description"] == "regular file, 3146240 bytes"
    assert export["contexts"] == ["base:allocation"]
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MiB
    expected = {
        "is_read_only": False, "is_rotational": False, "can_cache": True, "can_df": True,
        "can_fast_zero": True, "can_flush": True, "can_fua": True, "can_multi_conn": True,
        "can_trim": True, "can_zero": True,
    }  # fmt: skip
    assert {k: export[k] for k in expected} == expected


def test_nbdinfo_list(images: tuple[Path, Running]) -> None:
    tmp, server = images
    for name in ("list-a.img", "list-b.img"):
        random_file(tmp / name, 65536)
    listing = json.loads(run(["nbdinfo", "--list", "--json", server.uri]))
    names = [e["export-name"] for e in listing["exports"]]
    assert names == sorted(p.name for p in tmp.iterdir() if p.is_file())
    assert {"list-a.img", "list-b.img"} <= set(names)
    text = run(["nbdinfo", "--list", server.uri])
    assert 'export="list-a.img"' in text and "description: regular file, 65536 bytes" in text


def test_nbdinfo_map_of_a_sparse_file_matches_seek_hole(images: tuple[Path, Running]) -> None:
    tmp, server = images
    sparse_image(tmp / "map.img")
    expected = seek_map(tmp / "map.img")
    assert any(t == 3 for _, _, t in expected) and any(t == 0 for _, _, t in expected)
    got = json.loads(run(["nbdinfo", "--map", "--json", server.uri_for("map.img")]))
    assert [(e["offset"], e["length"], e["type"]) for e in got] == expected
    text = run(["nbdinfo", "--map", server.uri_for("map.img")])
    assert len(text.splitlines()) == len(expected)
    assert "hole,zero" in text and "data" in text


# --- nbdcopy -----------------------------------------------------------------------------------


def test_nbdcopy_both_directions(images: tuple[Path, Running], tmp_path: Path) -> None:
    tmp, server = images
    data = sparse_image(tmp_path / "source.img")
    random_file(tmp / "copy-target.img", len(data), seed=9)  # garbage to overwrite
    run(["nbdcopy", str(tmp_path / "source.img"), server.uri_for("copy-target.img")])
    assert (tmp / "copy-target.img").read_bytes() == data
    run(["nbdcopy", server.uri_for("copy-target.img"), str(tmp_path / "back.img")])
    assert (tmp_path / "back.img").read_bytes() == data
    run(["nbdcopy", "--flush", "--request-size=65536", "--connections=4",
         str(tmp_path / "source.img"), server.uri_for("copy-target.img")])  # fmt: skip
    assert (tmp / "copy-target.img").read_bytes() == data


def test_nbdcopy_keeps_holes(images: tuple[Path, Running], tmp_path: Path) -> None:
    """nbdcopy zeroes (may-trim) the holes of the source: the target is sparse again."""
    tmp, server = images
    data = sparse_image(tmp_path / "source.img")
    random_file(tmp / "sparse-target.img", len(data))
    run(["nbdcopy", str(tmp_path / "source.img"), server.uri_for("sparse-target.img")])
    assert (tmp / "sparse-target.img").read_bytes() == data
    target_blocks = os.stat(tmp / "sparse-target.img").st_blocks
    assert target_blocks * 512 < len(data) // 2


# --- qemu --------------------------------------------------------------------------------------


def test_qemu_img_info(images: tuple[Path, Running]) -> None:
    tmp, server = images
    random_file(tmp / "qinfo.img", 5 * MiB)
    info = json.loads(run(["qemu-img", "info", "--output=json", server.uri_for("qinfo.img")]))
    assert info["virtual-size"] == 5 * MiB
    assert info["format"] == "raw"


def test_qemu_img_convert_both_directions(images: tuple[Path, Running], tmp_path: Path) -> None:
    tmp, server = images
    data = sparse_image(tmp_path / "source.img", tail=0)
    random_file(tmp / "convert.img", len(data), seed=3)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(tmp_path / "source.img"),
         server.uri_for("convert.img")])  # fmt: skip
    assert (tmp / "convert.img").read_bytes() == data
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", server.uri_for("convert.img"),
         str(tmp_path / "out.qcow2")])  # fmt: skip
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(tmp_path / "out.qcow2"),
         str(tmp_path / "out.raw")])  # fmt: skip
    assert (tmp_path / "out.raw").read_bytes() == data
    # qemu used block status (REQ_ONE) on our export: the holes did not become qcow2 data.
    qmap = json.loads(
        run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(tmp_path / "out.qcow2")])
    )
    allocated = sum(e["length"] for e in qmap if e["data"])
    assert allocated < 2 * MiB
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "source.img"),
         server.uri_for("convert.img")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_qemu_io_patterns(images: tuple[Path, Running]) -> None:
    tmp, server = images
    random_file(tmp / "qio.img", 2 * MiB)
    commands = [
        "write -P 0xab 0 64k",
        "write -P 0xcd -f 64k 64k",  # FUA
        "read -P 0xab 0 64k",
        "read -P 0xcd 64k 64k",
        "discard 64k 32k",
        "read -P 0 64k 32k",
        "write -z 1M 128k",
        "read -P 0 1M 128k",
        "write -z -u 1536k 4k",
        "read -P 0 1536k 4k",
        "write -z -n 1792k 4k",  # fast zero: no slow fallback allowed
        "read -P 0 1792k 4k",
        "flush",
    ]
    out = run(
        ["qemu-io", "-f", "raw", *[a for c in commands for a in ("-c", c)],
         server.uri_for("qio.img")]
    )  # fmt: skip
    assert "verification failed" not in out.lower() and "error" not in out.lower()
    assert out.count("wrote") == 5 and out.count("read ") == 6
    data = (tmp / "qio.img").read_bytes()
    assert data[: 64 * 1024] == b"\xab" * 65536
    assert data[64 * 1024 : 96 * 1024] == bytes(32 * 1024)
    assert data[96 * 1024 : 128 * 1024] == b"\xcd" * 32 * 1024
    assert data[MiB : MiB + 128 * 1024] == bytes(128 * 1024)
    assert data[1536 * 1024 : 1540 * 1024] == bytes(4096)
    assert data[1792 * 1024 : 1796 * 1024] == bytes(4096)


def test_qemu_io_pattern_mismatch_is_noticed(images: tuple[Path, Running]) -> None:
    """The check above can fail: a wrong pattern is reported."""
    tmp, server = images
    (tmp / "qio-bad.img").write_bytes(b"\x01" * 65536)
    result = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read -P 0x02 0 4k", server.uri_for("qio-bad.img")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "verification failed" in (result.stdout + result.stderr).lower()


# --- nbdsh (libnbd) ------------------------------------------------------------------------------


def test_structured_read_chunks(images: tuple[Path, Running]) -> None:
    tmp, server = images
    sparse_image(tmp / "chunks.img")
    script = f"""
import nbd
data = open({str(tmp / "chunks.img")!r}, "rb").read()
for offset, count in [(0, 2 << 20), (1 << 20, 4096), (3 << 20, 65536), (8 << 20, 1000)]:
    chunks = []
    def chunk(buf, off, status, err):
        chunks.append((off, len(buf), status))
        assert buf == data[off:off + len(buf)]
        return 0
    buf = h.pread_structured(count, offset, chunk)
    assert buf == data[offset:offset + count]
    chunks.sort()
    pos = offset
    for off, n, status in chunks:
        assert off == pos and status in (nbd.READ_DATA, nbd.READ_HOLE), chunks
        pos += n
    assert pos == offset + count
    print(offset, len(chunks), sorted({{s for _, _, s in chunks}}))
"""
    out = nbdsh(server.uri_for("chunks.img"), script).splitlines()
    # The file plugin sends one OFFSET_DATA chunk per read (holes are zeroes in it).
    assert out == [f"{o} 1 [1]" for o in (0, MiB, 3 * MiB, 8 * MiB)]


def test_structured_read_with_holes_from_memory() -> None:
    with trionbd_process("memory", "4M") as server:
        script = """
import nbd
h.pwrite(b"x" * 100, 40000)
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, len(buf), status, bytes(buf).count(0)))
    return 0
buf = h.pread_structured(131072, 0, chunk)
assert buf == bytes(40000) + b"x" * 100 + bytes(131072 - 40100)
for c in sorted(chunks):
    print(*c)
"""
        out = nbdsh(server.uri, script).splitlines()
    assert out == ["0 32768 2 32768", "32768 32768 1 32668", "65536 65536 2 65536"]


def test_block_status_of_a_sparse_file(images: tuple[Path, Running]) -> None:
    tmp, server = images
    sparse_image(tmp / "bs.img")
    script = """
size = h.get_size()
pos = 0
runs = []
def extent(ctx, offset, entries, err):
    assert ctx == "base:allocation"
    global pos
    for length, flags in zip(entries[::2], entries[1::2]):
        if runs and runs[-1][2] == flags:
            runs[-1][1] += length
        else:
            runs.append([pos, length, flags])
        pos += length
while pos < size:
    h.block_status(size - pos, pos, extent)
print(runs)
"""
    out = nbdsh(server.uri_for("bs.img"), script, "--base-allocation")
    assert [tuple(r) for r in eval(out)] == seek_map(tmp / "bs.img")


def test_fua_flush_cache_and_fast_zero(images: tuple[Path, Running]) -> None:
    tmp, server = images
    data = random_file(tmp / "cmds.img", MiB)
    script = """
import nbd
assert h.can_fua() and h.can_flush() and h.can_cache() and h.can_fast_zero()
h.pwrite(b"fua!" * 1024, 8192, nbd.CMD_FLAG_FUA)
h.flush()
h.cache(65536, 0)
h.zero(65536, 131072, nbd.CMD_FLAG_FAST_ZERO)
h.zero(65536, 262144, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
h.trim(65536, 393216, nbd.CMD_FLAG_FUA)
print("done")
"""
    assert nbdsh(server.uri_for("cmds.img"), script).strip() == "done"
    expected = bytearray(data)
    expected[8192 : 8192 + 4096] = b"fua!" * 1024
    for offset in (131072, 262144, 393216):
        expected[offset : offset + 65536] = bytes(65536)
    assert (tmp / "cmds.img").read_bytes() == expected


def test_read_only_server_refuses_writes_with_eperm(tmp_path: Path) -> None:
    data = random_file(tmp_path / "disk.img", MiB)
    script = """
import nbd
h.set_strict_mode(0)  # send the commands even though the export is read-only
assert h.is_read_only()
for name, call in [("pwrite", lambda: h.pwrite(b"x" * 512, 0)),
                   ("pwrite-fua", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA)),
                   ("trim", lambda: h.trim(512, 0)),
                   ("zero", lambda: h.zero(512, 0))]:
    try:
        call()
        print(name, "succeeded")
    except nbd.Error as e:
        print(name, e.errno)
print(h.pread(16, 0).hex())
"""
    with trionbd_process("-r", "file", str(tmp_path / "disk.img")) as server:
        out = nbdsh(server.uri, script).split()
    assert out == [
        "pwrite", "EPERM", "pwrite-fua", "EPERM", "trim", "EPERM", "zero", "EPERM",
        data[:16].hex(),
    ]  # fmt: skip
    assert (tmp_path / "disk.img").read_bytes() == data
