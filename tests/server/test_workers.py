"""Worker processes (``--workers``), with the real command: clients land on different
processes, which the supervisor starts, watches, replaces, stops and reports for; the
counters of all workers are summed; a chain with a layer that is not process-safe stays
in one process. (The reliability tests run in both modes too: tests/reliability.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.raw import RawClient
from tests.support import PYTHON, ROOT, run, short_tmpdir, trionbd_process, wait_until
from trionbd.chain import Plugin
from trionbd.cli import build_chain, parse_args
from trionbd.protocol import Cmd, Opt, Rep, wire
from trionbd.protocol.errors import LocalProtocolError

PID_PLUGIN = "tests.server.test_workers:PidPlugin"
EXIT_TIMEOUT = 30.0


class PidPlugin(Plugin):
    """A 512-byte read-only disk holding the id of the process that reads it."""

    name = "pid"
    process_safe = True

    async def get_size(self, h: Any) -> int:
        return 512

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        return str(os.getpid()).encode().ljust(512)[offset : offset + count]


def read_pid(c: RawClient, cookie: int = 1) -> int:
    """Which process serves the client ``c`` (in transmission on a PidPlugin)."""
    c.send(c.request(cookie, Cmd.READ, 0, 16))
    [reply] = c.reply()
    return int(getattr(reply, "data", b"").strip())


def children(pid: int) -> set[int]:
    """The running child processes of ``pid`` (not those that have exited, unreaped)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        found = {int(child) for child in f.read().split()}
    return {child for child in found if _state(child) not in ("Z", "X", "")}


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return ""


@contextmanager
def clients(path: str, count: int) -> Iterator[list[RawClient]]:
    """``count`` clients in transmission at once, connected one after the other."""
    with ExitStack() as stack:
        out = []
        for _ in range(count):
            c = stack.enter_context(RawClient(path))
            c.go()
            out.append(c)
        yield out


def test_clients_are_spread_over_the_worker_processes() -> None:
    with trionbd_process("--workers=2", PID_PLUGIN) as server:
        workers = children(server.proc.pid)
        assert len(workers) == 2
        with clients(server.socket, 8) as held:
            pids = [read_pid(c) for c in held]
        # Each new client goes to the worker with fewer clients (see Balance): 4 and 4
        # when every worker wakes in time, and never all 8 on one.
        assert set(pids) == workers, pids


def test_the_default_is_one_worker_per_core_when_every_layer_is_process_safe(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    cores = len(os.sched_getaffinity(0))
    with trionbd_process("-v", "--filter=delay", "file", str(disk)) as server:
        assert len(children(server.proc.pid)) == (cores if cores > 1 else 0)
        assert (f"serving from {cores} worker processes" in server.stderr) == (cores > 1)
    with trionbd_process("-v", "--filter=cow", "file", str(disk)) as server:
        assert children(server.proc.pid) == set()
        assert "serving from one process: the cow filter is not process-safe" in server.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("-U", "/nonexistent/sock", "--workers=2", "memory", "1M"),
            "--workers=2: the memory plugin is not process-safe",
        ),
        (
            (
                "-U",
                "/nonexistent/sock",
                "--workers=3",
                "--filter=offset",
                "--filter=cache",
                "null",
                "1M",
            ),
            "--workers=3: the cache filter is not process-safe",
        ),
        (("--workers=2", "-s", "null", "1M"), "--workers=2: -s serves one client"),
        (("--workers=0", "null", "1M"), "bad value for --workers: '0' is less than 1"),
    ],
)
def test_workers_where_they_cannot_apply_exit_2_naming_why(
    args: tuple[str, ...], message: str
) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "trionbd", "-f", *args],
        capture_output=True, text=True, timeout=EXIT_TIMEOUT, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"trionbd: {message}"), line


