"""The nbd plugin: trionbd proxying nbdkit and another trionbd, driven by real clients."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

import trionbd.client as nbd
from tests.interop.test_dirty_bitmap import everyone_sees, qemu_map
from tests.support import (
    SYSTEM_PYTHON,
    Running,
    export_info,
    libnbd_python,
    listing,
    nbdkit_process,
    qemu10,
    random_file,
    run,
    short_tmpdir,
    trionbd_exit,
    trionbd_process,
)

MiB = 1024 * 1024


@contextmanager
def upstream(kind: str, *args: str) -> Iterator[Running]:
    """An upstream server: ``nbdkit ARGS`` or ``trionbd ARGS``."""
    start = nbdkit_process if kind == "nbdkit" else trionbd_process
    with start(*args) as server:
        yield server


@contextmanager
def proxy(up: Running, *args: str) -> Iterator[Running]:
    """trionbd proxying ``up`` (``trionbd ARGS nbd socket=UP``)."""
    with trionbd_process(*args, "nbd", f"socket={up.socket}") as server:
        yield server


CAPS = textwrap.dedent(
    """
    import json, nbd, sys
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(sys.argv[1])
    caps = {name: getattr(h, name)() for name in (
        "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
        "can_cache", "can_multi_conn", "can_df", "is_rotational", "get_size")}
    caps["base:allocation"] = h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    caps["block_size"] = [h.get_block_size(k) for k in (
        nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
    print(json.dumps(caps))
    h.shutdown()
    """
)


def caps(uri: str) -> dict[str, object]:
    return dict(json.loads(run([SYSTEM_PYTHON, "-c", CAPS, uri])))


# --- data, byte for byte -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nbdkit", "trionbd"])
def test_nbdcopy_both_ways_through_the_proxy(kind: str, tmp_path: Path) -> None:
    data = random_file(tmp_path / "in.img", 24 * MiB + 512)
    with upstream(kind, "memory", str(32 * MiB)) as up, proxy(up) as px:
        run(["nbdcopy", str(tmp_path / "in.img"), px.uri])
        run(["nbdcopy", px.uri, str(tmp_path / "back.img")])
        run(["nbdcopy", up.uri, str(tmp_path / "direct.img")])
    back = (tmp_path / "back.img").read_bytes()
    direct = (tmp_path / "direct.img").read_bytes()
    assert back[: len(data)] == data and back[len(data) :] == bytes(8 * MiB - 512)
    assert direct == back  # what went through the proxy is what the upstream holds


def test_nbdkit_file_with_holes_reads_and_maps_the_same(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(16 * MiB)
        for offset in (0, 5 * MiB, 11 * MiB + 65536):
            f.seek(offset)
            f.write(os.urandom(MiB))
    with nbdkit_process("file", str(disk)) as up, proxy(up) as px:
        run(["nbdcopy", px.uri, str(tmp_path / "copy.img")])
        map_direct = run(["nbdinfo", "--map", up.uri])
        map_proxy = run(["nbdinfo", "--map", px.uri])
    assert (tmp_path / "copy.img").read_bytes() == disk.read_bytes()
    assert map_proxy == map_direct
    assert "hole" in map_proxy and "data" in map_proxy


NBDSH_COMMANDS = textwrap.dedent(
    """
    import nbd, os, sys
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(sys.argv[1])
    data = bytes(range(256)) * 4096  # 1 MiB
    h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), 0) == data
    h.flush()
    if h.can_cache():
        h.cache(65536, 0)
        print("cached")
    h.trim(65536, 0)
    h.zero(65536, 131072, nbd.CMD_FLAG_NO_HOLE)
    h.zero(65536, 262144, nbd.CMD_FLAG_FAST_ZERO)
    expect = bytearray(data)
    for start in (0, 131072, 262144):
        expect[start:start + 65536] = bytes(65536)
    assert h.pread(len(data), 0) == expect
    try:
        h.pread(4096, h.get_size())
    except nbd.Error as e:
        print("range-error", e.errno)
    h.shutdown()
    """
)


@pytest.mark.parametrize("kind", ["nbdkit", "trionbd"])
def test_nbdsh_every_command_through_the_proxy(kind: str, tmp_path: Path) -> None:
    with upstream(kind, "memory", str(8 * MiB)) as up, proxy(up) as px:
        out = run([SYSTEM_PYTHON, "-c", NBDSH_COMMANDS, px.uri])
        run(["nbdcopy", up.uri, str(tmp_path / "direct.img")])
        map_direct = run(["nbdinfo", "--map", up.uri])
        map_proxy = run(["nbdinfo", "--map", px.uri])
    assert "range-error EINVAL" in out
    assert "cached" in out  # both memory plugins offer CACHE, and the proxy passes it on
    assert map_proxy == map_direct and "hole" in map_proxy and "data" in map_proxy
    expect = bytearray(bytes(range(256)) * 4096)
    for start in (0, 131072, 262144):
        expect[start : start + 65536] = bytes(65536)
    direct = (tmp_path / "direct.img").read_bytes()
    assert direct[:MiB] == expect and direct[MiB:] == bytes(7 * MiB)


def test_upstream_error_codes_reach_the_client() -> None:
    script = textwrap.dedent(
        """
        import nbd, sys
        h = nbd.NBD()
        h.connect_uri(sys.argv[1])
        for what, call in (("write", lambda: h.pwrite(b"x" * 512, 0)),
                           ("read-past-end", lambda: h.pread(512, h.get_size()))):
            try:
                call()
            except nbd.Error as e:
                print(what, e.errno)
        """
    )
    with upstream(
        "nbdkit", "--filter=error", "memory", "1M", "error-pwrite=ENOSPC", "error-pwrite-rate=1"
    ) as up:
        with proxy(up) as px:
            out = run([SYSTEM_PYTHON, "-c", script, px.uri])
    assert "write ENOSPC" in out
    assert "read-past-end EINVAL" in out


async def test_upstream_error_messages_reach_the_client() -> None:
    """What the upstream said about a failed request arrives with the error code."""
    args = ("--filter=error", "memory", "1M", "error=ENOSPC", "error-pwrite-rate=1")
    with trionbd_process(*args) as up, proxy(up) as px:
        async with await nbd.connect_unix(px.socket) as c:
            with pytest.raises(nbd.RequestError) as e:
                await c.pwrite(b"x" * 512, 0)
            assert e.value.errno == errno.ENOSPC
            assert e.value.message == "error filter: injecting ENOSPC error into pwrite"
            assert await c.pread(512, 0) == bytes(512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_upstream_by_hostname_and_by_uri(tmp_path: Path) -> None:
    data = random_file(tmp_path / "in.img", 2 * MiB + 4096)
    port = free_port()
    with trionbd_process("-p", str(port), "-i", "127.0.0.1", "memory", "4M") as up:
        with trionbd_process("nbd", "hostname=127.0.0.1", f"port={port}") as px:
            run(["nbdcopy", str(tmp_path / "in.img"), px.uri])
        with trionbd_process("nbd", f"nbd://127.0.0.1:{port}/") as px:
            run(["nbdcopy", px.uri, str(tmp_path / "out.img")])
        assert up.proc.poll() is None
    assert (tmp_path / "out.img").read_bytes()[: len(data)] == data


# --- export names ----------------------------------------------------------------------------


def test_list_shows_the_upstreams_exports_and_each_can_be_read(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    files = {name: random_file(exports / name, size, seed=size) for name, size in
             (("alpha.img", 3 * MiB), ("beta.img", MiB + 512), ("gamma.raw", 4096))}  # fmt: skip
    with upstream("trionbd", "file", f"dir={exports}") as up, proxy(up) as px:
        listed_direct = listing(up.uri)
        listed = listing(px.uri)
        names = [e["export-name"] for e in listed]
        assert names == sorted(files) == [e["export-name"] for e in listed_direct]
        for export in listed:
            assert export["export-size"] == len(files[export["export-name"]])
        for name, data in files.items():
            run(["nbdcopy", px.uri_for(name), str(tmp_path / name)])
            assert (tmp_path / name).read_bytes() == data
        # The default export is the upstream's default, under its real name.
        assert export_info(px.uri)["export-name"] == "alpha.img"
        missing = subprocess.run(["nbdinfo", px.uri_for("nope.img")], capture_output=True)
        assert missing.returncode != 0
        assert px.proc.poll() is None


def test_a_fixed_export_serves_every_name(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    random_file(exports / "a.img", 4096, seed=1)
    b = random_file(exports / "b.img", 8192, seed=2)
    with upstream("trionbd", "file", f"dir={exports}") as up:
        with trionbd_process("nbd", f"socket={up.socket}", "export=b.img") as px:
            assert [e["export-name"] for e in listing(px.uri)] == ["b.img"]
            for name in ("", "a.img", "anything"):
                run(["nbdcopy", px.uri_for(name), str(tmp_path / "out.img")])
                assert (tmp_path / "out.img").read_bytes() == b
        uri = f"nbd+unix:///a.img?socket={up.socket}"
        with trionbd_process("nbd", uri) as px:  # uri is the magic parameter
            assert int(run(["nbdinfo", "--size", px.uri]).strip()) == 4096


# --- capabilities ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["memory", "4M"],
        ["-r", "memory", "4M"],
        ["--filter=nozero", "memory", "4M"],
        ["--filter=nozero", "memory", "4M", "zeromode=plugin", "fastzeromode=none"],
        ["--filter=noextents", "memory", "4M"],
        [
            "eval",
            "get_size=echo 4M",
            "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
            "is_rotational=exit 0",
        ],
        ["--filter=multi-conn", "memory", "4M", "multi-conn-mode=disable"],
        ["--filter=nocache", "memory", "4M", "cachemode=none"],
        [
            "--filter=blocksize-policy",
            "memory",
            "4M",
            "blocksize-minimum=512",
            "blocksize-preferred=65536",
            "blocksize-maximum=1M",
        ],
        ["pattern", "4M"],
    ],
    ids=lambda a: " ".join(a),
)
def test_capabilities_are_passed_through_honestly(args: list[str]) -> None:
    with nbdkit_process(*args) as up, proxy(up) as px:
        direct, proxied = caps(up.uri), caps(px.uri)
    if direct["block_size"] == [0, 0, 0]:
        # The upstream sent no NBD_INFO_BLOCK_SIZE; trionbd always advertises the defaults.
        direct["block_size"] = [1, 4096, 32 * MiB]
    assert proxied == direct


def test_read_only_upstream_means_read_only_proxy() -> None:
    script = textwrap.dedent(
        """
        import nbd, sys
        h = nbd.NBD()
        h.connect_uri(sys.argv[1])
        print("read-only", h.is_read_only())
        try:
            h.pwrite(b"x", 0)
        except nbd.Error as e:
            print("write", e.errno)
        """
    )
    with nbdkit_process("-r", "memory", "1M") as up, proxy(up) as px:
        out = libnbd_python(script.replace("sys.argv[1]", repr(px.uri)))
    assert "read-only True" in out and "write EPERM" in out


def test_upstream_without_structured_replies(tmp_path: Path) -> None:
    data = random_file(tmp_path / "in.img", 3 * MiB)
    with nbdkit_process("--no-sr", "memory", "3M") as up, proxy(up) as px:
        run(["nbdcopy", str(tmp_path / "in.img"), px.uri])
        run(["nbdcopy", px.uri, str(tmp_path / "out.img")])
        mapped = run(["nbdinfo", "--map", px.uri]).split()
    assert (tmp_path / "out.img").read_bytes() == data
    # Without structured replies the upstream cannot report holes: all of it is data.
    assert mapped == ["0", str(3 * MiB), "0", "data"]


# --- upstream failure --------------------------------------------------------------------------


READ_LOOP = textwrap.dedent(
    """
    import nbd, sys
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    i = 0
    while True:
        print("reading", i, flush=True)
        try:
            h.pread(65536, (i * 65536) % h.get_size())
        except nbd.Error as e:
            print("error", e.errno, flush=True)
            break
        i += 1
    """
)


def wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 60) -> list[str]:
    """Lines of ``proc``'s stdout up to and including the first one starting with prefix."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting with {prefix!r} from {proc.args}: {lines}")


