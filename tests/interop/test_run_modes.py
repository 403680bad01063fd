"""Running like nbdkit: background mode with a pidfile, ``--run``, ``-s``, systemd socket
activation (also as libnbd's ``[ CMD ]``), ``--exit-with-parent``, ``--log`` (also to a
file), ``-v``,
``--dump-plugin``/``--dump-config``, ``--no-sr``/``--no-mc``. Each drives the real
command with real clients."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from tests.server.nbdclient import Client
from tests.support import (
    PYTHON,
    ROOT,
    SYSTEM_PYTHON,
    libnbd_python,
    random_file,
    run,
    short_tmpdir,
    trionbd_process,
    trionbd_run,
    wait_until,
)
from trionbd import Filter, Layer, Lifetime, StartupError, __version__
from trionbd.cli import parse_args

TRIONBD = [PYTHON, "-m", "trionbd"]
EXIT_TIMEOUT = 20.0


class FailAtStart(Filter):
    """A filter whose start-up (after forking) fails."""

    name = "failatstart"

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        raise StartupError("failatstart: refusing to start, as asked")


def unix_uri(sock: Path | str, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts as gone: it is not ours to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


# --- background mode -----------------------------------------------------------------------------


def test_background_parent_exits_once_the_socket_accepts(tmp: Path) -> None:
    data = random_file(tmp / "disk.img", 1024 * 1024 + 512)
    for round in range(3):
        sock, pidfile = tmp / f"sock{round}", tmp / f"pid{round}"
        # The issue's own example: a client right after the command, no retry.
        out = run(
            ["sh", "-c",
             f"{' '.join(TRIONBD)} -U {sock} -P {pidfile} file {tmp / 'disk.img'} && "
             f"nbdinfo --size '{unix_uri(sock)}' && echo parent=$$"],
            cwd=ROOT,
        )  # fmt: skip
        size, parent = out.split()
        assert int(size) == len(data)
        pid = int(pidfile.read_text())
        # The pidfile names the server, which is neither the shell nor the exited parent.
        assert pid != int(parent.removeprefix("parent=")) and not gone(pid)
        run(["nbdcopy", unix_uri(sock), str(tmp / "copy.img")])
        assert (tmp / "copy.img").read_bytes() == data
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: gone(pid), "the background server exits", EXIT_TIMEOUT)  # noqa: B023
        assert not pidfile.exists() and not sock.exists()


def test_background_detaches_from_the_callers_stdio_and_session(tmp: Path) -> None:
    sock, pidfile = tmp / "sock", tmp / "pid"
    # capture_output: run() returns only when stdout and stderr reach EOF, so the
    # server must have let go of both.
    result = trionbd_run("-U", str(sock), "-P", str(pidfile), "memory", "1M")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    pid = int(pidfile.read_text())
    try:
        assert os.getsid(pid) == pid  # a session of its own
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert run(["nbdinfo", "--size", unix_uri(sock)]).strip() == "1048576"
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: gone(pid), "the background server exits", EXIT_TIMEOUT)


def test_background_print_uri_reaches_the_caller(tmp: Path) -> None:
    sock, pidfile = tmp / "sock", tmp / "pid"
    result = trionbd_run(
        "--print-uri", "-e", "x", "-U", str(sock), "-P", str(pidfile), "null", "1M"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{unix_uri(sock, 'x')}\n"
    os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_background_start_up_errors_reach_the_user(tmp: Path) -> None:
    # Before forking: the socket cannot be made.
    result = trionbd_run("-U", str(tmp / "no" / "sock"), "memory", "1M")
    assert result.returncode == 1
    assert result.stderr == f"trionbd: {tmp / 'no' / 'sock'}: no such file or directory\n"
    # After forking: a filter's start-up fails in the child; the parent reports its status.
    sock = tmp / "sock"
    result = trionbd_run(
        "-U", str(sock), "-P", str(tmp / "pid"),
        "--filter=tests.interop.test_run_modes:FailAtStart", "memory", "1M",
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "trionbd: failatstart: refusing to start, as asked\n"
    assert not sock.exists() and not (tmp / "pid").exists()


# --- --run ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "status"), [("true", 0), ("exit 3", 3), ("kill -9 $$", 137)])
def test_run_exits_with_the_commands_status(command: str, status: int) -> None:
    result = trionbd_run("memory", "1M", "--run", command)
    assert result.returncode == status, result.stderr
    if status > 128:
        assert result.stderr == "trionbd: --run: the command was killed by signal 9\n"


def test_run_sets_nbdkits_variables_and_serves_while_it_runs(tmp: Path) -> None:
    random_file(tmp / "disk.img", 65536)
    script = (
        'printf "%s\\n" "uri=$uri" "nbd=$nbd" "unixsocket=$unixsocket" "port=$port" '
        '"exportname=$exportname" "tls=${tls-unset}"; '
        'test -S "$unixsocket" && nbdinfo --size "$uri" && exec sh -c \'echo inner=$uri\''
    )
    result = trionbd_run("-e", "a b", "file", str(tmp / "disk.img"), "--run", script)
    assert result.returncode == 0, result.stderr
    *variables, size, inner = result.stdout.splitlines()
    values = dict(line.split("=", 1) for line in variables)
    sock = values["unixsocket"]
    assert values == {
        "uri": f"nbd+unix:///a%20b?socket={sock}",
        "nbd": f"nbd+unix:///a%20b?socket={sock}",
        "unixsocket": sock,
        "port": "",
        "exportname": "a b",
        "tls": "unset",
    }
    assert size == "65536"  # nbdinfo reached the server through $uri
    assert inner == f"inner={values['uri']}"  # exported: the command's children see them
    # Serving stops with the command: the private socket and its directory are gone.
    assert not os.path.exists(sock) and not os.path.exists(os.path.dirname(sock))


def test_run_with_a_tcp_port_and_tls_required(tmp: Path) -> None:
    ca, certs_dir = trustme.CA(), tmp / "certs"
    certs_dir.mkdir()
    ca.cert_pem.write_to_path(str(certs_dir / "ca-cert.pem"))
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(certs_dir / "server-cert.pem"))
    server.private_key_pem.write_to_path(str(certs_dir / "server-key.pem"))
    result = trionbd_run(
        "-p", "0", "-i", "127.0.0.1", "--tls=require", f"--tls-certificates={certs_dir}",
        "memory", "1M", "--run",
        'echo "$uri|$port|$unixsocket|$tls|$tls_certificates"; nbdinfo --size "$uri"',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    variables, size = result.stdout.splitlines()
    uri, port, unixsocket, tls, certificates = variables.split("|")
    assert int(port) > 0
    assert (uri, unixsocket, tls, certificates) == (
        f"nbds://127.0.0.1:{port}/?tls-certificates={certs_dir}",
        "",
        "2",
        str(certs_dir),
    )
    assert size == "1048576"  # $uri alone got the client through TLS


def test_run_passes_stdin_and_stdout_through() -> None:
    result = trionbd_run("memory", "1M", "--run", "tr a-z A-Z", input="hello\n")
    assert (result.returncode, result.stdout) == (0, "HELLO\n")


def test_sigterm_during_run_stops_the_command_and_the_server(tmp: Path) -> None:
    pidfile = tmp / "pid"
    proc = subprocess.Popen(
        [*TRIONBD, "-P", str(pidfile), "memory", "1M", "--run", "exec sleep 60"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(pidfile.exists, "the server listens", EXIT_TIMEOUT)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=EXIT_TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "killed by signal 15" in err


# --- -s ------------------------------------------------------------------------------------------


def test_single_with_libnbd_connect_command(tmp: Path) -> None:
    data = random_file(tmp / "disk.img", 256 * 1024)
    out = libnbd_python(
        "import nbd\n"
        "h = nbd.NBD()\n"
        f"h.connect_command({[*TRIONBD, '-s', 'file', str(tmp / 'disk.img')]!r})\n"
        "h.pwrite(b'\\xab' * 4096, 8192, nbd.CMD_FLAG_FUA)\n"
        "print(h.get_size(), h.pread(256 * 1024, 0).hex())\n"
        "h.shutdown()\n"
    )
    size, content = out.split()
    expected = data[:8192] + b"\xab" * 4096 + data[8192 + 4096 :]
    assert int(size) == len(data) and bytes.fromhex(content) == expected
    assert (tmp / "disk.img").read_bytes() == expected


def test_single_with_nbdsh_and_debug_logging_keeps_stdout_clean() -> None:
    # -v logs every option and request to stderr; one byte of it on stdout would break
    # the protocol.
    out = run([SYSTEM_PYTHON, "-m", "nbd", "-c",
               f"h.connect_command({[*TRIONBD, '-v', '-s', 'pattern', '1M']!r}); "
               "print(h.pread(16, 4096).hex())"])  # fmt: skip
    assert bytes.fromhex(out.strip()) == (4096).to_bytes(8, "big") + (4104).to_bytes(8, "big")


async def test_single_over_a_pair_of_pipes() -> None:
    proc = await trio.lowlevel.open_process(
        [*TRIONBD, "-v", "-s", "memory", "1M"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    client = Client(trio.StapledStream(proc.stdin, proc.stdout))
    await client.go()
    await client.write(4096, b"pipes" * 100)
    assert await client.read(4096, 500) == b"pipes" * 100
    await client.disconnect()
    await proc.stdin.aclose()
    with trio.fail_after(EXIT_TIMEOUT):
        assert await proc.wait() == 0
    err = await proc.stderr.receive_some(1 << 20)
    assert b"conn 1: " in err  # -v: debug lines carry the connection id


def test_single_refuses_listening_options() -> None:
    result = trionbd_run("-s", "-U", "/tmp/x", "memory", "1M")
    assert result.returncode == 2
    assert result.stderr == "trionbd: -s serves stdin/stdout: it cannot be combined with -U\n"


# --- socket activation ---------------------------------------------------------------------------


def activated(sock: socket.socket, *args: str) -> subprocess.Popen[str]:
    """Start trionbd the way systemd does: the listening socket as fd 3, LISTEN_PID set
    to the server's own pid (the shell execs it), LISTEN_FDS=1."""
    return subprocess.Popen(
        ["sh", "-c", 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&0 0</dev/null', "sh",
         *TRIONBD, *args],
        stdin=sock.fileno(), stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=EXIT_TIMEOUT)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return err


