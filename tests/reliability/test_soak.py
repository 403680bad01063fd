"""Soak: 200 clients at once, mixed reads and writes on one memory export, each checking
its own region against a model of what it wrote. Zero errors allowed.

The clients are tasks of this process using ``trionbd.client``; the server is the real
command. ``TRIONBD_SOAK_SECONDS`` sets the duration (default 5 for CI; the full run is
``TRIONBD_SOAK_SECONDS=20``). The requests per second and the server's descriptors and
memory before and after are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import trio

import trionbd.client
from tests.reliability.raw import fd_count, rss, settle
from tests.support import trionbd_process
from trionbd.protocol import CmdFlag

SECONDS = float(os.environ.get("TRIONBD_SOAK_SECONDS", "5"))
CLIENTS = 200
REGION = 256 * 1024
SIZE = CLIENTS * REGION
BLOCK = 512


class Run:
    """What the clients share: the start signal, the end time, the counts."""

    def __init__(self) -> None:
        self.all_connected = trio.Event()
        self.go = trio.Event()
        self.deadline = 0.0
        self.connected = 0
        self.requests = 0
        self.bytes = 0


async def soak_client(path: str, index: int, run: Run) -> None:
    """Random requests in region ``index`` until the deadline; every read is checked."""
    rng = random.Random(index)
    base = index * REGION
    model = bytearray(REGION)  # the memory disk starts as zeroes
    async with await trionbd.client.connect_unix(path) as nbd:
        run.connected += 1
        if run.connected == CLIENTS:
            run.all_connected.set()
        await run.go.wait()
        while time.monotonic() < run.deadline:
            start = rng.randrange(0, REGION // BLOCK) * BLOCK
            length = min(REGION - start, rng.choice([1, 8, 64, 128]) * BLOCK)
            op = rng.random()
            if op < 0.45:
                data = rng.randbytes(length)
                flags = CmdFlag.FUA if rng.random() < 0.1 else 0
                await nbd.pwrite(data, base + start, flags)
                model[start : start + length] = data
            elif op < 0.5:
                await nbd.zero(length, base + start)
                model[start : start + length] = bytes(length)
            elif op < 0.52:
                await nbd.flush()
            else:
                got = await nbd.pread(length, base + start)
                assert got == model[start : start + length], (index, start, length)
            run.requests += 1
            run.bytes += length
        assert await nbd.pread(REGION, base) == model, index
        run.requests += 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "chain",
    [("memory", str(SIZE)), ("--filter=delay", "memory", str(SIZE)),
     ("--workers=2", "file", "DISK")],
    ids=["inline", "tasks", "two-workers"],
)  # fmt: skip
async def test_two_hundred_clients_soak_without_an_error(
    chain: tuple[str, ...], tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    os.close(os.open(disk, os.O_CREAT | os.O_WRONLY))
    os.truncate(disk, SIZE)
    chain = tuple(str(disk) if word == "DISK" else word for word in chain)
    with trionbd_process(*chain) as server:
        pid = server.proc.pid
        fds, memory = fd_count(pid), rss(pid)
        run = Run()
        async with trio.open_nursery() as nursery:
            for i in range(CLIENTS):
                nursery.start_soon(soak_client, server.socket, i, run)
            await run.all_connected.wait()  # every client connects before the clock starts
            began = time.monotonic()
            run.deadline = began + SECONDS
            run.go.set()
        took = time.monotonic() - began
        fds_after = settle(lambda: fd_count(pid), fds)
        memory_after = rss(pid)
    print(
        f"\n{chain[0]}: {CLIENTS} clients, {run.requests} requests in {took:.1f}s "
        f"({run.requests / took:.0f}/s, {run.bytes / took / 1e6:.1f} MB/s), 0 errors; "
        f"server fds {fds} -> {fds_after}, RSS {memory >> 20} -> {memory_after >> 20} MiB"
    )
    assert fds_after <= fds
