"""Helpers shared by the tests: run the real ``trionbd`` command, real clients, files."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio

from trionbd.chain import Chain, Plugin
from trionbd.server import Server, ServerConfig, open_unix_listener, serve

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SYSTEM_PYTHON = "/usr/bin/python3"
"""Debian's Python: the only one where ``import nbd`` (python3-libnbd) and nbdsh work."""
START_TIMEOUT = 30.0
HANG_GUARD = 60
"""Seconds a test waits for what should come promptly (``trio.fail_after``, a thread's
``Event.wait``): a hang fails the test instead of blocking the suite."""


def have(program: str) -> bool:
    return shutil.which(program) is not None


QEMU10 = ROOT / ".tools" / "qemu10" / "usr" / "bin"
"""qemu 10 (extended headers), unpacked by ``scripts/setup --test`` beside the system's
qemu 7.2 (which the plain names ``qemu-img``, ``qemu-io`` and ``qemu-nbd`` run)."""


def qemu10(tool: str) -> str:
    """The path of qemu 10's ``tool`` (``qemu-img``, ``qemu-io``, ``qemu-nbd``). A test
    that needs it fails, never skips, when it is missing: setup provides it."""
    path = QEMU10 / tool
    if not os.access(path, os.X_OK):
        raise AssertionError(f"qemu 10's {tool} is not at {path}: run scripts/setup --test")
    return str(path)


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A short directory under /tmp (Unix socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tnbd", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Running:
    """A ``trionbd`` process started by :func:`trionbd_process`."""

    proc: subprocess.Popen[str]
    uri: str
    socket: str
    stderr_path: Path

    def uri_for(self, export: str) -> str:
        """The URI of a named export on the same socket."""
        return f"nbd+unix:///{quote(export, safe='/')}?socket={quote(self.socket, safe='/')}"

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@contextlib.contextmanager
def trionbd_process(
    *args: str, env: dict[str, str] | None = None, pass_fds: Sequence[int] = ()
) -> Iterator[Running]:
    """Run ``trionbd -f --print-uri -U SOCK ARGS...`` until the block ends (with
    ``pass_fds`` inherited).

    Waits until the server prints its URI (it is then listening). At the end the
    process gets SIGTERM (unless it has exited) and must exit with status 0 within
    20 s; its stderr must not contain a Python traceback.
    """
    with short_tmpdir() as tmp:
        sock = str(tmp / "sock")
        stderr_path = tmp / "stderr"
        cmd = [PYTHON, "-m", "trionbd", "-f", "--print-uri", "-U", sock, *args]
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                cwd=ROOT,
                pass_fds=pass_fds,
            )
        try:
            assert proc.stdout is not None
            uri = read_line(proc, START_TIMEOUT)
            if not uri:
                proc.wait(10)
                raise AssertionError(
                    f"trionbd did not start (status {proc.returncode}): {cmd}\n"
                    + stderr_path.read_text()
                )
            running = Running(proc, uri.strip(), sock, stderr_path)
            yield running
        finally:
            if not _terminate(proc):
                raise AssertionError("trionbd did not exit within 20 s of SIGTERM")
        text = stderr_path.read_text(errors="replace")
        assert "Traceback" not in text, text
        assert proc.returncode == 0, f"trionbd exited with {proc.returncode}:\n{text}"


@contextlib.contextmanager
def nbdkit_process(*args: str, pass_fds: Sequence[int] = ()) -> Iterator[Running]:
    """Run the reference server, ``nbdkit -f -U SOCK ARGS...``, until the block ends (with
    ``pass_fds`` inherited).

    Waits until its pidfile appears (it is then listening). At the end it gets SIGTERM
    unless the test already stopped it; its exit status is not checked (tests kill it).
    """
    with short_tmpdir() as tmp:
        sock = str(tmp / "sock")
        pidfile = tmp / "pid"
        stderr_path = tmp / "stderr"
        cmd = ["nbdkit", "-f", "-U", sock, "-P", str(pidfile), *args]
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=err, stderr=err, text=True, pass_fds=pass_fds)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not pidfile.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"nbdkit did not start: {cmd}\n{stderr_path.read_text()}")
                time.sleep(0.02)
            running = Running(proc, f"nbd+unix:///?socket={sock}", sock, stderr_path)
            yield running
        finally:
            _terminate(proc)


MARK = "TRIONBD_TESTS_MARK"
"""The environment variable that marks the processes a test starts (tests/conftest.py)."""


def marked(mark: str) -> list[tuple[int, str]]:
    """The running processes whose environment holds ``MARK=mark``: (pid, command line)."""
    wanted = f"{MARK}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if wanted not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours
            continue
        if cmdline:  # a zombie has none: it has exited, only its parent has not looked
            found.append((int(entry), cmdline))
    return found


