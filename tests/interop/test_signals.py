"""Signals, with the real command and real clients: SIGTERM drains in-flight requests
within the grace period and every acknowledged write is in the file; a second signal cuts
the grace short; the grace period ends requests that outlast it; SIGUSR1 and SIGHUP never
kill the server, not even in the last moments of shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import PYTHON, ROOT, SYSTEM_PYTHON, random_file, run, short_tmpdir
from trionbd.plugins.memory import MemoryPlugin

BLOCK = 64 * 1024
EXIT_TIMEOUT = 20.0

WRITER = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
block = int(sys.argv[2])
count = h.get_size() // block
in_flight, next_block = {}, 0
try:
    while next_block < count or in_flight:
        while next_block < count and len(in_flight) < 16:
            data = bytes([next_block % 251 + 1]) * block
            cookie = h.aio_pwrite(data, next_block * block, flags=nbd.CMD_FLAG_FUA)
            in_flight[cookie] = next_block
            next_block += 1
        h.poll(-1)
        for cookie in list(in_flight):
            try:
                if h.aio_command_completed(cookie):
                    print(in_flight.pop(cookie), flush=True)  # acknowledged
            except nbd.Error:
                in_flight.pop(cookie)
except nbd.Error as e:
    print("stopped:", e, file=sys.stderr)
"""
"""Writes every block with FUA, 16 in flight; prints each block the server acknowledged."""

HOLDER = """
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.aio_pwrite(b"x" * 4096, 0)
print("sent", flush=True)
try:
    while True:
        h.poll(-1)
except nbd.Error:
    pass
"""
"""Sends one write and waits for whatever happens to it."""


class SlowUnload(MemoryPlugin):
    """A memory disk whose unload (after the signal receiver closed) takes a while and
    says when it starts, so that a test can send signals into that window."""

    name = "slowunload"

    def unload(self) -> None:
        Path(os.environ["UNLOAD_MARKER"]).touch()
        time.sleep(1.5)


class PlainReport(MemoryPlugin):
    """A memory disk whose ``report`` is a plain ``def`` (run in a worker thread): it
    touches the file named by ``REPORT_MARKER``."""

    name = "plainreport"

    def report(self) -> None:  # type: ignore[override]
        Path(os.environ["REPORT_MARKER"]).touch()