def test_upstream_killed_mid_read(tmp_path: Path) -> None:
    # Every upstream read takes 2 s; the log shows when one has reached the upstream.
    log = tmp_path / "upstream.log"
    args = ("--filter=log", "--filter=delay", "memory", "64M", "rdelay=2", f"logfile={log}")
    with nbdkit_process(*args) as up:
        with trionbd_process("-v", "nbd", f"socket={up.socket}") as px:
            client = subprocess.Popen(
                [SYSTEM_PYTHON, "-c", READ_LOOP, px.uri], stdout=subprocess.PIPE, text=True
            )
            try:
                wait_for_line(client, "reading 1")
                deadline = time.monotonic() + 60
                while "Read id=2 " not in log.read_text() and time.monotonic() < deadline:
                    time.sleep(0.02)
                up.proc.kill()  # read 1 is now waiting inside the upstream
                up.proc.wait()
                lines = wait_for_line(client, "error")
                assert lines[-1] == "error EIO"
                assert client.wait(30) == 0
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
            assert px.proc.poll() is None  # the proxy is still serving
            assert "connection lost with 1 request in flight" in px.stderr

            # New clients are refused cleanly while the upstream is gone...
            refused = subprocess.run(["nbdinfo", px.uri], capture_output=True, text=True)
            assert refused.returncode != 0
            assert px.proc.poll() is None
            # ...and served again once it is back on the same socket.
            os.unlink(up.socket)
            size = run(["nbdkit", "-U", up.socket, "memory", "5M", "--run",
                        f"nbdinfo --size '{px.uri}'"])  # fmt: skip
            assert size.strip() == str(5 * MiB)
        # trionbd_process: SIGTERM, then exit status 0 and no traceback are checked.