def stop_marked(mark: str, grace: float = 10.0) -> list[str]:
    """Wait up to ``grace`` seconds for the processes marked ``mark`` to exit (one may
    be finishing its shutdown), then SIGKILL the rest; their descriptions."""
    deadline = time.monotonic() + grace
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, _ in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return [f"pid {pid}: {cmdline}" for pid, cmdline in left]


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it is true; AssertionError naming ``what`` after ``timeout``
    seconds of real time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def _terminate(proc: subprocess.Popen[str]) -> bool:
    """SIGTERM ``proc`` unless it has exited, and wait; False if it was still running 20 s
    later (it is then killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return False
    return True


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line of stdout, or "" if the process exits or the timeout passes."""
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    buf = ""
    while time.monotonic() < deadline:
        chunk = proc.stdout.readline()
        if chunk:
            buf += chunk
            if buf.endswith("\n"):
                return buf
        elif proc.poll() is not None:
            return buf
        else:
            time.sleep(0.02)
    return buf


def run(cmd: Sequence[str], timeout: float = 120, check: bool = True, **kw: object) -> str:
    """Run a command; return its stdout; raise with its stderr on failure."""
    result = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,  # type: ignore[call-overload]
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd} failed with {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return str(result.stdout)


def nbdsh(uri: str, script: str, *options: str, timeout: float = 120) -> str:
    """Run a Python ``script`` in nbdsh connected to ``uri`` (``h`` is the handle), with
    nbdsh's ``options`` (such as ``--base-allocation``: they come before the connection).

    Runs nbdsh's module with Debian's Python: the ``nbdsh`` wrapper script starts
    whatever ``python3`` comes first on PATH, which may lack the ``nbd`` module."""
    return run([SYSTEM_PYTHON, "-m", "nbd", *options, "-u", uri, "-c", script], timeout=timeout)


def libnbd_python(script: str, timeout: float = 120) -> str:
    """Run a script with Debian's Python, where ``import nbd`` works."""
    return run([SYSTEM_PYTHON, "-c", script], timeout=timeout)


def listing(uri: str) -> list[dict[str, Any]]:
    """``nbdinfo --list --json``: the exports, in the order the server listed them."""
    exports: list[dict[str, Any]] = json.loads(run(["nbdinfo", "--list", "--json", uri]))["exports"]
    return exports


def export_info(uri: str) -> dict[str, Any]:
    """``nbdinfo --json``: what the server tells of the one export of ``uri``."""
    export: dict[str, Any] = json.loads(run(["nbdinfo", "--json", uri]))["exports"][0]
    return export


def read_export(uri: str, tmp: Path) -> bytes:
    """Every byte of an export, copied by nbdcopy (through a file in ``tmp``, removed)."""
    out = tmp / "nbdcopy.out"
    out.unlink(missing_ok=True)
    run(["nbdcopy", uri, str(out)])
    data = out.read_bytes()
    out.unlink()
    return data


def trionbd_run(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``trionbd ARGS...`` to its end; its stdout and stderr are captured (as text)
    unless ``kw`` (passed to ``subprocess.run``) says otherwise."""
    kw.setdefault("capture_output", True)
    cmd = [PYTHON, "-m", "trionbd", *args]
    return subprocess.run(cmd, text=True, timeout=timeout, cwd=ROOT, **kw)


def trionbd_exit(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``trionbd -f -U SOCK ARGS...`` to its end, for a start that must fail (bad
    parameters exit with 2, a failed start-up with 1); its stderr holds no traceback."""
    with short_tmpdir() as tmp:
        result = trionbd_run("-f", "-U", str(tmp / "sock"), *args, env=env, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def random_file(path: Path, size: int, seed: int = 1) -> bytes:
    """Write ``size`` pseudo-random bytes to ``path`` and return them."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def sparse_file(path: Path, size: int, runs: Sequence[tuple[int, int]], seed: int = 7) -> bytes:
    """A file of ``size`` bytes, holes (as far as the file system keeps them) except
    pseudo-random bytes in the ``(offset, length)`` runs; returns its content."""
    rng = random.Random(seed)
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in runs:
            chunk = rng.randbytes(length)
            f.seek(offset)
            f.write(chunk)
            content[offset : offset + length] = chunk
    return bytes(content)


def seek_map(path: Path, start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
    """The SEEK_DATA/SEEK_HOLE map of ``path`` (of its bytes ``[start, end)``, offsets
    relative to ``start``) as ``(offset, length, flags)`` runs, flags as base:allocation
    gives them: 0 for data, 3 (hole, zero) for a hole."""
    out: list[tuple[int, int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size if end is None else end
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                data = end
            if data > pos:
                stop, flags = min(data, end), 3
            else:
                stop, flags = min(os.lseek(fd, pos, os.SEEK_HOLE), end), 0
            out.append((pos - start, stop - pos, flags))
            pos = stop
    finally:
        os.close(fd)
    return out


def all_tasks() -> set[trio.lowlevel.Task]:
    """Every task of the current Trio run, walked down from the root task (compare a
    snapshot from before with one from after to find leftover tasks)."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    found: set[trio.lowlevel.Task] = set()
    todo = [root]
    while todo:
        task = todo.pop()
        found.add(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return found


@contextlib.asynccontextmanager
async def serving(
    target: Chain | Plugin, config: ServerConfig | None = None
) -> AsyncIterator[Server]:
    """Serve ``target`` in-process on a Unix socket; yields the ``Server``."""
    with short_tmpdir() as tmp:
        listener = await open_unix_listener(str(tmp / "sock"))
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, target, [listener], config)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
