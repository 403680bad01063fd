"""A refused client learns why, and so does whoever runs the server.

The real ``trionbd`` command at its default verbosity, a real client (nbdinfo) asking
for an export that cannot be opened: an unknown tar member, partition 3 of a disk with
two, a directory in an ext2 image. The reason is on the server's stderr (once, though
nbdinfo asks twice), and it is the message of the option's error reply. A client that
fails request after request is logged at most ``WARNINGS_PER_CONNECTION`` times, then
counted.
"""

from __future__ import annotations

import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import trio

from tests.formats.test_ext2 import mkfs
from tests.support import Running, run, trionbd_process, wait_until
from trionbd import client as nbd
from trionbd.server.connection import WARNINGS_PER_CONNECTION

MiB = 1 << 20


def refused(server: Running, export: str) -> str:
    """Ask nbdinfo for ``export`` (it must fail) and return the message of the server's
    error reply to GO, read with trionbd's client."""
    result = subprocess.run(
        ["nbdinfo", server.uri_for(export)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "nbd_opt_go" in result.stderr, result

    async def message() -> str:
        address = nbd.Address(unix_path=server.socket)
        async with await nbd.handshake(await nbd.open_stream(address)) as h:
            with pytest.raises(nbd.OptionError) as e:
                await h.go(export)
        return e.value.server_message

    return trio.run(message)


def warnings_of(server: Running) -> list[str]:
    return [line for line in server.stderr.splitlines() if line.startswith("trionbd: conn ")]


def test_an_unknown_tar_member(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello\n")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(tmp_path / "a.txt", "a.txt")
    # One process (--workers=1): the connections are numbered 1, 2 in one log.
    with trionbd_process("--workers=1", "file", str(tmp_path / "a.tar"), "--filter=tar") as server:
        message = refused(server, "nosuch")
        assert "no member named 'nosuch'" in message
        lines = warnings_of(server)
    # nbdinfo asked (INFO, then GO) once, trionbd's client once more: one line each.
    assert lines == [f"trionbd: conn {n}: opening export 'nosuch': {message}" for n in (1, 2)]


def test_partition_3_of_two(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    with open(disk, "r+b") as f:
        f.truncate(8 * MiB)
    run(["sfdisk", "-q", str(disk)], input="label: gpt\nsize=2048\nsize=2048\n")
    args = ("--workers=1", "--filter=partition", "file", str(disk), "partition=3")
    with trionbd_process(*args) as server:
        message = refused(server, "")
        assert "partition 3 not found (table has: 1, 2)" in message
        assert f"trionbd: conn 1: opening export '': {message}" in server.stderr


def test_a_directory_in_an_ext2_image(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "file").write_text("x")
    image = mkfs(tmp_path / "fs.img", src, "ext2", 1024, size="4M")
    with trionbd_process("--workers=1", "file", str(image), "--filter=ext2") as server:
        message = refused(server, "dir")
        assert re.search(r"\bdir\b.*director", message), message
        assert f"trionbd: conn 1: opening export 'dir': {message}" in server.stderr


def test_failed_requests_are_logged_up_to_the_limit_then_counted(tmp_path: Path) -> None:
    """The error filter fails every read: each of nbdinfo's, then a client's many."""
    args = ("--filter=error", "memory", "1M", "error-pread=EIO", "error-pread-rate=1")
    reads = WARNINGS_PER_CONNECTION + 5

    async def read_many(server: Running) -> None:
        async with await nbd.connect_unix(server.socket) as c:
            for i in range(reads):
                with pytest.raises(nbd.RequestError):
                    await c.pread(512, 512 * i)

    with trionbd_process(*args) as server:
        trio.run(read_many, server)
        # The count is logged once the server has seen the client go.
        wait_until(lambda: "not logged" in server.stderr, "the server logged the count")
        lines = warnings_of(server)
    assert len(lines) == WARNINGS_PER_CONNECTION + 1, lines
    assert lines[0] == (
        "trionbd: conn 1: READ of 512 bytes at offset 0 failed: "
        "error filter: injecting EIO error into pread"
    )
    assert lines[-1] == (
        f"trionbd: conn 1: 5 more failures not logged (the first {WARNINGS_PER_CONNECTION} were)"
    )
