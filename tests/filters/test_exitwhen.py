"""The exitwhen filter: each kind of event ends an idle server (status 0); with clients
connected the server refuses new ones, serves those it has until they leave, then
exits; an event that occurred before start-up ends the server at once. Each case runs
on trionbd and on nbdkit 1.32 (which has the filter) alike."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.filters.parity import holding
from tests.support import (
    HANG_GUARD,
    PYTHON,
    ROOT,
    Running,
    nbdkit_process,
    run,
    short_tmpdir,
    trionbd_exit,
    trionbd_process,
    wait_until,
)

Start = Callable[..., AbstractContextManager[Running]]
SERVERS = pytest.mark.parametrize(
    "start", [trionbd_process, nbdkit_process], ids=["ours", "nbdkit"]
)
POLL = "exit-when-poll=1"
"""Checks every second while idle (nbdkit takes whole seconds only)."""


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


def serves(server: Running) -> bool:
    try:
        return run(["nbdinfo", "--size", server.uri]).strip() == "1048576"
    except AssertionError:
        return False


def exits_by_itself(server: Running) -> None:
    assert server.proc.wait(HANG_GUARD) == 0
    assert not serves(server)


@SERVERS
def test_file_created(start: Start, tmp: Path) -> None:
    stop = tmp / "stop"
    with start("--filter=exitwhen", "memory", "1M", f"exit-when-file-created={stop}", POLL) as s:
        assert serves(s)
        stop.touch()
        exits_by_itself(s)


@SERVERS
def test_file_deleted(start: Start, tmp: Path) -> None:
    keep = tmp / "keep"
    keep.touch()
    with start("--filter=exitwhen", "memory", "1M", f"exit-when-file-deleted={keep}", POLL) as s:
        assert serves(s)
        keep.unlink()
        exits_by_itself(s)


@SERVERS
def test_script(start: Start, tmp: Path) -> None:
    flag = tmp / "flag"
    script = f"if test -e {flag}; then exit 88; fi; exit 0"
    with start("--filter=exitwhen", "memory", "1M", f"exit-when-script={script}", POLL) as s:
        assert serves(s)
        flag.touch()
        exits_by_itself(s)


@SERVERS
def test_process_exits(start: Start) -> None:
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        pid = f"exit-when-process-exits={sleeper.pid}"
        with start("--filter=exitwhen", "memory", "1M", pid, POLL) as s:
            assert serves(s)
            sleeper.kill()
            sleeper.wait()  # a zombie still counts as running: reap it
            exits_by_itself(s)
    finally:
        sleeper.kill()
        sleeper.wait()


@SERVERS
def test_pipe_closed(start: Start) -> None:
    read_end, write_end = os.pipe()
    try:
        pipe = f"exit-when-pipe-closed={read_end}"
        with start("--filter=exitwhen", "memory", "1M", pipe, POLL, pass_fds=[read_end]) as s:
            assert serves(s)
            os.close(write_end)
            write_end = -1
            exits_by_itself(s)
    finally:
        os.close(read_end)
        if write_end != -1:
            os.close(write_end)


@SERVERS
def test_connected_clients_are_served_until_they_leave(start: Start, tmp: Path) -> None:
    stop = tmp / "stop"
    with start("--filter=exitwhen", "memory", "1M", f"exit-when-file-created={stop}", POLL) as s:
        with holding(s.uri) as client:
            stop.touch()
            wait_until(lambda: not serves(s), "new clients are refused")
            assert s.proc.poll() is None
            assert client.release() == "4096"  # the connected client is still served
        exits_by_itself(s)


@pytest.mark.parametrize("server", ["trionbd", "nbdkit"])
def test_an_event_before_start_up_ends_the_server_at_once(server: str, tmp: Path) -> None:
    stop = tmp / "stop"
    stop.touch()
    command = [PYTHON, "-m", "trionbd"] if server == "trionbd" else ["nbdkit"]
    args = ["-f", "-U", str(tmp / "sock"), "--filter=exitwhen", "memory", "1M"]
    result = subprocess.run(
        [*command, *args, f"exit-when-file-created={stop}"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("param", "message"),
    [
        (
            "exit-when-pipe-closed=97",
            "exitwhen: exit-when-pipe-closed=97: descriptor 97 is not open",
        ),
        (
            "exit-when-process-exits=0",
            "bad value for exit-when-process-exits=0: '0' is not a process",
        ),
        ("exit-when-poll=0", "bad value for exit-when-poll=0: '0' is not a number of seconds"),
    ],
)
def test_bad_parameters_exit_2(param: str, message: str) -> None:
    result = trionbd_exit("--filter=exitwhen", "memory", "1M", param)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_process_that_does_not_exist_exits_2() -> None:
    pid = next(n for n in range(400000, 1 << 22) if not os.path.exists(f"/proc/{n}"))
    result = trionbd_exit("--filter=exitwhen", "memory", "1M", f"exit-when-process-exits={pid}")
    assert result.returncode == 2
    assert f"exit-when-process-exits={pid}: no such process" in result.stderr