@pytest.mark.parametrize(
    ("args", "unsafe"),
    [
        (("file", "/d.img"), None),
        (("--filter=ip", "--filter=retry", "--filter=retry-request", "nbd", "socket=/s"), None),
        (("--filter=tar", "--filter=xz", "file", "/d.tar.xz"), None),
        (("--filter=zip", "file", "/d.zip"), None),
        (("--filter=rate", "null", "1M", "connection-rate=1M"), None),
        (("--filter=rate", "null", "1M", "rate=1M"), "the rate filter"),
        (("--filter=offset", "--filter=dirty-bitmap", "file", "/d.img"), "the dirty-bitmap filter"),
        (("--filter=exitlast", "file", "/d.img"), "the exitlast filter"),
        (("--filter=exitwhen", "file", "/d.img"), "the exitwhen filter"),
        (("--filter=gzip", "file", "/d.img.gz"), "the gzip filter"),
        (("--filter=zstd", "file", "/d.img.zst"), "the zstd filter"),
        (("--filter=readahead", "file", "/d.img"), "the readahead filter"),
        (("--filter=shared", "nbd", "socket=/s"), "the shared filter"),
        (("--filter=ip", "memory", "1M"), "the memory plugin"),
    ],
)
def test_which_layers_keep_a_chain_in_one_process(
    args: tuple[str, ...], unsafe: str | None
) -> None:
    """The layers that landed with or after --workers declare whether they are
    process-safe; the first one that is not (client side first) is named."""
    assert build_chain(parse_args(list(args))).not_process_safe() == unsafe


def test_workers_1_serves_from_the_process_itself() -> None:
    with trionbd_process("--workers=1", PID_PLUGIN) as server, RawClient(server.socket) as c:
        c.go()
        assert read_pid(c) == server.proc.pid
        assert children(server.proc.pid) == set()


def test_the_stats_filter_and_server_counters_are_summed_over_the_workers(
    tmp_path: Path,
) -> None:
    stats = tmp_path / "stats.txt"
    args = ("-v", "--workers=2", "--filter=stats", PID_PLUGIN, f"statsfile={stats}")
    with trionbd_process(*args) as server:
        with clients(server.socket, 2) as (a, b):
            assert read_pid(a) != read_pid(b)  # one client per worker
            for cookie in range(2, 5):
                read_pid(b, cookie)
            server.proc.send_signal(signal.SIGUSR1)
            wait_until(lambda: "read: 5 ops" in stats.read_text(), "the interim report")
            counters = "export '': 5 requests (0 failed), 80 bytes read, 0 bytes written"
            wait_until(lambda: counters in server.stderr, "the counters in the log")
            assert f"{counters}, 2 clients connected" in server.stderr
    report = stats.read_text()
    assert report.startswith("trionbd stats, final report")
    assert report.count("trionbd stats") == 1  # one report, written by the supervisor
    assert "read: 5 ops, " in report and 'export "": 5 ops, 80 bytes' in report


def test_a_worker_that_dies_is_replaced_and_the_others_keep_serving() -> None:
    with trionbd_process("-v", "--workers=2", PID_PLUGIN) as server:
        with clients(server.socket, 2) as (a, b):
            victim, survivor = read_pid(a), read_pid(b)
            assert victim != survivor
            os.kill(victim, signal.SIGKILL)
            assert a.eof()  # its client is lost with it ...
            assert read_pid(b, 2) == survivor  # ... the other one is not
            wait_until(lambda: children(server.proc.pid) - {survivor, victim}, "a new worker")
        new = children(server.proc.pid) - {survivor}
        assert victim not in new
        [pid] = new
        wait_until(lambda: f"(pid {pid}) serves" in server.stderr, "the new worker serves")
        # Served by the new worker too (the balance sends clients to the idle ones).
        with clients(server.socket, 4) as held:
            assert {read_pid(c) for c in held} == new | {survivor}
        assert re.search(
            rf"worker \d \(pid {victim}\) was killed by signal 9 \(SIGKILL\); starting another",
            server.stderr,
        ), server.stderr


