"""Graceful drain with many clients in different states at SIGTERM (tests/interop/
test_signals covers one FUA writer, nbdcopy, grace expiry and repeated signals):

- eight libnbd writers with writes in flight, plain and FUA, and flushes;
- clients whose replies do not drain (a large read nobody reads);
- clients in the middle of the handshake.

The server must exit cleanly within the grace period, and every write acknowledged to
any client, flushed or not, must be in the file afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.reliability.raw import RawClient
from tests.support import SYSTEM_PYTHON, trionbd_process
from trionbd.protocol import Cmd

BLOCK = 64 * 1024
WRITERS = 8
REGION = 2 * 1024 * 1024
READS = WRITERS * REGION
"""Where the 40 MiB of random data the stuck readers ask for begin."""
GRACE = 2.0

WRITER = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
base, region, block, seed = (int(a) for a in sys.argv[2:])
in_flight, n = {}, 0
count = region // block
try:
    while True:
        busy = {w[1] for w in in_flight.values() if w}
        while len(in_flight) < 8 and n % count not in busy:
            index = n % count
            data = bytes([(seed * 31 + n) % 251 + 1]) * block
            flags = nbd.CMD_FLAG_FUA if n % 3 == 0 else 0
            cookie = h.aio_pwrite(data, base + index * block, flags=flags)
            in_flight[cookie] = (n, index, data[0])
            busy.add(index)
            n += 1
            if n % 8 == 0:
                in_flight[h.aio_flush()] = None
        h.poll(-1)
        for cookie in list(in_flight):
            if h.aio_command_completed(cookie):
                done = in_flight.pop(cookie)
                if done is not None:
                    print(*done, flush=True)  # acknowledged: sequence, block, its byte
except nbd.Error as e:
    print("stopped:", e, file=sys.stderr)
"""
"""Rewrites the blocks of its region over and over, 8 requests in flight (never two on
one block), a third of them FUA, a flush after every 8; prints each acknowledged write."""


def stuck_reader(path: str, stop: threading.Event) -> None:
    """A client that asks for 32 MiB of data and reads the replies a byte at a time."""
    with RawClient(path) as c:
        c.go()
        c.send(b"".join(c.request(i, Cmd.READ, READS + i * BLOCK, 8 << 20) for i in range(4)))
        while not stop.is_set():
            try:
                if not c.sock.recv(1):
                    return
            except OSError:
                return
            time.sleep(0.05)


def half_handshake(path: str) -> socket.socket:
    c = RawClient(path)
    c.greeting()
    c.send(b"\x00\x03\xe8")  # the first bytes of an option header
    return c.sock


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_sigterm_drains_every_kind_of_client_within_the_grace_period(
    tmp_path: Path, workers: int
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(READS) + os.urandom(40 << 20))
    args = (f"--workers={workers}", f"--shutdown-timeout={GRACE}", "--filter=delay", "file",
            str(disk), "wdelay=20ms")  # fmt: skip
    with trionbd_process(*args) as server:
        writers = [
            subprocess.Popen(
                [
                    SYSTEM_PYTHON,
                    "-c",
                    WRITER,
                    server.uri,
                    *map(str, (i * REGION, REGION, BLOCK, i)),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for i in range(WRITERS)
        ]
        stop = threading.Event()
        readers = [
            threading.Thread(target=stuck_reader, args=(server.socket, stop)) for _ in range(2)
        ]
        for t in readers:
            t.start()
        handshakes = [half_handshake(server.socket) for _ in range(2)]
        pipes = [w.stdout for w in writers if w.stdout is not None]
        firsts = [pipe.readline() for pipe in pipes]  # every writer is well under way
        assert all(firsts)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        server.proc.wait(30)
        took = time.monotonic() - signalled
        stop.set()
        # Not communicate(): it reads the pipe itself and would skip what readline()
        # already buffered, cutting a line in two.
        outputs = [first + pipe.read() for first, pipe in zip(firsts, pipes, strict=True)]
        for w in writers:
            w.wait(30)
        for t in readers:
            t.join()
        for sock in handshakes:
            sock.close()
    # trionbd_process checked the clean exit (status 0, no traceback).
    assert took < GRACE + 3, f"exit took {took:.1f}s with a {GRACE}s grace period"
    data = disk.read_bytes()
    acknowledged = 0
    for i, out in enumerate(outputs):
        latest: dict[int, tuple[int, int]] = {}
        for line in out.splitlines():
            n, index, byte = map(int, line.split())
            if index not in latest or latest[index][0] < n:
                latest[index] = (n, byte)  # a block is rewritten: the last write counts
            acknowledged += 1
        for index, (_, byte) in latest.items():
            offset = i * REGION + index * BLOCK
            assert data[offset : offset + BLOCK] == bytes([byte]) * BLOCK, (i, index)
    print(f"\n{acknowledged} acknowledged writes, all in the file; exit {took:.2f}s after SIGTERM")
    assert acknowledged > WRITERS
