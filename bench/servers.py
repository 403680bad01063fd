"""The three servers under test: their command lines, start-up, and guaranteed shutdown.

Every sample starts a fresh server process on a Unix socket in a private temporary
directory and stops it afterwards (SIGTERM, then SIGKILL after ``STOP_TIMEOUT``). The
servers also get SIGKILL from the kernel if the harness dies (PR_SET_PDEATHSIG), so
nothing stays running.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

SERVERS = ("trionbd", "nbdkit", "qemu-nbd")
QEMU_NBD_OPTIONS = ("-f", "raw", "-t", "--cache=writeback", "--aio=threads", "--shared=1024")
"""qemu-nbd: raw format, persistent (-t), page cache and a thread pool like the other two,
and up to 1024 clients (--shared > 1 also makes it advertise multi-conn)."""
SAMPLE_DIR_PARENT = "/tmp"
SAMPLE_DIR_PREFIX = "tnbd-bench-"
"""Each sample's private directory (socket, server log, fio output) is made here.
/tmp keeps socket paths short (they must stay under 108 bytes)."""
STOP_TIMEOUT = 10.0
"""Seconds a server gets to exit after SIGTERM before it is killed."""
POLL_INTERVAL = 0.002
"""Seconds between connection attempts while a server starts."""
GREETING = b"NBDMAGIC"
"""How every NBD server's greeting begins: the first bytes it sends a new client."""
DEFAULT_TRIONBD = str(Path(sys.executable).with_name("trionbd"))
"""The trionbd command next to the Python running the harness (the project's venv)."""
SYSTEM_PYTHON = "/usr/bin/python3"
"""Debian's Python: the only one that can ``import nbd`` (python3-libnbd)."""
PROBE_TIMEOUT = 30.0
"""Seconds for a version or filter probe (``--version``, ``--filter=NAME --help``)."""
PR_SET_PDEATHSIG = 1
QEMU10 = Path(__file__).resolve().parent.parent / ".tools" / "qemu10" / "usr" / "bin"
"""qemu 10 (extended headers): qemu-img and qemu-nbd unpacked by ``scripts/setup --test``
beside the system's qemu 7.2."""


def qemu10(tool: str) -> str:
    """The path of qemu 10's ``tool``; BenchError if setup has not provided it."""
    path = QEMU10 / tool
    if not os.access(path, os.X_OK):
        raise BenchError(f"qemu 10's {tool} is not at {path}: run scripts/setup --test")
    return str(path)


class BenchError(Exception):
    """A server or client failed; the message says which and why (shown in the results)."""


Kind = Literal["file", "dir", "tar", "ext2", "gzip", "xz", "zstd", "targz", "zip"]

FILTERS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "tar": (("tar",), "tar-entry"),
    "ext2": (("ext2",), "ext2file"),
    "targz": (("tar", "gzip"), "tar-entry"),
    "zip": (("zip",), "zip-entry"),
    "gzip": (("gzip",), None),
    "xz": (("xz",), None),
    "zstd": (("zstd",), None),
}
"""The filters serving each kind of target, nearest the client first, and the parameter
naming the entry (tar member, file in the image) if it has one."""

NBDKIT_FILTERS = frozenset({"tar", "ext2", "gzip", "xz"})
"""Filters nbdkit 1.32 has (nbdkit-FILTER-filter.so); a chain needing another is n/a."""


@dataclass(frozen=True)
class Target:
    """What a server serves: a plain file, every file of a directory (``file dir=``), a
    tar member, a file in an ext2/3/4 image, a decompressed file (gzip, xz, zstd), a
    member of a .tar.gz or of a zip.

    ``entry`` is the tar or zip member or the absolute path in the image; None asks the
    filter to offer every member or file as a named export.
    """

    kind: Kind
    path: Path
    entry: str | None = None
    size: int = 0
    """Bytes of the export (of the one served file or member)."""
    exports: tuple[str, ...] = ()
    """Names that must be listed (``dir``, or ``tar``/``ext2`` when ``entry`` is None)."""
    params: tuple[str, ...] = ()
    """More ``key=value`` words for the filters (trionbd's gzip ``index=``)."""
    qemu_nbd: str = "qemu-nbd"
    """The qemu-nbd serving it: the system's (7.2), or qemu 10's for extended headers."""

    @property
    def slow_start(self) -> bool:
        """Start-up reads the whole input (trionbd's gzip index, a plain zstd file)."""
        return self.kind in ("gzip", "targz", "zstd")


