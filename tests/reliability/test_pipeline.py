"""10 000 READ requests sent back to back on one connection before any reply is read:
every one is answered, once, with the right data for its cookie."""

from __future__ import annotations

import random
import socket

import pytest

from tests.reliability.raw import RawClient
from tests.support import trionbd_process
from trionbd.plugins.pattern import pattern_bytes
from trionbd.protocol import Cmd, DataChunk, SimpleReply

REQUESTS = 10_000
SIZE = 64 << 20


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize(
    "chain", [("pattern", str(SIZE)), ("--filter=delay", "pattern", str(SIZE))],
    ids=["inline", "tasks"],
)  # fmt: skip
def test_ten_thousand_pipelined_reads_are_all_answered(
    chain: tuple[str, ...], structured: bool, workers: int
) -> None:
    rng = random.Random(10_000)
    with trionbd_process(f"--workers={workers}", *chain) as server, RawClient(server.socket) as c:
        c.go(structured=structured)
        # Room for the whole request stream while the server, whose replies we do not
        # read yet, has stopped reading (the kernel caps this; 280 kB fit either way).
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        wanted: dict[int, tuple[int, int]] = {}
        stream = []
        for cookie in range(1, REQUESTS + 1):
            length = rng.choice([1, 512, 4096, 4096, 16384])
            offset = rng.randrange(SIZE - length)
            wanted[cookie] = (offset, length)
            stream.append(c.request(cookie, Cmd.READ, offset, length))
        c.send(b"".join(stream))  # raises (timeout) if the server stopped taking them
        for _ in range(REQUESTS):
            [event] = c.reply()
            assert isinstance(event, SimpleReply | DataChunk), event
            offset, length = wanted.pop(event.cookie)
            if isinstance(event, DataChunk):
                assert event.offset == offset and event.done
            else:
                assert event.error == 0
            assert event.data == pattern_bytes(length, offset), event.cookie
        assert not wanted
