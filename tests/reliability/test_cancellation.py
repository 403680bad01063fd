"""Cancellation at every await point of a request's life, in process with
``autojump_clock``: the reader waiting for a header or a write payload, for a free
request slot, for the payload budget; the backend call; a reply waiting for the send
lock; a reply blocked in the send because the client does not read.

Cancelled there — one connection (its task's scope), or the whole server (a graceful
shutdown whose grace period runs out) — nothing is left behind: no task, no open
context, and the client's byte stream is a sequence of whole frames followed by the end
of the connection. The one exception is a reply the client itself stopped reading: its
frame is cut where the client stopped taking bytes, and nothing follows it (waiting for
such a client would make it the judge of when we may close).

Cancelled from inside the backend — one request, by a filter's own timeout — the request
fails with an error reply and the connection and the backend's locks go on working.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from tests.server.nbdclient import Client
from tests.support import all_tasks
from trionbd.chain import Chain, Filter, NBDError, Next, Plugin
from trionbd.chain.types import Concurrency
from trionbd.protocol import (
    Cmd,
    ConnectionClosed,
    DataChunk,
    ErrorChunk,
    RemoteProtocolError,
    SimpleReply,
    wire,
)
from trionbd.protocol.client import ClientEvent
from trionbd.server import Server, ServerConfig, serve

MiB = 1 << 20
SIZE = 64 * MiB
SLOW = 32 * MiB
"""Reads and writes at or beyond this offset wait in the backend until released."""
BIG = 8 * MiB
"""A reply this large fills the socket buffers of a client that does not read."""


class Steps(Plugin):
    """A disk whose requests beyond SLOW wait until the test releases them."""

    name = "steps"

    def __init__(self, nonblocking: bool = False) -> None:
        self.nonblocking = nonblocking  # type: ignore[misc]
        self.opened = 0
        self.closed = 0
        self.waiting = 0
        self.release = trio.Event()

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> object:
        self.opened += 1
        return object()

    async def close(self, h: Any) -> None:
        self.closed += 1

    async def get_size(self, h: Any) -> int:
        return SIZE

    async def _step(self, offset: int) -> None:
        if offset >= SLOW:
            self.waiting += 1
            try:
                await self.release.wait()
            finally:
                self.waiting -= 1

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        await self._step(offset)
        return bytes([offset // MiB % 251 + 1]) * count

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        await self._step(offset)


async def rest_of_stream(client: Client) -> tuple[list[ClientEvent], str | None]:
    """Every event the server still sends, to the end; and the protocol error if the
    stream ended inside a frame."""
    events: list[ClientEvent] = []
    while True:
        try:
            event = await client.event()
        except RemoteProtocolError as e:
            return events, str(e)
        except trio.BrokenResourceError:  # a reset: the server dropped unread input
            client.proto.receive_data(b"")
            continue
        if isinstance(event, ConnectionClosed):
            return events, None
        events.append(event)


# --- how to bring a request to each await point ------------------------------------------

Setup = Callable[[Client, Steps], Awaitable[None]]


async def at_header(c: Client, plugin: Steps) -> None:
    await c.stream.send_all(wire.request(1, Cmd.READ, 0, 0, 4096)[:17])


async def at_payload(c: Client, plugin: Steps) -> None:
    await c.stream.send_all(wire.request(1, Cmd.WRITE, 0, 0, MiB) + bytes(1000))


async def at_backend(c: Client, plugin: Steps) -> None:
    await c.send(Cmd.READ, SLOW, 4096)
    await trio.testing.wait_all_tasks_blocked()
    assert plugin.waiting == 1


async def at_in_flight_limit(c: Client, plugin: Steps) -> None:
    await c.send(Cmd.READ, SLOW, 4096)  # max_in_flight is 1: this one holds the slot
    await c.send(Cmd.READ, 0, 4096)  # the reader waits for the slot with this one
    await trio.testing.wait_all_tasks_blocked()
    assert plugin.waiting == 1


async def at_budget(c: Client, plugin: Steps) -> None:
    await c.send(Cmd.READ, SLOW, 2 * MiB)  # max_buffered is 1 MiB: the reader waits
    await c.send(Cmd.READ, 0, 4096)
    await trio.testing.wait_all_tasks_blocked()
    assert plugin.waiting == 1


async def at_send(c: Client, plugin: Steps) -> None:
    await c.send(Cmd.READ, 0, BIG)  # the client reads nothing: the reply blocks


async def at_send_lock(c: Client, plugin: Steps) -> None:
    await c.send(Cmd.READ, 0, BIG)  # blocks in the send, holding the lock
    await c.send(Cmd.READ, MiB, 4096)  # its reply waits for the lock
    await trio.testing.wait_all_tasks_blocked()


TASK_POINTS: dict[str, Setup] = {
    "header": at_header,
    "payload": at_payload,
    "in-flight-limit": at_in_flight_limit,
    "budget": at_budget,
    "backend": at_backend,
    "send-lock": at_send_lock,
    "send": at_send,
}
INLINE_POINTS: dict[str, Setup] = {"header": at_header, "payload": at_payload, "send": at_send}
CUT = {"send", "send-lock"}
"""Points where a reply is being sent to a client that stopped reading."""
CASES = [("tasks", point) for point in TASK_POINTS] + [("inline", p) for p in INLINE_POINTS]


@pytest.mark.parametrize("what", ["connection", "server"])
@pytest.mark.parametrize(("path", "point"), CASES)
async def test_cancellation_at_each_await_point_leaves_nothing_behind(
    path: str, point: str, what: str, autojump_clock: trio.testing.MockClock
) -> None:
    plugin = Steps(nonblocking=path == "inline")
    config = ServerConfig(max_in_flight=1, max_buffered=MiB, shutdown_timeout=5)
    setup = (TASK_POINTS if path == "tasks" else INLINE_POINTS)[point]
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, Chain(plugin), [], config)
        assert server.inline is (path == "inline")
        before = all_tasks()
        server_end, client_end = trio.socket.socketpair()
        scope = trio.CancelScope()
        gone = trio.Event()

        async def connection() -> None:
            stream = trio.SocketStream(server_end)
            if what == "connection":
                with scope:  # one connection's task, under a scope of ours
                    await server.handle_stream(stream)
            else:
                await server.serve_stream(stream)  # in the server's connection nursery
            gone.set()

        nursery.start_soon(connection)
        c = Client(trio.SocketStream(client_end))
        await c.go()
        await c.write(0, b"warm")  # one whole reply before the await point
        await setup(c, plugin)
        await trio.testing.wait_all_tasks_blocked()
        if what == "connection":
            scope.cancel()
        else:
            server.shutdown()  # drains; the grace period then cancels what is left
        await gone.wait()
        assert all_tasks() == before
        assert plugin.opened == plugin.closed == 1
        assert plugin.waiting == 0
        events, cut = await rest_of_stream(c)
        # Replies that were not held up arrive whole (a drained request whose backend
        # waits forever has none); a reply to a client that stopped reading is cut.
        assert all(isinstance(e, SimpleReply | DataChunk | ErrorChunk) for e in events)
        if point in CUT:
            assert cut is not None and "chunk payload" in cut, cut
        else:
            assert cut is None, cut
        nursery.cancel_scope.cancel()
    assert plugin.opened == plugin.closed


async def test_a_request_cancelled_by_the_backend_gets_an_error_and_nothing_else_breaks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A filter that gives each read 10 s (``trio.move_on_after``) cancels the call below
    it where it waits: in the plugin itself, or queued on the plugin's per-connection
    lock behind another stuck request."""

    class Serial(Steps):
        concurrency = Concurrency.SERIALIZE_REQUESTS

    class Deadline(Filter):
        name = "deadline"
        nonblocking = False

        async def pread(self, next: Next, h: Any, count: int, offset: int, flags: int) -> bytes:
            with trio.move_on_after(10):
                return await next.pread(count, offset, flags)
            raise NBDError(errno.ETIMEDOUT, f"read at {offset} took more than 10 s")

    plugin = Serial()
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, Chain(plugin, [Deadline()]), [])
        server_end, client_end = trio.socket.socketpair()
        nursery.start_soon(server.handle_stream, trio.SocketStream(server_end))
        c = Client(trio.SocketStream(client_end))
        await c.go()
        before = all_tasks()
        stuck = await c.send(Cmd.READ, SLOW, 4096)  # waits in the plugin
        await trio.testing.wait_all_tasks_blocked()  # (tasks start in any order)
        assert plugin.waiting == 1
        queued = await c.send(Cmd.READ, 0, 4096)  # waits for the plugin's lock
        timed_out = {}
        for _ in range(2):
            [error] = await c.reply()
            assert isinstance(error, ErrorChunk) and "took more than 10 s" in error.message
            timed_out[error.cookie] = error.error
        assert timed_out.keys() == {stuck, queued}
        assert plugin.waiting == 0
        await trio.testing.wait_all_tasks_blocked()
        assert all_tasks() == before  # the two request tasks are gone
        # The lock was released by both: the connection goes on.
        assert await c.read(MiB, 16) == b"\x02" * 16
        plugin.release.set()
        assert await c.read(SLOW, 16) == bytes([SLOW // MiB % 251 + 1]) * 16
        await c.disconnect()
        events, cut = await rest_of_stream(c)
        assert events == [] and cut is None
        nursery.cancel_scope.cancel()
    assert plugin.opened == plugin.closed == 1