def command(
    server: str, target: Target, sock: str, trionbd: str, trionbd_args: Sequence[str] = ()
) -> list[str] | None:
    """The command line serving ``target`` on ``sock``; None if ``server`` cannot serve it.
    ``trionbd`` is the program for server ``trionbd``, given ``trionbd_args`` first."""
    path = str(target.path)
    if server == "qemu-nbd":
        if target.kind != "file":
            return None
        return [target.qemu_nbd, "-k", sock, *QEMU_NBD_OPTIONS, path]
    if target.kind == "file":
        chain = ["file", path]
    elif target.kind == "dir":
        chain = ["file", f"dir={path}"]
    else:
        filters, key = FILTERS[target.kind]
        params = [] if target.entry is None else [f"{key}={target.entry}"]
        if server == "nbdkit":
            if key is not None and not params:
                return None  # nbdkit's tar and ext2 filters serve one named file only
            if not NBDKIT_FILTERS.issuperset(filters) or target.params:
                return None
        chain = ["file", path, *(f"--filter={f}" for f in filters), *params, *target.params]
    if server == "trionbd":
        return [trionbd, "-f", "-U", sock, *trionbd_args, *chain]
    if server == "nbdkit":
        # nbdkit wants its filters before the plugin name.
        options = [word for word in chain if word.startswith("--filter=")]
        rest = [word for word in chain if not word.startswith("--filter=")]
        return ["nbdkit", "-f", "-U", sock, *options, *rest]
    raise ValueError(f"unknown server {server!r}")


def unix_uri(sock: str, export: str = "") -> str:
    return f"nbd+unix:///{quote(export, safe='/')}?socket={quote(sock, safe='/')}"


@dataclass
class Running:
    """A started server that greets clients."""

    name: str
    command: list[str]
    proc: subprocess.Popen[bytes]
    socket: str
    workdir: Path
    ready_s: float
    """Seconds from starting the process until it greeted a client (sent NBDMAGIC): a
    socket that takes connections into its backlog before the server serves them (the
    lifetime's start-up still running) does not count as ready."""
    exit_status: int | None = None
    """Set once stopped: 0 is a clean exit after SIGTERM; -9 means it had to be killed."""

    @property
    def uri(self) -> str:
        return unix_uri(self.socket)

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise BenchError if the server has exited (it must serve until stopped)."""
        status = self.proc.poll()
        if status is not None:
            raise BenchError(
                f"{self.name} exited with status {status}; command: "
                f"{shlex.join(self.command)}\n{self.log_tail()}"
            )


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the harness dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@contextlib.contextmanager
def running(
    name: str, cmd_for: Callable[[str], list[str]], start_timeout: float
) -> Iterator[Running]:
    """Start a server, wait until it greets a client, yield it, and always stop it.

    ``cmd_for(sock)`` gives the command line for a socket path. Raises BenchError with
    the server's log if it exits early or does not greet a client within ``start_timeout``.
    """
    workdir = Path(tempfile.mkdtemp(prefix=SAMPLE_DIR_PREFIX, dir=SAMPLE_DIR_PARENT))
    sock = str(workdir / "sock")
    cmd = cmd_for(sock)
    proc: subprocess.Popen[bytes] | None = None
    server: Running | None = None
    try:
        with open(workdir / "server.log", "wb") as log:
            start = time.monotonic()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # ^C at the terminal reaches only the harness
                preexec_fn=_die_with_parent,
            )
        server = Running(name, cmd, proc, sock, workdir, 0.0)
        server.ready_s = _wait_ready(server, start, start_timeout)
        yield server
        server.check_alive()
    finally:
        if proc is not None:
            status = stop(proc)
            if server is not None:
                server.exit_status = status
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()


def _greets(server: Running, start: float, timeout: float) -> bool:
    """Whether a connection to the server gets the greeting's magic within ``timeout``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(server.socket)
            s.settimeout(max(POLL_INTERVAL, timeout - (time.monotonic() - start)))
            return s.recv(len(GREETING), socket.MSG_WAITALL) == GREETING
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, TimeoutError):
            return False


