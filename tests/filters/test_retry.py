"""The retry filter: on a failure it reopens the layer below and repeats the request.
The failures come from the error filter (reads fail while a file exists), the reopens
show in the log filter's Connect and Disconnect lines beneath it; each case runs on
trionbd and on nbdkit 1.32 (which has the filter) alike. Waits are checked exactly in
Trio's virtual time."""

from __future__ import annotations

import errno
import itertools
import subprocess
import textwrap
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.support import (
    HANG_GUARD,
    SYSTEM_PYTHON,
    Running,
    nbdkit_process,
    random_file,
    trionbd_process,
    wait_until,
)
from trionbd.chain import Chain, Filter, NBDError, Next
from trionbd.filters.error import ErrorFilter
from trionbd.filters.retry import RetryFilter
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import CmdFlag

Start = Callable[..., AbstractContextManager[Running]]
SERVERS = [trionbd_process, nbdkit_process]

CLIENT = textwrap.dedent(
    """
    import nbd, sys
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    def attempt(what, call, *args):
        try:
            result = call(*args)
            print(what, "ok", "" if result is None else len(result))
        except nbd.Error as e:
            print(what, "errno", e.errno)
    attempt("read", h.pread, 4096, 0)
    if sys.argv[2] == "write":
        attempt("write", h.pwrite, b"x" * 512, 0)
    h.shutdown()
    """
)


def events(log: Path) -> list[str]:
    """What the log filter saw, per line after the time stamp and the connection number
    (which the two log filters count differently): ``Connect`` (its capabilities left
    out), ``Disconnect transactions=N``, ``Read id=1 offset=0x0 count=0x1000 ...``."""
    found = []
    for line in log.read_text().splitlines():
        _, _, rest = line.split(" ", 2)
        if rest.startswith("connection="):
            event = rest.split(" ", 1)[1]
            found.append("Connect" if event.startswith("Connect ") else event)
    return found


@dataclass
class Seen:
    out: list[str]
    """What the client printed."""
    events: list[str]
    """What the log filter beneath saw (see :func:`events`)."""
    failures: int
    """Reads the error filter failed."""


def through_a_failure(
    start: Start, filters: list[str], params: list[str], tmp: Path, recover: bool, then: str = ""
) -> Seen:
    """Serve a file through FILTERS, the error filter failing reads while a switch file
    exists, and the log filter; a client reads 4096 bytes (then, with ``then="write"``,
    writes) while the switch exists; with ``recover`` it is removed once the server has
    logged the first injected error (a retry may still come before that: how many reads
    failed is counted)."""
    disk, switch, log = tmp / "disk.img", tmp / "fail", tmp / "log"
    random_file(disk, 1 << 20)
    switch.touch()
    log.unlink(missing_ok=True)
    args = [*filters, "--filter=error", "--filter=log", "file", str(disk)]
    args += [f"error-file={switch}", "error-pread-rate=100%", f"logfile={log}", *params]
    with start(*args) as server:
        client = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", CLIENT, server.uri, then], stdout=subprocess.PIPE, text=True
        )
        try:
            if recover:
                wait_until(lambda: "injecting EIO error into pread" in server.stderr, "a failure")
                switch.unlink()
            out, _ = client.communicate(timeout=HANG_GUARD)
        finally:
            client.kill()
            client.wait()
        wait_until(lambda: events(log).count("Connect") == _disconnects(log), "all closed")
        failures = server.stderr.count("error: injecting EIO error into pread")
    return Seen(out.splitlines(), events(log), failures)


def _disconnects(log: Path) -> int:
    return sum(e.startswith("Disconnect") for e in events(log))


FAILED_CONTEXT = ["Connect", "Disconnect transactions=0"]
"""A context of the layer below whose one read failed, closed by the retry filter."""
READ = ["Connect", "Read id=1 offset=0x0 count=0x1000 ...", "...Read id=1 return=0"]


@pytest.mark.parametrize("start", SERVERS, ids=["ours", "nbdkit"])
def test_a_temporary_failure_is_survived_by_reopening(start: Start, tmp_path: Path) -> None:
    seen = through_a_failure(start, ["--filter=retry"], ["retry-delay=1"], tmp_path, True)
    assert seen.out == ["read ok 4096"]
    assert seen.failures >= 1
    assert seen.events == FAILED_CONTEXT * seen.failures + READ + ["Disconnect transactions=1"]


@pytest.mark.parametrize("start", SERVERS, ids=["ours", "nbdkit"])
def test_a_lasting_failure_reaches_the_client_after_the_retries(
    start: Start, tmp_path: Path
) -> None:
    params = ["retries=2", "retry-delay=1"]
    seen = through_a_failure(start, ["--filter=retry"], params, tmp_path, False)
    assert seen.out == ["read errno EIO"]
    assert seen.failures == 3 and seen.events == FAILED_CONTEXT * 3  # tried 3 times, each anew


@pytest.mark.parametrize("start", SERVERS, ids=["ours", "nbdkit"])
def test_retry_readonly_refuses_writes_after_a_failure(start: Start, tmp_path: Path) -> None:
    params = ["retry-delay=1", "retry-readonly=true"]
    seen = through_a_failure(start, ["--filter=retry"], params, tmp_path, True, "write")
    assert seen.out == ["read ok 4096", "write errno EPERM"]  # EROFS travels as NBD's EPERM
    assert seen.events == FAILED_CONTEXT * seen.failures + READ + ["Disconnect transactions=1"]


class FailingReads(Filter):
    """Fails every read with EIO, noting when (in Trio's clock)."""

    name = "failing-reads"

    def __init__(self) -> None:
        self.tries: list[float] = []

    async def pread(self, next: Next, h: Any, count: int, offset: int, flags: int) -> bytes:
        self.tries.append(trio.current_time())
        raise NBDError(errno.EIO, "failing-reads: as asked")


@pytest.mark.parametrize(
    ("exponential", "waits"), [(True, [1.5, 3.0, 6.0]), (False, [1.5, 1.5, 1.5])]
)
def test_waits_between_tries(exponential: bool, waits: list[float]) -> None:
    """retry-delay, doubled each time with retry-exponential (virtual time, exact)."""
    failing = FailingReads()
    retry = RetryFilter(retries=3, retry_delay=1.5, retry_exponential=exponential)
    chain = Chain(MemoryPlugin(1 << 20), [retry, failing])

    async def main() -> None:
        ctx = await chain.top.open(False, "")
        try:
            with pytest.raises(NBDError) as failed:
                await ctx.pread(4096, 0)
            assert failed.value.errno == errno.EIO
        finally:
            await ctx.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [b - a for a, b in itertools.pairwise(failing.tries)] == waits


def test_fast_zero_is_not_retried() -> None:
    """A client probing fast zero hears the error at once (a retry would wait 1000 s)."""
    retry = RetryFilter(retry_delay=1000)
    chain = Chain(MemoryPlugin(1 << 20), [retry, ErrorFilter(error_zero_rate=1.0)])

    async def main() -> None:
        ctx = await chain.top.open(False, "")
        try:
            with trio.fail_after(HANG_GUARD), pytest.raises(NBDError) as failed:
                await ctx.zero(4096, 0, CmdFlag.FAST_ZERO)
            assert failed.value.errno == errno.EIO  # injected, and given back at once
        finally:
            await ctx.close()

    trio.run(main)