def test_upstream_killed_during_a_large_nbdcopy() -> None:
    with (
        nbdkit_process("pattern", "16G") as up,
        trionbd_process("nbd", f"socket={up.socket}") as px,
    ):
        copy = subprocess.Popen(
            ["nbdcopy", px.uri, "null:"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.0)  # copying 16 GiB takes far longer than this
            assert copy.poll() is None
            up.proc.send_signal(signal.SIGKILL)
            up.proc.wait()
            _, err = copy.communicate(timeout=60)
        finally:
            if copy.poll() is None:
                copy.kill()
                copy.wait()
        assert copy.returncode != 0
        assert "Input/output error" in err, err
        assert px.proc.poll() is None


def test_configuration_errors_exit_with_status_2() -> None:
    cases = [
        ([], "exactly one of uri=, socket= or hostname="),
        (["socket=/x", "hostname=h"], "exactly one of"),
        (["socket=/x", "port=99"], "port= goes with hostname="),
        (["hostname=h", "port=70000"], "not a TCP port"),
        (["nbds://h/x"], "TLS"),
        (["nbd+unix:///x?socket=/s", "export=y"], "the URI names an export"),
        (["http://h/"], "not an NBD URI"),
    ]
    for params, message in cases:
        result = trionbd_exit("nbd", *params)  # which also checks for no traceback
        assert result.returncode == 2, (params, result.stderr)
        assert message in result.stderr, (params, result.stderr)


def test_requests_in_flight_at_sigterm_finish_within_the_grace_period(tmp_path: Path) -> None:
    """SIGTERM lets in-flight reads finish: the upstream connections live until the
    clients are done (their reader tasks are not cancelled with the listeners)."""
    log = tmp_path / "upstream.log"
    args = ("--filter=log", "--filter=delay", "memory", "8M", "rdelay=1", f"logfile={log}")
    script = textwrap.dedent(
        """
        import nbd, sys
        h = nbd.NBD()
        h.connect_uri(sys.argv[1])
        h.pwrite(b"still here", 4096)
        print("reading", flush=True)
        print(h.pread(10, 4096), flush=True)
        """
    )
    with nbdkit_process(*args) as up:
        with trionbd_process("nbd", f"socket={up.socket}") as px:
            client = subprocess.Popen(
                [SYSTEM_PYTHON, "-c", script, px.uri], stdout=subprocess.PIPE, text=True
            )
            try:
                wait_for_line(client, "reading")
                deadline = time.monotonic() + 60
                while "Read id=" not in log.read_text() and time.monotonic() < deadline:
                    time.sleep(0.02)
                px.proc.send_signal(signal.SIGTERM)  # the read now waits upstream for 1 s
                lines = wait_for_line(client, "bytearray")
                assert lines[-1] == "bytearray(b'still here')"
                assert client.wait(30) == 0
                assert px.proc.wait(30) == 0
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
    assert "Disconnect" in log.read_text()  # the proxy said goodbye to the upstream


# --- extended headers through the proxy ------------------------------------------------------

GiB = 1024 * MiB


def log_lines(path: Path, action: str) -> list[str]:
    """The request lines of ``action`` (``Zero``, ``Extents``) in a log filter's file."""
    return [line for line in path.read_text().splitlines() if f" {action} id=" in line]


async def check_64_bit_requests(uri: str, hole_answered: int) -> None:
    """Through ``uri``: a 5 GiB zero between data, then block status of that hole (of
    which ``hole_answered`` bytes come in the first answer)."""
    async with await nbd.connect_uri(uri) as c:
        assert c.extended  # the proxy speaks extended headers to its clients
        for offset in (GiB - 4096, 6 * GiB):
            await c.pwrite(b"\xaa" * 8192, offset)
        await c.zero(5 * GiB, GiB)
        assert await c.pread(8192, GiB - 4096) == b"\xaa" * 4096 + bytes(4096)
        assert await c.pread(8192, 6 * GiB - 4096) == bytes(4096) + b"\xaa" * 4096
        extents = await c.block_status(5 * GiB, GiB)
        assert extents[0] == (GiB, hole_answered, 3)


def test_two_trionbd_servers_run_extended_end_to_end(tmp_path: Path) -> None:
    """The proxy's client negotiates extended headers upstream: a 5 GiB zero and a
    5 GiB block status reach the upstream server as one request each."""
    log = tmp_path / "up.log"
    with trionbd_process("--filter=log", "memory", str(8 * GiB), f"logfile={log}") as up:
        with proxy(up) as px:
            trio.run(check_64_bit_requests, px.uri, 5 * GiB)
            # qemu 10 through the proxy: extended headers with the proxy, the hole mapped.
            result = subprocess.run(
                [qemu10("qemu-img"), "--trace", "nbd_receive_option_reply", "map",
                 "--output=json", "-f", "raw", px.uri],
                capture_output=True, text=True, timeout=120, check=True,
            )  # fmt: skip
    assert "option reply 11 (extended headers), type 1 (ack)" in result.stderr
    assert {"start": GiB, "length": 5 * GiB, "data": False} in [
        {k: e[k] for k in ("start", "length", "data")} for e in json.loads(result.stdout)
    ]
    [zero] = log_lines(log, "Zero")
    assert f"offset=0x{GiB:x} count=0x{5 * GiB:x}" in zero
    assert any(f"offset=0x{GiB:x} count=0x{5 * GiB:x}" in e for e in log_lines(log, "Extents"))


def test_upstream_without_extended_headers_gets_pieces(tmp_path: Path) -> None:
    """nbdkit 1.32 has no extended headers: the proxy splits the 5 GiB zero into pieces
    of 2 GiB and asks block status for 2 GiB at most; the clients see no difference."""
    log = tmp_path / "up.log"
    with nbdkit_process("--filter=log", "memory", str(8 * GiB), f"logfile={log}") as up:
        with proxy(up) as px:
            trio.run(check_64_bit_requests, px.uri, 2 * GiB)
    zeroes = log_lines(log, "Zero")
    assert [line.split("count=")[1].split()[0] for line in zeroes] == [
        f"0x{2 * GiB:x}",
        f"0x{2 * GiB:x}",
        f"0x{GiB:x}",
    ]
    assert all(
        int(line.split("count=")[1].split()[0], 16) <= 2 * GiB for line in log_lines(log, "Extents")
    )


# --- metadata contexts: a dirty bitmap through the proxy -----------------------------------

KiB = 1024
G = 64 * KiB  # the bitmaps' granularity


@pytest.mark.parametrize("shared", [False, True], ids=["per-client", "shared"])
def test_a_dirty_bitmap_passes_through_a_proxy_of_trionbd(shared: bool) -> None:
    """trionbd with the dirty-bitmap filter behind trionbd's nbd plugin: writes through
    the proxy mark the bitmap, and qemu-img map (7.2 and 10) and libnbd read it through
    the proxy as they read it directly."""
    args = ["--filter=shared"] if shared else []
    with trionbd_process("--filter=dirty-bitmap", "memory", str(16 * MiB)) as up:
        with proxy(up, *args) as px:
            info = json.loads(run(["nbdinfo", "--json", px.uri]))
            assert info["exports"][0]["contexts"] == [
                "base:allocation",
                "qemu:dirty-bitmap:default",
            ]
            everyone_sees(px, [])
            run(["qemu-io", "-f", "raw", "-c", "write -P 1 100k 8k", "-c", "write -z 1M 200k",
                 "-c", "discard 8M 64k", px.uri])  # fmt: skip
            expected = [(G, G), (MiB, 4 * G), (8 * MiB, G)]
            everyone_sees(px, expected)
            everyone_sees(up, expected)


def test_each_exports_bitmap_passes_through(tmp_path: Path) -> None:
    for name in ("a.img", "b.img"):
        (tmp_path / name).write_bytes(bytes(MiB))
    with trionbd_process("--filter=dirty-bitmap", "file", f"dir={tmp_path}") as up:
        with proxy(up) as px:
            run(["qemu-io", "-f", "raw", "-c", "write 0 1", px.uri_for("b.img")])
            listed = json.loads(run(["nbdinfo", "--list", "--json", px.uri]))
            contexts = {e["export-name"]: e["contexts"] for e in listed["exports"]}
            assert contexts == {
                "a.img": ["base:allocation", "qemu:dirty-bitmap:a.img"],
                "b.img": ["base:allocation", "qemu:dirty-bitmap:b.img"],
            }
            assert qemu_map("qemu-img", px, "a.img", "a.img") == []
            assert qemu_map("qemu-img", px, "b.img", "b.img") == [(0, G)]


@contextmanager
def qemu_nbd(tool: str, *args: str) -> Iterator[Running]:
    """``qemu-nbd -k SOCK -t ARGS`` (``tool`` is its path) until the block ends."""
    with short_tmpdir() as tmp:
        sock, pidfile, stderr_path = str(tmp / "sock"), tmp / "pid", tmp / "stderr"
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(
                [tool, "-k", sock, "--pid-file", str(pidfile), "-t", *args],
                stdout=err, stderr=err, text=True,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not pidfile.exists():
                assert proc.poll() is None and time.monotonic() < deadline, (
                    f"qemu-nbd did not start: {stderr_path.read_text()}"
                )
                time.sleep(0.02)
            yield Running(proc, f"nbd+unix:///?socket={sock}", sock, stderr_path)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("qemu", ["7.2", "10"])
def test_a_qcow2_bitmap_exported_by_qemu_nbd_passes_through(qemu: str, tmp_path: Path) -> None:
    """A persistent bitmap of a qcow2 image, exported by qemu-nbd with -B, read through
    the proxy. qemu-nbd 10 speaks extended headers to the proxy (block status then names
    its one context), 7.2 does not (it answers both contexts every time)."""
    tool = (lambda name: name) if qemu == "7.2" else qemu10
    image = str(tmp_path / "disk.qcow2")
    run([tool("qemu-img"), "create", "-f", "qcow2", image, "16M"])
    run([tool("qemu-img"), "bitmap", "--add", image, "backup"])
    run([tool("qemu-io"), "-f", "qcow2", "-c", "write -P 3 1M 4k", "-c", "write -P 4 5M 128k",
         image])  # fmt: skip
    with qemu_nbd(tool("qemu-nbd"), "-f", "qcow2", "-B", "backup", image) as up:
        with proxy(up) as px:
            expected = [(MiB, G), (5 * MiB, 2 * G)]
            assert qemu_map("qemu-img", up, "backup") == expected  # directly
            everyone_sees(px, expected, bitmap="backup")
            run(["nbdcopy", px.uri, str(tmp_path / "copy.img")])
    want = bytearray(16 * MiB)
    want[MiB : MiB + 4 * KiB] = b"\x03" * (4 * KiB)
    want[5 * MiB : 5 * MiB + 2 * G] = b"\x04" * (2 * G)
    assert (tmp_path / "copy.img").read_bytes() == want
