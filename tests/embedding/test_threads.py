"""Plain ``def`` callbacks run in worker threads, at most THREADS_PER_LAYER of one layer
at once, whatever the number of requests in flight."""

from __future__ import annotations

import threading
from typing import Any

import trio
import trio.testing

import trionbd
from tests.support import HANG_GUARD, short_tmpdir
from trionbd.chain.layer import THREADS_PER_LAYER


class Blocking(trionbd.Plugin):
    """A plugin wrapping a "blocking library": reads wait for ``release``."""

    name = "blocking"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.threads: set[int] = set()
        self.release = threading.Event()
        self.full = trio.Event()

    def get_size(self, h: Any) -> int:
        return 1 << 20

    def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.get_ident())
            full = self.running == THREADS_PER_LAYER
        if full:
            trio.from_thread.run_sync(self.full.set)  # a worker thread reaching into Trio
        try:
            if not self.release.wait(HANG_GUARD):
                raise TimeoutError("the test never released the reads")
            return bytes([offset // 4096]) * count
        finally:
            with self.lock:
                self.running -= 1


async def test_blocking_callbacks_share_the_layers_thread_limit() -> None:
    plugin = Blocking()
    chain = trionbd.Chain(plugin)
    requests = THREADS_PER_LAYER + 24
    results: dict[int, bytes] = {}
    with short_tmpdir() as tmp, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(trionbd.serve, chain, f"unix:{tmp}/sock")
            async with await trionbd.connect_unix(f"{tmp}/sock") as client:
                async with trio.open_nursery() as readers:

                    async def read(i: int) -> None:
                        results[i] = await client.pread(512, i * 4096)

                    for i in range(requests):
                        readers.start_soon(read, i)
                    await plugin.full.wait()
                    await trio.testing.wait_all_tasks_blocked()
                    stats = chain.layers[0].threads.statistics()
                    assert stats.borrowed_tokens == THREADS_PER_LAYER
                    assert stats.tasks_waiting == requests - THREADS_PER_LAYER
                    assert plugin.running == THREADS_PER_LAYER
                    plugin.release.set()
            nursery.cancel_scope.cancel()
    assert plugin.most == THREADS_PER_LAYER
    assert threading.get_ident() not in plugin.threads
    assert results == {i: bytes([i]) * 512 for i in range(requests)}
