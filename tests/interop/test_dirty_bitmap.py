"""The dirty-bitmap filter read the way backup tools read it: qemu-img map with
``x-dirty-bitmap`` (qemu 7.2 and 10) and libnbd's block status of the context, after
writes by qemu-io and nbdcopy; its state file across restarts and crashes of the real
command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import (
    PYTHON,
    ROOT,
    START_TIMEOUT,
    Running,
    nbdsh,
    qemu10,
    read_line,
    run,
    sparse_file,
    trionbd_exit,
    trionbd_process,
)

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB
SIZE = 16 * MiB


def qemu_map(tool: str, server: Running, bitmap: str, export: str = "") -> list[tuple[int, int]]:
    """The dirty ranges as qemu-img map shows them with x-dirty-bitmap: qemu reads the
    context through base:allocation's meaning, so dirty blocks come out as not data."""
    opts = (
        f"driver=nbd,server.type=unix,server.path={server.socket},export={export},"
        f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
    )
    out = run([tool, "map", "--output=json", "--image-opts", opts])
    return [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]


BLOCK_STATUS = """
import nbd, sys
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:{bitmap}")
h.set_export_name({export!r})
h.connect_uri({uri!r})
assert h.can_meta_context("qemu:dirty-bitmap:{bitmap}")
dirty, pos, size = [], 0, h.get_size()
def extents(ctx, offset, entries, err):
    global pos
    assert ctx == "qemu:dirty-bitmap:{bitmap}", ctx
    for length, flags in zip(entries[::2], entries[1::2]):
        if flags & 1:
            if dirty and dirty[-1][0] + dirty[-1][1] == pos:
                dirty[-1][1] += length
            else:
                dirty.append([pos, length])
        pos += length
while pos < size:
    h.block_status(size - pos, pos, extents)
print(dirty)
"""


def libnbd_dirty(server: Running, bitmap: str, export: str = "") -> list[tuple[int, int]]:
    """The dirty ranges through libnbd 1.14's block status of the context."""
    script = BLOCK_STATUS.format(bitmap=bitmap, export=export, uri=server.uri)
    out = run(["/usr/bin/python3", "-c", script])
    return [tuple(r) for r in json.loads(out)]  # type: ignore[misc]


def everyone_sees(
    server: Running, expected: list[tuple[int, int]], bitmap: str = "default"
) -> None:
    for tool in ("qemu-img", qemu10("qemu-img")):
        assert qemu_map(tool, server, bitmap) == expected, tool
    assert libnbd_dirty(server, bitmap) == expected


def test_writes_by_qemu_io_show_in_qemu_img_map_and_libnbd() -> None:
    with trionbd_process("--filter=dirty-bitmap", "memory", str(SIZE)) as server:
        everyone_sees(server, [])
        run(["qemu-io", "-f", "raw", "-c", "write -P 1 100k 8k", "-c", "write -z 1M 200k",
             "-c", "discard 8M 64k", server.uri])  # fmt: skip
        # Whole blocks of 64 KiB: 100k..108k is in the block at 64k; the zero covers
        # 1M..1M+200k, four blocks; the discard one.
        everyone_sees(server, [(G, G), (MiB, 4 * G), (8 * MiB, G)])
        # qemu 10 writes through extended headers; the bitmap takes them the same.
        run([qemu10("qemu-io"), "-f", "raw", "-c", "write -P 2 15M 1", server.uri])
        everyone_sees(server, [(G, G), (MiB, 4 * G), (8 * MiB, G), (15 * MiB, G)])