def test_socket_activation_serves_a_passed_unix_socket(tmp: Path) -> None:
    data = random_file(tmp / "disk.img", 300 * 1024)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp / "sock"))
    listener.listen()
    # The socket accepts (queues) before the server even runs: activation's point.
    proc = activated(listener, "file", str(tmp / "disk.img"))
    listener.close()
    try:
        for _ in range(2):  # it keeps serving, connection after connection
            run(["nbdcopy", unix_uri(tmp / "sock"), str(tmp / "copy.img")])
            assert (tmp / "copy.img").read_bytes() == data
    finally:
        stop(proc)
    # systemd owns the socket file: it is left alone.
    assert (tmp / "sock").is_socket()


def test_socket_activation_serves_a_passed_tcp_socket() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    proc = activated(listener, "pattern", "1M")
    listener.close()
    try:
        assert run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"]).strip() == "1048576"
    finally:
        stop(proc)


def test_libnbd_command_syntax_uses_socket_activation(tmp: Path) -> None:
    data = random_file(tmp / "src.img", 2 * 1024 * 1024)
    (tmp / "dst.img").write_bytes(bytes(len(data)))
    size = run(["nbdinfo", "--size", "--", "[", *TRIONBD, "file", str(tmp / "src.img"), "]"],
               cwd=ROOT)  # fmt: skip
    assert int(size) == len(data)
    # Both ends are trionbd subprocesses; every byte crosses.
    run(["nbdcopy", "--", "[", *TRIONBD, "file", str(tmp / "src.img"), "]",
         "[", *TRIONBD, "file", str(tmp / "dst.img"), "]"], cwd=ROOT)  # fmt: skip
    assert (tmp / "dst.img").read_bytes() == data