def test_workers_stop_when_the_supervisor_is_killed() -> None:
    with short_tmpdir() as tmp:
        cmd = [PYTHON, "-m", "trionbd", "-f", "--workers=2", "-U", str(tmp / "sock")]
        proc = subprocess.Popen([*cmd, "-P", str(tmp / "pid"), PID_PLUGIN], cwd=ROOT)
        try:
            wait_until(lambda: (tmp / "pid").exists(), "the pidfile")
            assert int((tmp / "pid").read_text()) == proc.pid  # the supervisor's
            workers = children(proc.pid)
            assert len(workers) == 2
            proc.kill()
            proc.wait(EXIT_TIMEOUT)
            # PR_SET_PDEATHSIG: each worker gets SIGTERM and shuts down.
            wait_until(lambda: not any(Path(f"/proc/{w}").exists() for w in workers), "exit")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_max_connections_counts_the_clients_of_every_worker() -> None:
    with trionbd_process("-v", "--workers=2", "--max-connections=1", PID_PLUGIN) as server:
        with RawClient(server.socket) as first:
            first.go()
            busy = read_pid(first)
            # The next client goes to the idle worker, which refuses it all the same.
            with RawClient(server.socket) as over:
                over.greeting()
                [refused] = over.option(Opt.GO, wire.name_and_infos("", []))
                assert refused.reply == Rep.ERR_POLICY
                assert b"the limit is 1 (--max-connections)" in refused.payload
            log = server.stderr
            index = re.findall(rf"worker (\d) \(pid {busy}\) serves", log)
            [refuser] = re.findall(r"worker (\d): conn \d+: refused: too many clients", log)
            assert index and refuser != index[0], log

        def served() -> bool:  # once the worker has seen the first client go
            with RawClient(server.socket) as c:
                try:
                    c.greeting()
                    return c.option(Opt.GO, wire.name_and_infos("", []))[-1].reply == Rep.ACK
                except (OSError, LocalProtocolError):  # closed at once: still refusing
                    return False

        wait_until(served, "a client is served again")


def test_a_start_up_failure_in_the_workers_is_reported_once(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive" * 1000)
    result = subprocess.run(
        [PYTHON, "-m", "trionbd", "-f", "--workers=2", "-U", str(tmp_path / "sock"),
         "--filter=tar", "file", str(junk)],
        capture_output=True, text=True, timeout=EXIT_TIMEOUT, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("trionbd: tar: ") and str(junk) in line, line


def test_run_starts_the_command_once_and_exits_with_its_status(tmp_path: Path) -> None:
    log = tmp_path / "ran"
    command = f'echo "$uri" >> {log}; nbdinfo --size "$uri"; exit 7'
    result = subprocess.run(
        [PYTHON, "-m", "trionbd", "--workers=2", "--run", command, PID_PLUGIN],
        capture_output=True, text=True, timeout=EXIT_TIMEOUT, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 7, result.stderr
    assert result.stdout == "512\n"
    assert len(log.read_text().splitlines()) == 1


def test_the_background_parent_returns_once_every_worker_serves(tmp_path: Path) -> None:
    sock, pidfile = tmp_path / "sock", tmp_path / "pid"
    # Every descriptor of the caller's stdio is let go (else this run would not return).
    out = run([PYTHON, "-m", "trionbd", "--workers=2", "-U", str(sock), "-P", str(pidfile),
               "--print-uri", PID_PLUGIN], cwd=ROOT)  # fmt: skip
    supervisor = int(pidfile.read_text())
    try:
        assert out.startswith("nbd+unix://")
        workers = children(supervisor)
        assert len(workers) == 2
        with clients(str(sock), 2) as held:
            assert {read_pid(c) for c in held} == workers
    finally:
        os.kill(supervisor, signal.SIGTERM)
        wait_until(lambda: not Path(f"/proc/{supervisor}").exists(), "the server's exit")
    assert not sock.exists() and not pidfile.exists()


def test_ctrl_c_drains_each_worker_once(tmp_path: Path) -> None:
    """^C at a terminal signals the whole foreground process group: only the
    supervisor must see it, or each worker would take it as a second signal and cut
    its requests short."""
    with short_tmpdir() as tmp:
        sock = str(tmp / "sock")
        proc = subprocess.Popen(
            [PYTHON, "-m", "trionbd", "-v", "-f", "--print-uri", "--workers=2", "-U", sock,
             "--filter=delay", PID_PLUGIN, "rdelay=1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline()
            workers = children(proc.pid)
            with RawClient(sock) as c:
                c.go()
                c.send(c.request(1, Cmd.READ, 0, 16))
                time.sleep(0.2)  # the read is in flight (it takes 1 s)
                os.killpg(proc.pid, signal.SIGINT)
                [reply] = c.reply()
                assert int(getattr(reply, "data", b"").strip()) in workers
            _, err = proc.communicate(timeout=EXIT_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert err.count("SIGINT received") == 1, err  # the supervisor's only
