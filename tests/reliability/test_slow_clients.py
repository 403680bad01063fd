"""Slow and idle clients against the real server: they cost it nothing but a socket
until the handshake (or idle) timeout closes them, and normal clients are served
meanwhile; a client asking about thousands of exports on one connection is not cut off
by the same timeout, because it applies per option."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from tests.support import SYSTEM_PYTHON, run, trionbd_process
from trionbd.protocol import Opt, wire

SLOW = 100
TIMEOUT = 2.0


async def slow_client(path: str, trickle: bool, closed: dict[int, float], index: int) -> None:
    """Connect; then say nothing, or send a GO option one byte a second. Records when
    the server closed the connection."""
    stream = await trio.open_unix_socket(path)
    option = wire.option_request(Opt.GO, wire.name_and_infos("", []))
    stream_bytes = b"\x00\x00\x00\x03" + option

    async def trickle_bytes() -> None:
        for byte in stream_bytes:
            try:
                await stream.send_all(bytes([byte]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep(1)

    async with stream, trio.open_nursery() as nursery:
        if trickle:
            nursery.start_soon(trickle_bytes)
        try:
            while await stream.receive_some(1 << 16):
                pass  # the greeting
        except trio.BrokenResourceError:
            pass
        closed[index] = time.monotonic()
        nursery.cancel_scope.cancel()


async def test_slow_and_silent_clients_are_closed_and_others_served() -> None:
    with trionbd_process("-v", f"--handshake-timeout={TIMEOUT}", "memory", "1M") as server:
        closed: dict[int, float] = {}
        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i in range(SLOW):
                nursery.start_soon(slow_client, server.socket, i % 2 == 1, closed, i)
            await trio.sleep(0.2)  # all connected and greeted
            # A normal client is served at once, while every slow one is still there.
            out = await trio.run_process(
                ["nbdinfo", "--size", server.uri], capture_stdout=True, capture_stderr=True
            )
            assert out.stdout.decode().strip() == "1048576"
            served = time.monotonic()
            assert not closed, f"{len(closed)} slow clients were closed before nbdinfo ran"
        assert len(closed) == SLOW
        assert served - start < TIMEOUT
        first, last = min(closed.values()) - start, max(closed.values()) - start
        # Not before the timeout; all of them soon after it (generous: a loaded machine).
        assert TIMEOUT - 0.2 <= first and last < TIMEOUT + 8, (first, last)
        print(f"\n{SLOW} slow clients closed {first:.2f}..{last:.2f}s after connecting")
        log = server.stderr
    assert log.count(f"no complete option within {TIMEOUT}s") == SLOW, log


def test_a_long_listing_is_not_cut_off_by_the_handshake_timeout(tmp_path: Path) -> None:
    """nbdinfo --list asks about every export on one connection. Opening each export
    takes 50 ms here (the delay filter), so listing 60 of them takes 3 s, three times the
    handshake timeout; but no single option takes longer than the timeout."""
    directory = tmp_path / "many"
    directory.mkdir()
    for i in range(60):
        (directory / f"disk{i:02}").write_bytes(b"x" * 512)
    args = ("-v", "--handshake-timeout=1", "--filter=delay", "file", f"dir={directory}",
            "delay-open=50ms")  # fmt: skip
    with trionbd_process(*args) as server:
        start = time.monotonic()
        listing = run(["nbdinfo", "--list", "--json", server.uri])
        took = time.monotonic() - start
        log = server.stderr
    assert took > 3.0  # the premise: the whole listing outlasts the timeout threefold
    assert listing.count('"export-name"') == 60
    assert "handshake timeout" not in log


async def test_idle_timeout_closes_a_connected_client() -> None:
    with trionbd_process("-v", "--idle-timeout=1", "memory", "1M") as server:
        script = (
            "import nbd, sys, time\n"
            "h = nbd.NBD()\n"
            "h.connect_uri(sys.argv[1])\n"
            "h.pread(512, 0)\n"
            "time.sleep(3)\n"
            "try:\n"
            "    h.pread(512, 0)\n"
            "except nbd.Error as e:\n"
            "    print('closed:', e)\n"
        )
        out = await trio.run_process([SYSTEM_PYTHON, "-c", script, server.uri], capture_stdout=True)
        log = server.stderr
    assert out.stdout.decode().startswith("closed:"), out.stdout
    assert "idle for 1.0s with no request in flight (idle timeout); closing" in log