def test_socket_activation_refuses_listening_options(tmp: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp / "sock"))
    listener.listen()
    proc = activated(listener, "-U", str(tmp / "other"), "memory", "1M")
    _, err = proc.communicate(timeout=EXIT_TIMEOUT)
    assert proc.returncode == 2
    assert err == (
        "trionbd: socket activation (LISTEN_PID/LISTEN_FDS) serves the sockets passed in: "
        "it cannot be combined with -U\n"
    )


# --- --exit-with-parent --------------------------------------------------------------------------


@pytest.mark.parametrize("group", [[], ["-g", "nogroup"]], ids=["", "-g"])
def test_exit_with_parent(tmp: Path, group: list[str]) -> None:
    """(Also with -g: the kernel forgets the parent-death signal when the group or user
    changes, so it is asked for after that.)"""
    if group and os.geteuid() != 0:
        pytest.skip("changing group needs root")
    pidfile = tmp / "pid"
    flags = " ".join(group)
    # The shell starts trionbd in the background, waits until it serves, and exits.
    run(["sh", "-c",
         f"{' '.join(TRIONBD)} {flags} --exit-with-parent -U {tmp / 'sock'} -P {pidfile} "
         f"memory 1M & while [ ! -e {pidfile} ]; do sleep 0.05; done"], cwd=ROOT)  # fmt: skip
    # Its parent gone, trionbd got SIGTERM and shut down cleanly (the pidfile goes last).
    wait_until(lambda: not pidfile.exists(), "trionbd exits with its parent", EXIT_TIMEOUT)


