"""Serving a stream without listeners (``-s``), and what a graceful shutdown does to the
contexts of connected clients (a flush for writable ones, then close)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from tests.server.nbdclient import Client
from trionbd.chain import Chain, Plugin
from trionbd.plugins.memory import MemoryPlugin
from trionbd.server import Server, ServerConfig, serve

KiB = 1024


class Journal(Plugin):
    """A writable disk that records flushes and closes, in order."""

    name = "journal"

    def __init__(self) -> None:
        self.data = bytearray(64 * KiB)
        self.events: list[str] = []

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> str:
        return export_name

    async def get_size(self, h: Any) -> int:
        return len(self.data)

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        return bytes(self.data[offset : offset + count])

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.data[offset : offset + len(buf)] = buf
        self.events.append("write")

    async def flush(self, h: Any, flags: int) -> None:
        self.events.append("flush")

    async def close(self, h: Any) -> None:
        self.events.append("close")


async def test_serve_stream_serves_one_client_on_a_server_without_listeners() -> None:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, MemoryPlugin(64 * KiB), [])
        client_end, server_end = trio.testing.memory_stream_pair()
        served = trio.Event()

        async def serve_it() -> None:
            await server.serve_stream(server_end)
            served.set()

        nursery.start_soon(serve_it)
        client = Client(client_end)
        await client.go()
        await client.write(0, b"x" * 512)
        assert await client.read(0, 512) == b"x" * 512
        assert not served.is_set()
        await client.disconnect()
        await served.wait()
        # With no listener, the server still runs until it is told to stop.
        assert not server.shutting_down
        nursery.cancel_scope.cancel()


async def test_a_graceful_shutdown_flushes_a_writable_context_before_closing_it() -> None:
    plugin = Journal()
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, Chain(plugin), [], ServerConfig())
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, server_end)
        client = Client(client_end)
        await client.go()
        await client.write(0, b"y" * 512)
        server.shutdown()
        assert await client.eof()
        nursery.cancel_scope.cancel()
    assert plugin.events == ["write", "flush", "close"]


async def test_a_client_leaving_on_its_own_is_not_flushed_for() -> None:
    plugin = Journal()
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, Chain(plugin), [])
        client_end, server_end = trio.testing.memory_stream_pair()
        client = Client(client_end)

        async def talk() -> None:
            await client.go()
            await client.write(0, b"z" * 512)
            await client.disconnect()

        nursery.start_soon(talk)
        await server.serve_stream(server_end)
        nursery.cancel_scope.cancel()
    assert plugin.events == ["write", "close"]


async def test_a_read_only_context_is_not_flushed_at_shutdown() -> None:
    plugin = Journal()
    async with trio.open_nursery() as nursery:
        config = ServerConfig(readonly=True)
        server: Server = await nursery.start(serve, Chain(plugin), [], config)
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, server_end)
        client = Client(client_end)
        await client.go()
        assert await client.read(0, 16) == bytes(16)
        server.shutdown()
        assert await client.eof()
        nursery.cancel_scope.cancel()
    assert plugin.events == ["close"]
