"""nbdkit's listening options on the real command: ``-4``/``-6`` (one address family),
``--keepalive`` (TCP keepalive on client sockets), ``--vsock`` (AF_VSOCK, ``-p`` its
port) and ``--timeout`` (nbdkit 1.42's name of the handshake timeout). What the server
listens on and how its client sockets are set is read from the kernel's socket tables
(``/proc/net/tcp``, ``/proc/net/tcp6``) for the server's own descriptors."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import (
    HANG_GUARD,
    PYTHON,
    ROOT,
    START_TIMEOUT,
    random_file,
    read_export,
    read_line,
    run,
    trionbd_process,
    wait_until,
)
from trionbd.cli import parse_args
from trionbd.protocol.constants import DEFAULT_PORT

LISTEN, ESTABLISHED = 0x0A, 0x01
"""TCP states as /proc/net/tcp writes them."""
KEEPALIVE_TIMER = 2
"""The ``tr`` column of /proc/net/tcp: 2 while the socket's keepalive timer runs."""


@dataclass(frozen=True)
class TcpSocket:
    """One row of /proc/net/tcp or /proc/net/tcp6."""

    family: socket.AddressFamily
    port: int
    state: int
    timer: int
    inode: int


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """The TCP sockets process ``pid`` has open, as the kernel's tables describe them."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    found = []
    for family, table in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                inode = int(fields[9])
                if inode in inodes:
                    port = int(fields[1].rsplit(":", 1)[1], 16)
                    timer = int(fields[5].split(":")[0], 16)
                    found.append(TcpSocket(family, port, int(fields[3], 16), timer, inode))
    return found


def listening(pid: int) -> list[TcpSocket]:
    return [s for s in tcp_sockets(pid) if s.state == LISTEN]


# --- -4, -6 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "families"),
    [
        ([], {socket.AF_INET, socket.AF_INET6}),
        (["-4"], {socket.AF_INET}),
        (["-6"], {socket.AF_INET6}),
        (["-6", "-4"], {socket.AF_INET}),  # the last one wins, as in nbdkit
        (["--ipv6-only"], {socket.AF_INET6}),
    ],
)
def test_one_address_family_on_every_address(
    flags: list[str], families: set[socket.AddressFamily], tmp_path: Path
) -> None:
    data = random_file(tmp_path / "disk.img", 1 << 20)
    with trionbd_process(*flags, "-p", "0", "file", str(tmp_path / "disk.img")) as server:
        found = listening(server.proc.pid)
        assert {s.family for s in found} == families
        for s in found:
            host = "127.0.0.1" if s.family == socket.AF_INET else "[::1]"
            assert read_export(f"nbd://{host}:{s.port}/", tmp_path) == data


def test_a_host_name_resolved_to_one_family(tmp_path: Path) -> None:
    """``-i localhost -4`` listens on 127.0.0.1 only (without -4, on every address
    ``localhost`` resolves to)."""
    with trionbd_process("-4", "-i", "localhost", "-p", "0", "memory", "1M") as server:
        (only,) = listening(server.proc.pid)
        assert only.family == socket.AF_INET
        assert run(["nbdinfo", "--size", f"nbd://127.0.0.1:{only.port}/"]).strip() == "1048576"


def test_an_address_of_the_other_family_is_refused() -> None:
    args = ["-f", "-4", "-i", "::1", "-p", "0", "memory", "1M"]
    result = subprocess.run([PYTHON, "-m", "trionbd", *args], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "trionbd: [::1]:0: address family for hostname not supported\n"


# --- --keepalive ---------------------------------------------------------------------------------


@pytest.mark.parametrize("keepalive", [False, True])
def test_keepalive_on_accepted_tcp_sockets(keepalive: bool) -> None:
    flags = ["--keepalive"] if keepalive else []
    with trionbd_process(*flags, "-p", "0", "-i", "127.0.0.1", "memory", "1M") as server:
        pid = server.proc.pid
        (listener,) = listening(pid)
        with socket.create_connection(("127.0.0.1", listener.port), timeout=HANG_GUARD) as client:
            assert client.recv(8) == b"NBDMAGIC"  # accepted: the greeting has come

            def client_socket() -> TcpSocket | None:
                ours = [s for s in tcp_sockets(pid) if s.state == ESTABLISHED]
                return ours[0] if ours else None

            # Once the greeting is acknowledged no retransmission timer runs; what is
            # left is the keepalive timer, or none.
            expected = KEEPALIVE_TIMER if keepalive else 0
            wait_until(
                lambda: (s := client_socket()) is not None and s.timer == expected,
                f"the server's socket shows timer {expected}",
            )


# --- --timeout -----------------------------------------------------------------------------------


def test_timeout_is_the_handshake_timeout() -> None:
    assert parse_args(["--timeout=3", "memory", "1M"]).config.handshake_timeout == 3
    assert parse_args(["--timeout", "0", "memory", "1M"]).config.handshake_timeout is None
    with trionbd_process("--timeout=0.5", "memory", "1M") as server:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(HANG_GUARD)
            client.connect(server.socket)
            assert client.recv(18)[:8] == b"NBDMAGIC"
            assert client.recv(100) == b""  # no option sent: closed by the server


# --- --vsock -------------------------------------------------------------------------------------


def vsock_missing() -> str | None:
    """Why this kernel has no AF_VSOCK at all, or ``None``."""
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as e:
        return f"the kernel has no AF_VSOCK: socket(AF_VSOCK) failed: {e}"
    return None


def vsock_loopback_missing() -> str | None:
    """Why a client on this host cannot reach a vsock listener on it, or ``None``:
    that needs /dev/vsock and the vsock loopback transport (local context id 1)."""
    missing = vsock_missing()
    if missing:
        return missing
    if not os.path.exists("/dev/vsock"):
        return "no /dev/vsock: the kernel has no vsock transport"
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((1, socket.VMADDR_PORT_ANY))  # VMADDR_CID_LOCAL
        except OSError as e:
            return (
                "the kernel has no vsock loopback: binding VMADDR_CID_LOCAL (1) failed: "
                f"{e} (the vsock_loopback module is not loaded)"
            )
    return None


@contextlib.contextmanager
def vsock_server(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``trionbd -f --print-uri --vsock -p 0 ARGS`` until the block ends: the process
    and the URI it printed."""
    cmd = [PYTHON, "-m", "trionbd", "-f", "--print-uri", "--vsock", "-p", "0", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        uri = read_line(proc, START_TIMEOUT).strip()
        if not uri:
            proc.kill()
            raise AssertionError(f"trionbd --vsock did not start: {proc.communicate()[1]}")
        yield proc, uri
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=HANG_GUARD)
        assert proc.returncode == 0 and "Traceback" not in err, err


