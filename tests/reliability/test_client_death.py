"""Clients that die at random points: mid-handshake, mid-request, mid-reply, with
requests in flight. Each dies with a reset (SO_LINGER 0). Afterwards the server holds no
more file descriptors than before and its memory has not grown beyond a bound, and a
well-formed client is served.

``TRIONBD_DEATHS`` sets the number of deaths per server and phase (default 300): a warm-up
phase, after which the descriptors and resident memory are taken as the baseline, then
the measured phase. A leak of a connection's 256 KiB receive buffer alone would grow the
memory by 75 MiB over the measured phase.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.raw import RawClient, check_served, fd_count, rss, settle
from tests.support import trionbd_process
from trionbd.protocol import Cmd, Opt, wire

DEATHS = int(os.environ.get("TRIONBD_DEATHS", "300"))
THREADS = 8
SIZE = 64 << 20
WRITTEN = 4 << 20
"""Writes stay in the first 4 MiB (filled before the baseline is taken), so the memory
disk itself does not grow during the test."""
RSS_GROWTH = 16 << 20
"""Allowed growth of the server's resident memory over the measured phase (with
STEADY_MALLOC it grew by 0 to 3 MiB in runs under load; a leaked receive buffer per
connection would add 75 MiB)."""

STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
"""For the server: glibc serves every block of 64 KiB or more (receive buffers, read
payloads) with its own mmap and returns it at free. Left to itself, glibc raises that
threshold after such a free, and the next big blocks come from the heap, whose
fragmentation then moved the resident memory by up to +33 MiB between runs under load:
noise that hid what the test looks for."""

KiB = 1024


def _greeting_only(c: RawClient, rng: random.Random) -> None:
    c.event()


def _half_flags(c: RawClient, rng: random.Random) -> None:
    c.event()
    c.send(b"\0\0")


def _half_option(c: RawClient, rng: random.Random) -> None:
    c.greeting()
    option = wire.option_request(Opt.GO, wire.name_and_infos("", [1, 2, 3]))
    c.send(option[: rng.randrange(1, len(option))])


def _option_unanswered(c: RawClient, rng: random.Random) -> None:
    c.greeting()
    c.send(wire.option_request(Opt.LIST))


def _half_header(c: RawClient, rng: random.Random) -> None:
    c.go()
    c.send(c.request(1, Cmd.READ, 0, 4096)[: rng.randrange(1, 28)])


def _half_write_payload(c: RawClient, rng: random.Random) -> None:
    c.go()
    length = rng.choice([64 * KiB, 1024 * KiB, 8192 * KiB])
    data = c.request(1, Cmd.WRITE, 0, length, bytes(length))
    c.send(data[: rng.randrange(29, len(data))])


def _write_unacknowledged(c: RawClient, rng: random.Random) -> None:
    c.go()
    offset = rng.randrange(0, WRITTEN - 65536, 4096)
    c.send(c.request(1, Cmd.WRITE, offset, 65536, rng.randbytes(65536)))


def _mid_reply(c: RawClient, rng: random.Random) -> None:
    c.go(structured=rng.random() < 0.5)
    c.send(c.request(1, Cmd.READ, 0, 32 << 20))
    c.sock.recv(rng.randrange(1, 256 * KiB))


def _many_in_flight(c: RawClient, rng: random.Random) -> None:
    c.go()
    c.send(b"".join(c.request(i, Cmd.READ, i * 65536, 256 * KiB) for i in range(1, 200)))
    if rng.random() < 0.5:
        c.sock.recv(rng.randrange(1, 1 << 20))


def _after_disc(c: RawClient, rng: random.Random) -> None:
    c.go()
    c.send(c.request(1, Cmd.READ, 0, 1 << 20) + c.request(0, Cmd.DISC))


DEATH: list[Callable[[RawClient, random.Random], None]] = [
    _greeting_only,
    _half_flags,
    _half_option,
    _option_unanswered,
    _half_header,
    _half_write_payload,
    _write_unacknowledged,
    _mid_reply,
    _many_in_flight,
    _after_disc,
]


def die(path: str, death: Callable[[RawClient, random.Random], None], rng: random.Random) -> None:
    c = RawClient(path)
    try:
        death(c, rng)
    finally:
        c.reset()


@pytest.mark.parametrize(
    "chain",
    [
        ("memory", str(SIZE)),
        ("--filter=delay", "memory", str(SIZE), "rdelay=1ms"),
        ("--workers=2", "--filter=delay", "file", "DISK", "rdelay=1ms"),
    ],
    ids=["inline", "tasks", "two-workers"],
)
def test_dying_clients_leak_no_descriptors_and_no_memory(
    chain: tuple[str, ...], tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    chain = tuple(str(disk) if word == "DISK" else word for word in chain)
    with trionbd_process(*chain, env={**os.environ, **STEADY_MALLOC}) as server:
        pid = server.proc.pid
        idle_fds = fd_count(pid)  # the listening socket, the log, ...: no client yet
        with RawClient(server.socket) as c:  # fill the region the writes touch
            c.go()
            for offset in range(0, WRITTEN, 1 << 20):
                c.send(c.request(1, Cmd.WRITE, offset, 1 << 20, bytes(1 << 20)))
                c.reply()

        def killer(seed: int, deaths: int) -> None:
            rng = random.Random(seed)
            for i in range(deaths):
                die(server.socket, DEATH[i] if i < len(DEATH) else rng.choice(DEATH), rng)

        def kill(deaths: int, seed: int) -> None:
            threads = [
                threading.Thread(target=killer, args=(seed + i, deaths // THREADS))
                for i in range(THREADS)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            check_served(server.socket)

        kill(DEATHS, 0)  # warm-up: the baseline includes warm caches and arenas
        assert settle(lambda: fd_count(pid), idle_fds) <= idle_fds
        memory = rss(pid)
        kill(DEATHS, 100)
        fds = settle(lambda: fd_count(pid), idle_fds)
        memory_after = rss(pid)
        print(f"{chain}: fds {idle_fds} -> {fds}, RSS {memory >> 20} -> {memory_after >> 20} MiB")
        assert fds <= idle_fds
        assert memory_after - memory < RSS_GROWTH, (memory, memory_after)
