"""Blocking raw-socket clients and process probes for the reliability tests.

A :class:`RawClient` speaks NBD through the sans-IO :class:`ClientConnection` on a plain
socket, so a test controls every byte (and can break off anywhere; tests/chain/
raw_client.py greets on construction and adds conveniences for option replies);
:func:`fd_count` and :func:`rss` look at the server's processes (one, or a supervisor
and its workers) from outside through ``/proc``.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable

from trionbd.protocol import (
    NEED_DATA,
    REP_FLAG_ERROR,
    ClientConnection,
    Cmd,
    ConnectionClosed,
    Opt,
    OptionReply,
    Rep,
    SimpleReply,
    wire,
)
from trionbd.protocol.client import ClientEvent
from trionbd.protocol.events import Chunk

TIMEOUT = 30.0


class RawClient:
    """One blocking connection to a server on a Unix socket."""

    def __init__(self, path: str, timeout: float = TIMEOUT):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.proto = ClientConnection()
        self.size = 0
        self.flags = 0

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def event(self) -> ClientEvent:
        """The next event from the server (``ConnectionClosed`` at a clean EOF)."""
        while True:
            event = self.proto.next_event()
            if event is not NEED_DATA:
                return event  # type: ignore[return-value]
            self.proto.receive_data(self.sock.recv(1 << 20))

    def greeting(self) -> None:
        self.event()
        self.send(self.proto.client_flags())

    def option(self, option: int, payload: bytes = b"") -> list[OptionReply]:
        self.send(self.proto.option(option, payload))
        replies: list[OptionReply] = []
        while True:
            event = self.event()
            assert isinstance(event, OptionReply), event
            replies.append(event)
            if event.reply == Rep.ACK or event.reply & REP_FLAG_ERROR:
                return replies

    def go(self, name: str = "", structured: bool = True) -> None:
        """Negotiate ``name`` and enter transmission."""
        self.greeting()
        if structured:
            assert self.option(Opt.STRUCTURED_REPLY)[-1].reply == Rep.ACK
        replies = self.option(Opt.GO, wire.name_and_infos(name, []))
        assert replies[-1].reply == Rep.ACK, replies
        export = replies[0].payload
        self.size = int.from_bytes(export[2:10], "big")
        self.flags = int.from_bytes(export[10:12], "big")

    def request(
        self, cookie: int, command: int, offset: int = 0, length: int = 0, data: bytes = b"",
        flags: int = 0,
    ) -> bytes:  # fmt: skip
        """The bytes of one request (the caller sends them, maybe in pieces)."""
        return self.proto.request(cookie, command, flags, offset, length, data)

    def reply(self) -> list[ClientEvent]:
        """The events of the next complete reply (all chunks up to DONE)."""
        out: list[ClientEvent] = []
        while True:
            event = self.event()
            assert not isinstance(event, ConnectionClosed), "server closed the connection"
            out.append(event)
            if isinstance(event, SimpleReply) or (isinstance(event, Chunk) and event.done):
                return out

    def reset(self) -> None:
        """Die abruptly: close with SO_LINGER 0, so the server gets a reset."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def eof(self) -> bool:
        """True once the server has closed the connection (reading and dropping data)."""
        try:
            while self.sock.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        return True


def check_served(path: str, cookie_base: int = 1) -> None:
    """A well-formed client writes a block, reads it back and disconnects."""
    with RawClient(path) as c:
        c.go()
        block = os.urandom(4096)
        c.send(c.request(cookie_base, Cmd.WRITE, 8192, 4096, block))
        [ack] = c.reply()
        assert isinstance(ack, SimpleReply) and ack.error == 0, ack
        c.send(c.request(cookie_base + 1, Cmd.READ, 8192, 4096))
        [data] = c.reply()
        assert getattr(data, "data", None) == block, data
        c.send(c.request(0, Cmd.DISC))
        assert c.eof()


def processes(pid: int) -> list[int]:
    """A server's processes: ``pid`` and its children (the worker processes of
    ``--workers``; the supervisor does not start other children while serving)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [pid, *map(int, f.read().split())]


def fd_count(pid: int) -> int:
    """Open descriptors of a server (of all its processes)."""
    count = 0
    for p in processes(pid):
        try:
            count += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:  # a worker that has just exited
            pass
    return count


def rss(pid: int) -> int:
    """Resident set size of a server (summed over its processes), in bytes."""
    total = 0
    for p in processes(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += sum(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except OSError:
            pass
    assert total, f"no VmRSS for {pid}"
    return total


def settle(probe: Callable[[], int], target: int, timeout: float = 20.0) -> int:
    """Poll ``probe`` until it is at most ``target`` (or the time is up); its last value."""
    deadline = time.monotonic() + timeout
    value = probe()
    while value > target and time.monotonic() < deadline:
        time.sleep(0.05)
        value = probe()
    return value