def test_vsock_listens_on_the_port_it_names() -> None:
    missing = vsock_missing()
    if missing:
        pytest.skip(missing)
    with vsock_server("memory", "1M") as (_, uri):
        assert uri.startswith("nbd+vsock://1:") and uri.endswith("/")
        port = int(uri.removeprefix("nbd+vsock://1:").removesuffix("/"))
        assert port != DEFAULT_PORT
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as other:
            with pytest.raises(OSError) as taken:
                other.bind((socket.VMADDR_CID_ANY, port))
            assert taken.value.errno == errno.EADDRINUSE


def test_vsock_serves_a_client_on_the_loopback(tmp_path: Path) -> None:
    missing = vsock_loopback_missing()
    if missing:
        pytest.skip(missing)
    data = random_file(tmp_path / "disk.img", 1 << 20)
    with vsock_server("file", str(tmp_path / "disk.img")) as (_, uri):
        assert read_export(uri, tmp_path) == data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--vsock", "-U", "sock"],
            "--vsock listens on AF_VSOCK only: it cannot be combined with -U",
        ),
        (
            ["--vsock", "-i", "::1"],
            "--vsock listens on AF_VSOCK only: it cannot be combined with -i",
        ),
        (["--vsock", "-s"], "-s serves stdin/stdout: it cannot be combined with --vsock"),
        (["-p", "70000"], "bad value for -p/--port: '70000' is not a TCP port (0 to 65535)"),
    ],
)
def test_vsock_refusals(args: list[str], message: str) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "trionbd", "-f", *args, "memory", "1M"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr == f"trionbd: {message}\n"


def test_vsock_ports_are_32_bit() -> None:
    assert parse_args(["--vsock", "-p", "4000000000", "memory", "1M"]).port == 4000000000
