"""A small Trio NBD client on top of the sans-IO ClientConnection, for in-process tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import trio
import trio.testing

from trionbd.protocol import (
    REP_FLAG_ERROR,
    ClientConnection,
    Cmd,
    ConnectionClosed,
    DataChunk,
    ErrorChunk,
    HoleChunk,
    Opt,
    OptionReply,
    Rep,
    SimpleReply,
    wire,
)
from trionbd.protocol.client import ClientEvent
from trionbd.protocol.constants import BASE_ALLOCATION, Info
from trionbd.protocol.events import NEED_DATA, Chunk, ReplyEvent
from trionbd.server import Server

DEFAULT_INFOS = (Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION)


class Client:
    """One connection. Methods send a message and return the server's answer."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.proto = ClientConnection()
        self.size = 0
        self.flags = 0
        self._cookies = iter(range(1, 1 << 62))

    async def event(self) -> ClientEvent:
        while True:
            event = self.proto.next_event()
            if event is not NEED_DATA:
                return event
            self.proto.receive_data(await self.stream.receive_some(1 << 20))

    async def eof(self) -> bool:
        """True if the server closed the connection without sending anything more."""
        data = await self.stream.receive_some(1 << 16)
        return data == b""

    async def handshake(self) -> None:
        await self.event()
        await self.stream.send_all(self.proto.client_flags())

    async def option(self, option: int, payload: bytes = b"") -> list[OptionReply]:
        """Send an option; return its replies, the final one last."""
        await self.stream.send_all(self.proto.option(option, payload))
        replies: list[OptionReply] = []
        while True:
            event = await self.event()
            assert isinstance(event, OptionReply), event
            replies.append(event)
            if event.reply == Rep.ACK or event.reply & REP_FLAG_ERROR:
                return replies

    async def go(
        self,
        name: str = "",
        *,
        structured: bool = True,
        meta: bool = False,
        infos: Sequence[int] = DEFAULT_INFOS,
    ) -> list[OptionReply]:
        """Negotiate and enter transmission; fails the test if GO is refused."""
        await self.handshake()
        if structured:
            [ack] = await self.option(Opt.STRUCTURED_REPLY)
            assert ack.reply == Rep.ACK
        if meta:
            replies = await self.option(
                Opt.SET_META_CONTEXT, wire.name_and_queries(name, [BASE_ALLOCATION])
            )
            assert [r.reply for r in replies] == [Rep.META_CONTEXT, Rep.ACK]
        replies = await self.option(Opt.GO, wire.name_and_infos(name, infos))
        assert replies[-1].reply == Rep.ACK, replies
        export = replies[0].payload
        assert export[:2] == b"\0\0"
        self.size = int.from_bytes(export[2:10], "big")
        self.flags = int.from_bytes(export[10:12], "big")
        return replies

    async def send(
        self, command: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> int:
        cookie = next(self._cookies)
        await self.stream.send_all(self.proto.request(cookie, command, flags, offset, length, data))
        return cookie

    async def reply(self, cookie: int | None = None) -> list[ClientEvent]:
        """The events of one complete reply (all chunks up to DONE)."""
        out: list[ClientEvent] = []
        while True:
            event = await self.event()
            assert not isinstance(event, ConnectionClosed), "server closed the connection"
            if cookie is not None:
                assert isinstance(event, ReplyEvent) and event.cookie == cookie, (event, cookie)
            out.append(event)
            if isinstance(event, SimpleReply) or (isinstance(event, Chunk) and event.done):
                return out

    async def request(
        self, command: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> list[ClientEvent]:
        cookie = await self.send(command, offset, length, flags, data)
        return await self.reply(cookie)

    async def error(
        self, command: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> int:
        """The error a request gets (0 on success)."""
        return error_of(await self.request(command, offset, length, flags, data))

    async def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        """Read and reassemble (holes as zeroes); fails the test on an error reply."""
        events = await self.request(Cmd.READ, offset, length, flags)
        return assemble(events, offset, length)

    async def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        assert await self.error(Cmd.WRITE, offset, len(data), flags, data) == 0

    async def disconnect(self) -> None:
        """Send NBD_CMD_DISC. Bypasses ``proto.request``, which would stop parsing replies
        at once, while the replies of requests still in flight are yet to come."""
        await self.stream.send_all(wire.request(0, Cmd.DISC, 0, 0, 0))


def error_of(events: list[ClientEvent]) -> int:
    for event in events:
        if isinstance(event, SimpleReply | ErrorChunk) and event.error:
            return event.error
    return 0


def assemble(events: list[ClientEvent], offset: int, length: int) -> bytes:
    """The bytes a READ reply describes; checks the chunks cover the range exactly once."""
    buf = bytearray(length)
    covered = [False] * length if length <= 1 << 22 else None
    for event in events:
        if isinstance(event, SimpleReply):
            assert event.error == 0, event
            return event.data
        if isinstance(event, ErrorChunk):
            raise AssertionError(f"read failed: {event}")
        if isinstance(event, DataChunk):
            start, n = event.offset - offset, len(event.data)
            buf[start : start + n] = event.data
        elif isinstance(event, HoleChunk):
            start, n = event.offset - offset, event.length
        else:
            continue
        assert 0 <= start and start + n <= length, (event, offset, length)
        if covered is not None:
            assert not any(covered[start : start + n]), f"overlapping chunk {event}"
            covered[start : start + n] = [True] * n
    assert covered is None or all(covered), "chunks do not cover the read"
    return bytes(buf)


async def connect(server: Server) -> Client:
    """A client on the server's (first, Unix) socket."""
    path = server.addresses[0].unix_path
    assert path is not None
    return Client(await trio.open_unix_socket(path))


@contextlib.asynccontextmanager
async def memory_client(server: Server) -> AsyncIterator[Client]:
    """A client joined to ``server`` by an in-memory stream (works with autojump_clock)."""
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end)
        try:
            yield Client(client_end)
        finally:
            await client_end.aclose()
