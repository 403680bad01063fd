"""The test plugin of the embedding tests: a writable in-memory disk that the test can
hold up at chosen points and that records its lifecycle."""

from __future__ import annotations

import errno
import random
from typing import Any

import trio

import trionbd

MiB = 1024 * 1024


class Disk(trionbd.Plugin):
    """``size`` random bytes from ``seed``. Reads at offset ``gated`` wait for ``gate``
    (setting ``reading`` first), opens wait for ``open_gate`` when one is set (setting
    ``opening`` first). Counts opens and closes, records its lifecycle calls and flushes
    in ``events``, and runs a background task in the lifetime nursery while loaded."""

    name = "disk"

    def __init__(self, seed: int, size: int = MiB, gated: int | None = None):
        self.data = bytearray(random.Random(seed).randbytes(size))
        self.gated = gated
        self.gate = trio.Event()
        self.reading = trio.Event()
        self.open_gate: trio.Event | None = None
        self.opening = trio.Event()
        self.opens = 0
        self.closes = 0
        self.events: list[str] = []
        self.fail_after_fork = False
        self.background_running = False

    def get_ready(self) -> None:
        self.events.append("get_ready")

    async def after_fork(self, lifetime: trionbd.Lifetime) -> None:
        if self.fail_after_fork:
            raise OSError(errno.EACCES, "backing store refused")
        self.events.append("after_fork")
        await lifetime.nursery.start(self._background)

    async def _background(self, *, task_status: trio.TaskStatus[None]) -> None:
        self.background_running = True
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self.background_running = False

    async def cleanup(self) -> None:
        self.events.append("cleanup")

    def unload(self) -> None:
        self.events.append("unload")

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> None:
        self.opening.set()
        if self.open_gate is not None:
            await self.open_gate.wait()
        self.opens += 1

    async def close(self, h: Any) -> None:
        self.closes += 1

    async def get_size(self, h: Any) -> int:
        return len(self.data)

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        if offset == self.gated:
            self.reading.set()
            await self.gate.wait()
        return bytes(self.data[offset : offset + count])

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.data[offset : offset + len(buf)] = buf

    async def flush(self, h: Any, flags: int) -> None:
        self.events.append("flush")