def test_writes_by_nbdcopy_show_at_a_finer_granularity(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    runs = [(0, 3 * KiB), (5 * MiB + 512, 10 * KiB), (SIZE - 4 * KiB, 4 * KiB)]
    data = sparse_file(source, SIZE, runs)
    with trionbd_process(
        "--filter=dirty-bitmap", "memory", str(SIZE), "granularity=4K", "bitmap=backup"
    ) as server:
        # The destination is known to be zero: nbdcopy writes the data runs only.
        run(["nbdcopy", "--destination-is-zero", str(source), server.uri])
        expected = [(0, 4 * KiB), (5 * MiB, 12 * KiB), (SIZE - 4 * KiB, 4 * KiB)]
        everyone_sees(server, expected, bitmap="backup")
        run(["nbdcopy", server.uri, str(tmp_path / "back.img")])
    assert (tmp_path / "back.img").read_bytes() == data


def test_each_export_has_its_own_bitmap(tmp_path: Path) -> None:
    for name in ("a.img", "b.img"):
        (tmp_path / name).write_bytes(bytes(MiB))
    with trionbd_process("--filter=dirty-bitmap", "file", f"dir={tmp_path}") as server:
        run(["qemu-io", "-f", "raw", "-c", "write 0 1", server.uri_for("b.img")])
        listed = run(["nbdinfo", "--list", "--json", server.uri])
        contexts = {e["export-name"]: e["contexts"] for e in json.loads(listed)["exports"]}
        assert contexts == {
            "a.img": ["base:allocation", "qemu:dirty-bitmap:a.img"],
            "b.img": ["base:allocation", "qemu:dirty-bitmap:b.img"],
        }
        assert qemu_map("qemu-img", server, "a.img", "a.img") == []
        assert qemu_map("qemu-img", server, "b.img", "b.img") == [(0, G)]


# --- the state file ------------------------------------------------------------------------


def test_state_survives_a_restart_and_reset_starts_clean(tmp_path: Path) -> None:
    state = tmp_path / "disk.bitmap"
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(SIZE))
    args = ("--filter=dirty-bitmap", "file", str(disk), f"state={state}")
    with trionbd_process(*args) as server:
        run(["qemu-io", "-f", "raw", "-c", "write -P 7 3M 1k", server.uri])
    with trionbd_process(*args) as server:  # SIGTERM before: unloaded cleanly
        everyone_sees(server, [(3 * MiB, G)])
        assert "in use" not in server.stderr
    with trionbd_process(*args, "reset=true") as server:
        everyone_sees(server, [])


def test_a_crash_keeps_what_was_flushed_and_says_so(tmp_path: Path) -> None:
    """SIGKILL after a FUA write and a flushed write: both are in the file; a write
    that was never flushed may not be, and the restart warns."""
    state = tmp_path / "disk.bitmap"
    args = ["--filter=dirty-bitmap", "memory", str(SIZE), f"state={state}"]
    sock = str(tmp_path / "sock")
    proc = subprocess.Popen(
        [PYTHON, "-m", "trionbd", "-f", "--print-uri", "-U", sock, *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        uri = read_line(proc, START_TIMEOUT).strip()
        assert uri, "trionbd did not start"
        nbdsh(
            uri,
            "import nbd\n"
            "h.pwrite(b'x', 1048576, nbd.CMD_FLAG_FUA)\n"  # persisted before the reply
            "h.pwrite(b'y', 2097152)\n"
            "h.flush()\n"  # persisted before the reply
            "h.pwrite(b'z', 4194304)\n",  # not flushed
        )
    finally:
        proc.kill()  # the crash
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    with trionbd_process(*args) as server:
        dirty = libnbd_dirty(server, "default")
        assert dirty[:2] == [(MiB, G), (2 * MiB, G)]
        assert dirty[2:] in ([], [(4 * MiB, G)])
        assert "was in use when the server stopped" in server.stderr


@pytest.mark.parametrize("bad", ["granularity=4K", "granularity=300"])
def test_a_state_file_of_another_granularity_or_a_bad_one_stops_the_start(
    tmp_path: Path, bad: str
) -> None:
    state = tmp_path / "disk.bitmap"
    with trionbd_process("--filter=dirty-bitmap", "memory", "1M", f"state={state}"):
        pass
    result = trionbd_exit("--filter=dirty-bitmap", "memory", "1M", f"state={state}", bad)
    if bad == "granularity=300":
        assert result.returncode == 2 and "power of two from 512" in result.stderr
    else:
        assert result.returncode == 1
        assert f"{state}: written with granularity=65536, not 4096" in result.stderr


def test_a_filter_above_the_bitmap_does_not_pass_it_up() -> None:
    """The offset filter moves the data: a bitmap below it would describe the wrong
    bytes, so clients are not offered it."""
    with trionbd_process(
        "--filter=offset", "--filter=dirty-bitmap", "memory", str(SIZE), "offset=1M"
    ) as server:
        info = json.loads(run(["nbdinfo", "--json", server.uri]))
    assert info["exports"][0]["contexts"] == ["base:allocation"]