def _wait_ready(server: Running, start: float, timeout: float) -> float:
    while True:
        server.check_alive()
        if _greets(server, start, timeout):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise BenchError(
                f"{server.name} did not greet a client on {server.socket} within "
                f"{timeout:g} s; command: {shlex.join(server.command)}\n{server.log_tail()}"
            )
        time.sleep(POLL_INTERVAL)


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL after ``STOP_TIMEOUT`` seconds; reaps it; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_client(cmd: Sequence[str], timeout: float) -> str:
    """Run a client to completion; return its stdout. On failure or timeout raise
    BenchError with its output; a timed-out client's whole process group is killed."""
    proc = subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise BenchError(
            f"{cmd[0]} did not finish within {timeout:g} s: {shlex.join(cmd)}"
        ) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip()
        raise BenchError(f"{shlex.join(cmd)} failed with status {proc.returncode}: {text}")
    return out.decode(errors="replace")


def trionbd_has_filter(trionbd: str, name: str) -> bool:
    """Whether ``trionbd --filter=NAME --help`` works (the filter exists)."""
    cmd = [trionbd, f"--filter={name}", "--help"]
    try:
        result = subprocess.run(cmd, capture_output=True, timeout=PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{shlex.join(cmd)} did not finish within {PROBE_TIMEOUT:g} s") from None
    return result.returncode == 0


def versions(trionbd: str, root: Path) -> dict[str, str]:
    """Versions of the servers and clients, and the trionbd source commit."""

    def first_line(*cmd: str) -> str:
        try:
            result = subprocess.run(cmd, capture_output=True, timeout=PROBE_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unavailable ({e})"
        text = (result.stdout or result.stderr).decode(errors="replace").strip()
        return text.splitlines()[0] if text else "unavailable (no output)"

    commit = first_line("git", "-C", str(root), "rev-parse", "HEAD")
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "trionbd"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "trionbd": first_line(trionbd, "--version"),
        "trionbd_commit": commit + (" (with uncommitted changes in trionbd/)" if dirty else ""),
        "nbdkit": first_line("nbdkit", "--version"),
        "qemu-nbd": first_line("qemu-nbd", "--version"),
        "qemu 10 (qemu-img, qemu-nbd)": first_line(str(QEMU10 / "qemu-nbd"), "--version"),
        "fio": first_line("fio", "--version"),
        "nbdcopy": first_line("nbdcopy", "--version"),
        "nbdinfo": first_line("nbdinfo", "--version"),
        "libnbd (python3-libnbd)": first_line(
            SYSTEM_PYTHON, "-c", "import nbd; print(nbd.NBD().get_version())"
        ),
        "trionbd python": first_line(
            trionbd_python(trionbd), "-c", "import sys; print(sys.version.split()[0])"
        ),
    }


def source_commit(trionbd: str) -> str:
    """The git commit (short) of the source tree the trionbd program runs from (the
    directory of its plugins, from ``--dump-config``); "unknown" outside a git tree."""
    config = subprocess.run(
        [trionbd, "--dump-config"], capture_output=True, text=True, timeout=PROBE_TIMEOUT,
        check=False,
    ).stdout  # fmt: skip
    key = "plugindir="
    plugindir = next((line[len(key) :] for line in config.splitlines() if line.startswith(key)), "")
    if not plugindir:
        raise BenchError(f"{trionbd} --dump-config names no plugindir")
    commit = subprocess.run(
        ["git", "-C", plugindir, "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return commit or "unknown"


def processes(pid: int) -> list[int]:
    """A server's processes: ``pid`` and its descendants (trionbd's worker processes)."""
    out = [pid]
    for p in out:  # grows while it is walked
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    out += [int(child) for child in f.read().split()]
        except OSError:  # gone meanwhile
            pass
    return out


def memory_of(pid: int) -> dict[str, float]:
    """RSS and PSS (MiB, summed over the server's processes), threads and processes.
    RSS counts pages shared between the processes once per process; PSS divides each
    page among the processes sharing it, so the sum is what the server really holds."""
    rss = pss = 0
    threads = count = 0
    for p in processes(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss += int(fields["VmRSS"].split()[0])
        threads += int(fields["Threads"])
        pss += sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
        count += 1
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024, "threads": threads, "processes": count}


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a server's processes, and of their children that
    have exited (from /proc/PID/stat: utime + cutime, stime + cstime, summed)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for p in processes(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
    return user / tick, system / tick


def trionbd_python(trionbd: str) -> str:
    """The interpreter of the trionbd script (its #! line)."""
    with open(trionbd, "rb") as f:
        line = f.readline().decode(errors="replace").strip()
    return line[2:].split()[0] if line.startswith("#!") else "python3"