# --- logging -------------------------------------------------------------------------------------


def provoke_a_warning(sock: str) -> None:
    """A client that breaks the protocol: the server logs a warning and carries on."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        s.recv(18)
        s.sendall(b"\0\0\0\x03" + b"garbage-not-an-option-header")
        s.recv(100)


@pytest.mark.parametrize(
    ("args", "warning", "debug"),
    [
        ((), True, False),
        (("--log=stderr",), True, False),
        (("--log=null",), False, False),
        (("--log=syslog",), False, False),
        (("-v", "--log=null"), False, True),
        (("-v",), True, True),
    ],
)
def test_log_targets(args: tuple[str, ...], warning: bool, debug: bool) -> None:
    with trionbd_process(*args, "memory", "1M") as server:
        provoke_a_warning(server.socket)
        run(["nbdinfo", "--size", server.uri])
        text = server.stderr
    assert ("protocol error: bad option magic" in text) == warning, text
    assert ("conn 2: option InfoOption" in text) == debug, text


@pytest.mark.parametrize("verbose", [False, True])
def test_log_to_a_file(tmp: Path, verbose: bool) -> None:
    """``--log=FILE``: warnings (with ``-v`` debug messages too) go to the file, stamped
    with the time and the server's pid, also once the server is in the background."""
    log, pidfile, sock = tmp / "trionbd.log", tmp / "pid", tmp / "sock"
    flags = ["-v"] if verbose else []
    # With -v the background server keeps stderr (debug messages go there too): not a pipe.
    result = trionbd_run(
        *flags, f"--log={log}", "-U", str(sock), "-P", str(pidfile), "memory", "1M",
        capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, "")
    pid = int(pidfile.read_text())
    try:
        provoke_a_warning(str(sock))
        run(["nbdinfo", "--size", unix_uri(sock)])
        wait_until(lambda: "bad option magic" in log.read_text(), "the warning is in the file")
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: gone(pid), "the server has exited")
    lines = log.read_text().splitlines()
    warning = next(line for line in lines if "protocol error: bad option magic" in line)
    assert re.match(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} trionbd\[{pid}\]: WARNING: ", warning
    )
    assert any("option InfoOption" in line for line in lines) == verbose, lines


def test_a_log_file_that_cannot_be_opened_stops_the_start(tmp: Path) -> None:
    result = trionbd_run(
        "-f", "-U", str(tmp / "sock"), f"--log={tmp}/missing/x.log", "memory", "1M"
    )
    assert result.returncode == 1
    assert result.stderr == f"trionbd: --log={tmp}/missing/x.log: No such file or directory\n"


def test_background_errors_go_to_syslog(tmp: Path) -> None:
    """Once in the background, warnings go to the system log by default (as nbdkit). No
    syslog daemon runs here, so the test plays one on /dev/log while it runs."""
    if os.path.exists("/dev/log") or os.geteuid() != 0:
        pytest.skip("needs to stand in for the syslog daemon on /dev/log")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind("/dev/log")
    pidfile, sock = tmp / "pid", tmp / "sock"
    try:
        assert trionbd_run("-U", str(sock), "-P", str(pidfile), "memory", "1M").returncode == 0
        pid = int(pidfile.read_text())
        provoke_a_warning(str(sock))
        syslog.settimeout(EXIT_TIMEOUT)
        message = syslog.recv(4096).decode()
        assert f"trionbd[{pid}]: " in message
        assert "protocol error: bad option magic" in message
        assert message.startswith(f"<{3 * 8 + 4}>")  # LOG_DAEMON, LOG_WARNING
    finally:
        syslog.close()
        os.unlink("/dev/log")
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


