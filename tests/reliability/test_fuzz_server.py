"""Mutated handshakes and requests against the real server, from a fixed seed.

Every case opens a connection, sends a mutated session, half-closes and reads until the
server closes. After every 100 cases a well-formed client must be served (write, read
back, disconnect); at the end the server has no more file descriptors than when it
started, and its log holds no internal error or traceback (``trionbd_process`` checks
the traceback and the clean exit).

``TRIONBD_FUZZ_CASES`` sets the number of cases per server (default 2500, so 5000 in
all); ``TRIONBD_FUZZ_SEED`` the seed.
"""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from tests.reliability.raw import check_served, fd_count, settle
from tests.support import trionbd_process
from trionbd.protocol import Cmd, CmdFlag, Opt, wire
from trionbd.protocol.constants import BASE_ALLOCATION

CASES = int(os.environ.get("TRIONBD_FUZZ_CASES", "2500"))
SEED = int(os.environ.get("TRIONBD_FUZZ_SEED", "20261126"))
CHECK_EVERY = 100
SIZE = 1 << 20

FLAGS = b"\x00\x00\x00\x03"
OPTIONS_SR = b"".join(
    [
        wire.option_request(Opt.STRUCTURED_REPLY),
        wire.option_request(Opt.LIST),
        wire.option_request(Opt.INFO, wire.name_and_infos("", [0, 1, 2, 3])),
        wire.option_request(Opt.LIST_META_CONTEXT, wire.name_and_queries("", ["base:"])),
        wire.option_request(Opt.SET_META_CONTEXT, wire.name_and_queries("", [BASE_ALLOCATION])),
        wire.option_request(77, b"unknown option payload"),
        wire.option_request(Opt.GO, wire.name_and_infos("", [3])),
    ]
)


def requests(structured: bool) -> bytes:
    out = [
        wire.request(1, Cmd.WRITE, CmdFlag.FUA, 4096, 512) + b"w" * 512,
        wire.request(2, Cmd.READ, 0, 0, 8192),
        wire.request(3, Cmd.READ, CmdFlag.DF if structured else 0, 4096, 512),
        wire.request(4, Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE, 0, 65536),
        wire.request(5, Cmd.TRIM, 0, 65536, 65536),
        wire.request(6, Cmd.FLUSH, 0, 0, 0),
        wire.request(7, Cmd.CACHE, 0, 0, 4096),
        wire.request(8, Cmd.WRITE, 0, SIZE - 3, 3) + b"end",
    ]
    if structured:
        out.append(wire.request(9, Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, SIZE))
    out.append(wire.request(10, Cmd.DISC, 0, 0, 0))
    return b"".join(out)


SESSIONS = [
    FLAGS + OPTIONS_SR + requests(True),
    FLAGS + wire.option_request(Opt.GO, wire.name_and_infos("", [])) + requests(False),
    FLAGS + wire.option_request(Opt.EXPORT_NAME, b"") + requests(False),
    FLAGS + wire.option_request(Opt.STARTTLS) + wire.option_request(Opt.ABORT),
]

INTERESTING_32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4096, 4097, 1 << 26, (1 << 26) + 1]
INTERESTING_64 = [0, 1 << 63, (1 << 64) - 1, (1 << 64) - 4096, SIZE, SIZE - 1, 1 << 40]


def mutate(rng: random.Random, session: bytes) -> bytes:
    data = bytearray(session)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["flip", "byte", "insert", "delete", "truncate", "u32", "u64", "dup"])
        pos = rng.randrange(len(data)) if data else 0
        if kind == "flip" and data:
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == "byte" and data:
            data[pos] = rng.randrange(256)
        elif kind == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 32))
        elif kind == "delete":
            del data[pos : pos + rng.randint(1, 16)]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "u32":
            data[pos : pos + 4] = struct.pack(">I", rng.choice(INTERESTING_32))
        elif kind == "u64":
            data[pos : pos + 8] = struct.pack(">Q", rng.choice(INTERESTING_64))
        else:
            piece = data[pos : pos + rng.randint(1, 64)]
            data[pos:pos] = piece
    return bytes(data)


def play(path: str, data: bytes) -> int:
    """Send ``data``, half-close, read until the server closes; the bytes received."""
    received = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already hung up on an earlier part
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
    return received


@pytest.mark.parametrize(
    "chain",
    [("memory", str(SIZE)), ("--filter=delay", "memory", str(SIZE))],
    ids=["inline", "tasks"],
)
def test_mutated_sessions_never_hurt_the_server(chain: tuple[str, ...]) -> None:
    rng = random.Random(f"{SEED}-{chain[0]}")
    with trionbd_process(*chain) as server:
        pid = server.proc.pid
        check_served(server.socket)
        baseline = fd_count(pid)
        replies = 0
        for case in range(1, CASES + 1):
            replies += play(server.socket, mutate(rng, rng.choice(SESSIONS)))
            if case % CHECK_EVERY == 0:
                assert server.proc.poll() is None, f"server died at case {case}"
                check_served(server.socket)
        assert replies > 0  # the mutations did not all die at the first byte
        assert settle(lambda: fd_count(pid), baseline) <= baseline
        log = server.stderr
    assert "internal error" not in log and "failed unexpectedly" not in log, log