@contextmanager
def server(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A foreground trionbd; yields the process and its URI. The test stops it."""
    with short_tmpdir() as tmp:
        proc = subprocess.Popen(
            [PYTHON, "-m", "trionbd", "-f", "--print-uri", "-U", str(tmp / "sock"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=None if env is None else os.environ | env,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            uri = proc.stdout.readline().strip()
            assert uri, proc.communicate(timeout=EXIT_TIMEOUT)
            yield proc, uri
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_for(marker: Path, proc: subprocess.Popen[str]) -> None:
    """Wait until the server, still running, has created ``marker``."""
    deadline = time.monotonic() + EXIT_TIMEOUT
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)


def stopped(proc: subprocess.Popen[str], since: float) -> tuple[float, str]:
    """Wait for the server to exit cleanly; the seconds it took since ``since``."""
    _, err = proc.communicate(timeout=EXIT_TIMEOUT)
    took = time.monotonic() - since
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    return took, err


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_sigterm_drains_in_flight_writes_and_keeps_every_acknowledged_one(
    tmp_path: Path, workers: int
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 * 1024 * 1024))
    blocks = disk.stat().st_size // BLOCK
    args = (f"--workers={workers}", "--filter=delay", "file", str(disk), "wdelay=200ms")
    with server(*args) as (proc, uri):
        writer = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", WRITER, uri, str(BLOCK)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert writer.stdout is not None
        acked = [int(writer.stdout.readline()) for _ in range(40)]
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rest, _ = writer.communicate(timeout=EXIT_TIMEOUT)
        took, _ = stopped(proc, signalled)
    after_signal = [int(line) for line in rest.split()]
    acked += after_signal
    # Requests in flight at the signal were finished and answered, not dropped ...
    assert after_signal, "no write was acknowledged after SIGTERM"
    # ... but no new ones were read: the stream was cut short.
    assert len(acked) < blocks
    assert took < 5.0, f"took {took:.1f}s, beyond the 5 s grace period"
    data = disk.read_bytes()
    for block in acked:
        assert data[block * BLOCK : (block + 1) * BLOCK] == bytes([block % 251 + 1]) * BLOCK, block


def test_sigterm_during_nbdcopy_exits_within_the_grace_period(tmp_path: Path) -> None:
    random_file(tmp_path / "src.img", 64 * 1024 * 1024)
    # 256 requests of 256 KiB, 4 at a time, each taking 0.5 s: about 32 s to copy.
    with server("--filter=delay", "memory", "64M", "wdelay=500ms") as (proc, uri):
        copy = subprocess.Popen(
            ["nbdcopy", "--connections=1", "--requests=4", str(tmp_path / "src.img"), uri],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)
        assert copy.poll() is None, "nbdcopy finished before the signal"
        proc.send_signal(signal.SIGTERM)
        took, _ = stopped(proc, time.monotonic())
        copy.communicate(timeout=EXIT_TIMEOUT)
    assert took < 5.0, f"took {took:.1f}s, beyond the 5 s grace period"
    assert copy.returncode != 0  # the server went away mid-copy


def hold_a_write(uri: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen([SYSTEM_PYTHON, "-c", HOLDER, uri], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "sent\n"
    time.sleep(0.5)  # let the server read it
    return holder


def test_the_grace_period_ends_requests_that_outlast_it() -> None:
    args = ("--shutdown-timeout=1", "--filter=delay", "memory", "1M", "wdelay=60")
    with server(*args) as (proc, uri):
        holder = hold_a_write(uri)
        proc.send_signal(signal.SIGTERM)
        took, _ = stopped(proc, time.monotonic())
        holder.wait(EXIT_TIMEOUT)
    assert 1.0 <= took < 10.0


def test_a_second_signal_cuts_the_grace_period_short() -> None:
    args = ("--shutdown-timeout=60", "--filter=delay", "memory", "1M", "wdelay=60")
    with server(*args) as (proc, uri):
        holder = hold_a_write(uri)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None, "the first signal did not wait for the request"
        proc.send_signal(signal.SIGINT)
        took, _ = stopped(proc, time.monotonic())
        holder.wait(EXIT_TIMEOUT)
    assert took < 10.0


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_each_stop_signal_shuts_down_cleanly(stop: signal.Signals) -> None:
    with server("memory", "1M") as (proc, uri):
        assert run(["nbdinfo", "--size", uri]).strip() == "1048576"
        proc.send_signal(stop)
        stopped(proc, time.monotonic())


def test_sighup_and_sigusr1_while_serving_are_harmless() -> None:
    with server("memory", "1M") as (proc, uri):
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGHUP):
            proc.send_signal(sig)
            time.sleep(0.2)
            assert proc.poll() is None, f"{sig.name} stopped the server"
        assert run(["nbdinfo", "--size", uri]).strip() == "1048576"
        proc.send_signal(signal.SIGTERM)
        stopped(proc, time.monotonic())


def test_sigusr1_reports_through_a_plain_def_report(tmp_path: Path) -> None:
    marker = tmp_path / "reported"
    plugin = "tests.interop.test_signals:PlainReport"
    with server(plugin, "1M", env={"REPORT_MARKER": str(marker)}) as (proc, _):
        proc.send_signal(signal.SIGUSR1)
        wait_for(marker, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = stopped(proc, time.monotonic())
    assert "report failed" not in err, err


def test_sigusr1_after_the_signal_receiver_closed_does_not_kill(tmp_path: Path) -> None:
    marker = tmp_path / "unloading"
    plugin = "tests.interop.test_signals:SlowUnload"
    with server(plugin, "1M", env={"UNLOAD_MARKER": str(marker)}) as (proc, _):
        proc.send_signal(signal.SIGTERM)
        wait_for(marker, proc)
        # Trio is gone; the plugin is unloading. Neither signal may kill the process.
        for sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR1):
            proc.send_signal(sig)
        stopped(proc, time.monotonic())
