"""The http plugin against a server of faults (tests/remote/servers.py): HEAD refused,
ranges ignored, 503 storms, connections dropped mid-body, slow bodies, short and
over-long bodies, 4xx, and a client that dies with a read in flight."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.raw import RawClient
from tests.remote.servers import FaultServer, fault_server
from tests.support import libnbd_python, read_export, trionbd_exit, trionbd_process, wait_until
from trionbd.protocol.constants import Cmd

SIZE = 3 * (1 << 20) + 333

READ = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(URI)
for offset, count in CALLS:
    try:
        data = h.pread(count, offset)
        print("ok", data == EXPECT[offset:offset + count])
    except nbd.Error as e:
        print("error", e.errno, e.string)
h.shutdown()
"""


def reads(uri: str, data: bytes, calls: list[tuple[int, int]]) -> list[str]:
    """Each read of ``calls`` through libnbd: "ok True" (right bytes) or "error ERRNO ..."."""
    script = (
        READ.replace("URI", repr(uri))
        .replace("CALLS", repr(calls))
        .replace("EXPECT", f"open({str(EXPECTED)!r}, 'rb').read()")
    )
    EXPECTED.write_bytes(data)
    return libnbd_python(script).splitlines()


EXPECTED = Path("/tmp") / f"trionbd-http-faults-{random.randrange(1 << 30)}.img"


@pytest.fixture
def server() -> Iterator[FaultServer]:
    data = random.Random(3).randbytes(SIZE)
    with fault_server(data) as s:
        yield s
    EXPECTED.unlink(missing_ok=True)


FAST = ("retry-delay=0.01",)


# --- start-up ------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [403, 405, 500, "drop"])
def test_head_refused_or_failed_gives_the_size_from_a_range(
    server: FaultServer, head: int | str, tmp_path: Path
) -> None:
    server.faults.head = head
    with trionbd_process("--workers=1", "http", server.url, *FAST) as nbd:  # one start-up
        assert read_export(nbd.uri, tmp_path) == server.data
    assert server.requests[0] == ("HEAD", None)
    assert server.requests[1] == ("GET", "bytes=0-0")


def test_a_server_ignoring_ranges_is_refused_without_reading_the_body() -> None:
    big = bytes(256 << 20)  # the body it would send: 256 MiB
    with fault_server(big) as server:
        server.faults.plan = ["whole"]
        result = trionbd_exit("http", server.url)
        assert result.returncode == 1
        assert "ignored the range" in result.stderr
        assert "answered 200 with the whole body" in result.stderr
        wait_until(server.broken.is_set, "the server noticed the client hung up")
        assert server.sent < 64 << 20


def test_start_up_retries_a_storm_then_fails(server: FaultServer) -> None:
    server.faults.head = 503
    server.faults.plan = [503] * 3
    with trionbd_process("--workers=1", "http", server.url, "retries=3", *FAST):
        pass
    assert server.gets() == 4
    server.faults.plan = [503] * 3
    result = trionbd_exit("--workers=1", "http", server.url, "retries=2", *FAST)
    assert result.returncode == 1
    assert "HTTP 503" in result.stderr and "after 3 attempts" in result.stderr


# --- reads ---------------------------------------------------------------------------------


def test_503_storms_are_retried_with_backoff(server: FaultServer) -> None:
    with trionbd_process("http", server.url, "retries=4", "retry-delay=0.05", "-v") as nbd:
        before = server.gets()
        server.faults.plan = [503, 502, 500, 429]
        started = time.monotonic()
        assert reads(nbd.uri, server.data, [(4096, 65536)]) == ["ok True"]
        elapsed = time.monotonic() - started
        assert server.gets() - before == 5
        assert elapsed >= 0.05 + 0.1 + 0.2 + 0.4  # the backoff doubles
        server.faults.plan = [503] * 5
        out = reads(nbd.uri, server.data, [(0, 512), (8192, 512)])
        assert out[0].startswith("error EIO ")  # EIO
        assert out[1] == "ok True"  # the next read goes through
        assert "HTTP 503 Service Unavailable" in nbd.stderr
        assert "after 5 attempts" in nbd.stderr


@pytest.mark.parametrize("fault", ["drop", "slow"])
def test_a_body_cut_off_or_too_slow_is_retried(server: FaultServer, fault: str) -> None:
    server.faults.slow = 30
    with trionbd_process("http", server.url, "timeout=1", *FAST) as nbd:
        server.faults.plan = [fault, fault]
        before = server.gets()
        calls = [(1000, 200_000), (SIZE - 5000, 5000)]
        assert reads(nbd.uri, server.data, calls) == ["ok True", "ok True"]
        assert server.gets() - before == 4


@pytest.mark.parametrize("fault", [404, 403, 416, "short", "long", "wrong-range", "whole"])
def test_final_faults_fail_at_once_and_never_give_data(
    server: FaultServer, fault: int | str
) -> None:
    with trionbd_process("http", server.url, *FAST) as nbd:
        server.faults.plan = [fault]
        before = server.gets()
        out = reads(nbd.uri, server.data, [(100, 4096), (100, 4096)])
        assert out[0].startswith("error EIO "), out  # EIO, not data
        assert out[1] == "ok True"
        assert server.gets() - before == 2  # not retried
        log = nbd.stderr
    expected = {
        404: "HTTP 404",
        403: "HTTP 403",
        416: "HTTP 416",
        "short": "sends 4095 bytes for 4096",
        "long": "sends 4097 bytes for 4096",
        "wrong-range": "the server sent 'bytes 101-4196",
        "whole": "ignored the range",
    }[fault]
    assert expected in log


def test_a_dead_client_cancels_its_read_in_flight(server: FaultServer) -> None:
    server.faults.trickle = 0.05  # a 64 KiB body would take an hour
    with trionbd_process("http", server.url, *FAST) as nbd:
        server.faults.plan = ["trickle"]
        before = server.gets()
        client = RawClient(nbd.socket)
        client.go("")
        client.send(client.request(7, Cmd.READ, 0, 65536))
        wait_until(lambda: server.gets() > before, "the read reached the server")
        client.reset()  # the client is gone
        wait_until(server.broken.is_set, "trionbd dropped the GET of the dead client", 20)
        assert reads(nbd.uri, server.data, [(5, 100)]) == ["ok True"]