# --- --dump-plugin, --dump-config ----------------------------------------------------------------


def key_values(text: str) -> dict[str, str]:
    lines = text.splitlines()
    assert all(re.fullmatch(r"[a-z_]+=.*", line) for line in lines), lines
    return dict(line.split("=", 1) for line in lines)


def test_dump_plugin_in_nbdkits_style() -> None:
    file = key_values(trionbd_run("file", "--dump-plugin").stdout)
    nbdkit = key_values(run(["nbdkit", "file", "--dump-plugin"]))
    for key in ("name", "magic_config_key", "thread_model", "has_pread", "has_pwrite"):
        assert file[key] == nbdkit[key], key
    assert file["path"].endswith("trionbd/plugins/file.py")
    assert file["version"] == __version__
    assert {"file", "dir", "cache"} <= set(file["params"].split(","))
    pattern = key_values(trionbd_run("pattern", "--dump-plugin").stdout)
    assert pattern["has_pread"] == "1" and "has_pwrite" not in pattern
    result = trionbd_run("--dump-plugin")
    assert (result.returncode, result.stderr) == (2, "trionbd: --dump-plugin needs a plugin name\n")


def test_dump_config() -> None:
    result = trionbd_run("--dump-config")
    assert result.returncode == 0
    config = key_values(result.stdout)
    assert list(config) == sorted(config)
    assert config["name"] == "trionbd" and config["version"] == __version__
    assert [config["version_major"], config["version_minor"]] == __version__.split(".")[:2]
    assert config["exit_with_parent"] == "yes" and config["tls"] == "yes"
    assert {"file", "memory", "null", "pattern"} <= set(config["plugins"].split(","))
    assert os.path.isdir(config["plugindir"]) and os.path.isdir(config["filterdir"])


# --- --no-sr, --no-mc, --mask-handshake with real clients -------------------------------------


PROBE = (
    "import nbd, sys\n"
    "h = nbd.NBD()\n"
    "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n"
    "h.connect_uri(sys.argv[1])\n"
    "print(h.get_structured_replies_negotiated(),"
    " h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), h.pread(8, 8).hex())\n"
)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "True True"),
        (("--no-sr",), "False False"),
        (("--no-mc",), "True False"),
        (("--mask-handshake=1",), "True True"),
    ],
)
def test_protocol_switches_with_libnbd(args: tuple[str, ...], expected: str) -> None:
    with trionbd_process(*args, "pattern", "1M") as server:
        out = run([SYSTEM_PYTHON, "-c", PROBE, server.uri])
        qemu = run(["qemu-img", "info", "--output=json", server.uri])
    assert out.split() == [*expected.split(), (8).to_bytes(8, "big").hex()]
    assert '"virtual-size": 1048576' in qemu


# --- nbdkit's spellings, and what is refused -----------------------------------------------------


def test_nbdkit_option_spellings_parse_alike(tmp: Path) -> None:
    long = parse_args(
        [
            "--no-fork",
            "--pid-file",
            "p",
            "--read-only",
            "--export-name",
            "x",
            "--ip-addr",
            "::1",
            "-p",
            "0",
            "--new-style",
            "-t",
            "4",
            "memory",
            "1M",
        ]
    )
    short = parse_args(["-f", "-P", "p", "-r", "-e", "x", "-i", "::1", "-p", "0", "-n",
                        "--threads=4", "memory", "1M"])  # fmt: skip
    assert not isinstance(long, str) and not isinstance(short, str)
    assert long == short
    assert long.pidfile == os.path.abspath("p")  # absolute: the background moves to /
    assert long.config.max_in_flight == 4 and long.config.readonly


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "memory", "1M"], "-o/--oldstyle: the oldstyle protocol is not supported"),
        (["-t", "0", "memory", "1M"], "trionbd: bad value for -t: '0' is less than 1"),
        (["--tls=maybe", "memory", "1M"], "bad value for --tls: 'maybe' is not off, on or require"),
        (["--log=", "memory", "1M"], "bad value for --log: '' is neither stderr, syslog, null"),
    ],
)
def test_refused_options_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = trionbd_run(*args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
