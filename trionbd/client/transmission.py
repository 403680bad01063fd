"""The client in transmission: requests pipelined from any number of tasks, one writer
task sending them in order, one reader task matching replies to them by cookie."""

from __future__ import annotations

import errno
import itertools
from collections import deque
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import trio

from ..chain.errors import NBDError
from ..chain.types import BlockSize, Extent, Sparse
from ..net.transport import Transport
from ..protocol.client import ClientConnection, ClientEvent, ClientPhase, ExportInfo
from ..protocol.constants import BASE_ALLOCATION, Cmd, TransmissionFlag
from ..protocol.errors import ProtocolError, RemoteProtocolError
from ..protocol.events import (
    NEED_DATA,
    BlockStatusChunk,
    Chunk,
    ConnectionClosed,
    DataChunk,
    ErrorChunk,
    HoleChunk,
    ReplyEvent,
    SimpleReply,
)
from ..protocol.wire import U32, Buffer
from .errors import STREAM_ERRORS, ConnectionFailed, RequestError, describe, failures

CLOSE_TIMEOUT = 5.0
"""Seconds :meth:`Client.aclose` waits for in-flight requests before cutting the connection."""


@dataclass(eq=False, slots=True)
class _Request:
    """One request in flight and what its reply has said so far."""

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    data: bytes = b""
    done: trio.Event = field(default_factory=trio.Event)
    error: NBDError | None = None
    buf: bytes | bytearray | None = None
    received: int = 0
    holes: list[tuple[int, int]] = field(default_factory=list)
    context: int | None = None
    """A BLOCK_STATUS's meta context id: its chunk is kept, those of others dropped."""
    extents: list[tuple[int, int]] | None = None


class Client:
    """A connection in transmission. Obtain one from :func:`connect` and friends.

    Requests may be issued from many tasks at once; they are pipelined (the server
    sees them all in flight) and matched to replies by cookie. The client must be
    running: use ``async with client:`` or ``await nursery.start(client.run)``.
    Cancelling a request is safe: the connection stays usable and the late reply is
    discarded.
    """

    def __init__(
        self,
        transport: Transport,
        proto: ClientConnection,
        info: ExportInfo,
        contexts: Mapping[str, int],
        peer: str,
    ):
        self.info = info
        """What the server said about the export (name, size, flags, ...)."""
        self.peer = peer
        self._transport = transport
        self._proto = proto
        self._contexts = dict(contexts)
        """The meta contexts selected: name -> the server's id for it."""
        self._ids_payload = bool(
            proto.extended
            and len(contexts) > 1
            and info.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD
        )
        """Whether a block status names its one context (the server would answer each)."""
        self._cookies = itertools.count(1)
        self._pending: dict[int, _Request] = {}
        self._queue: deque[_Request] = deque()
        """Requests waiting for the writer task, in order."""
        self._wakeup = trio.Event()
        self._failure: str | None = None
        self._started = False
        self._running = False
        self._closing = False
        self._idle: trio.Event | None = None
        self._stack: AsyncExitStack | None = None

    def __repr__(self) -> str:
        return f"<Client {self.peer} export={self.export_name!r}>"

    # --- what was negotiated -------------------------------------------------------------

    @property
    def export_name(self) -> str:
        return self.info.name

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def flags(self) -> TransmissionFlag:
        return self.info.flags

    @property
    def description(self) -> str | None:
        return self.info.description

    @property
    def block_size(self) -> BlockSize | None:
        """The server's block size constraints, if it sent them (obey them)."""
        return BlockSize(*self.info.block_size) if self.info.block_size else None

    @property
    def structured(self) -> bool:
        """Whether structured replies were negotiated (extended headers include them)."""
        return self._proto.structured

    @property
    def extended(self) -> bool:
        """Whether extended headers were negotiated: lengths of trim, zero, cache and
        block status may then reach 2^64 - 1; without them, 2^32 - 1."""
        return self._proto.extended

    @property
    def can_block_status(self) -> bool:
        """Whether ``base:allocation`` was negotiated (needed by :meth:`block_status`)."""
        return BASE_ALLOCATION in self._contexts

    @property
    def meta_contexts(self) -> list[str]:
        """The meta contexts negotiated, which :meth:`block_status` can ask about."""
        return list(self._contexts)

    @property
    def is_read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_FUA)

    @property
    def is_rotational(self) -> bool:
        return bool(self.flags & TransmissionFlag.ROTATIONAL)

    @property
    def can_trim(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_WRITE_ZEROES)

    @property
    def can_df(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_DF)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & TransmissionFlag.CAN_MULTI_CONN)

    @property
    def can_cache(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_CACHE)

    @property
    def can_fast_zero(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_FAST_ZERO)

    @property
    def in_flight(self) -> int:
        """Requests sent (or being sent) whose reply has not fully arrived."""
        return len(self._pending)

    @property
    def failure(self) -> str | None:
        """Why the connection is no longer usable (``None`` while it is)."""
        return self._failure

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send requests and dispatch replies until the connection ends.

        Start it with ``await nursery.start(client.run)``. It returns (without raising)
        once the connection is over: after :meth:`aclose`/:meth:`disconnect`, when the
        server goes away, or when it breaks the protocol. Every request still waiting
        then raises ``ConnectionFailed``. Cancelling it cuts the connection the same way.
        """
        if self._started:
            raise RuntimeError(f"{self!r}: run() was already started")
        self._started = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                self._running = True
                task_status.started()
                await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            self._running = False
            self._fail(f"{self.peer}: the client stopped")
            for req in self._queue:
                req.done.set()  # a DISC that was never sent: disconnect() goes on
            self._queue.clear()
            await self._transport.aclose()

    async def __aenter__(self) -> Self:
        """Run the client in a nursery of its own until the block ends, then disconnect."""
        async with AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.push_async_callback(self.aclose)
            await nursery.start(self.run)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._stack is not None
        try:
            return await self._stack.__aexit__(kind, e, tb)
        except BaseExceptionGroup as group:
            # The reader task raises nothing: give the body's exception back unwrapped.
            if e is None or group.exceptions != (e,):
                raise
            context, cause = e.__context__, e.__cause__
            try:
                raise e from cause
            finally:
                e.__context__ = context

    async def disconnect(self) -> None:
        """Disconnect cleanly: refuse new requests, wait for those in flight, send
        ``NBD_CMD_DISC`` and close the connection."""
        if self._closing:
            return
        self._closing = True
        bye = f"{self.peer}: the client disconnected"
        try:
            while self._pending and self._failure is None:
                self._idle = trio.Event()
                await self._idle.wait()
            if self._failure is not None:
                return  # the connection is already gone
            self._fail(bye)
            disc = _Request(0, Cmd.DISC, 0, 0, 0)
            if self._running:
                self._enqueue(disc)
                await disc.done.wait()
            else:
                with failures(self.peer, "disconnecting"):
                    await self._transport.send([self._frame(disc)])
        finally:
            self._fail(bye)
            await self._transport.aclose()

    async def aclose(self) -> None:
        """Close the connection, cleanly if the server lets us within ``CLOSE_TIMEOUT``
        seconds (see :meth:`disconnect`), else by cutting it. Never raises for a
        connection that is already gone; safe to call twice."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    await self.disconnect()
                except ConnectionFailed:
                    pass
            self._fail(f"{self.peer}: the client disconnected")
            await self._transport.aclose()

    # --- requests ------------------------------------------------------------------------

    async def pread(self, count: int, offset: int, flags: int = 0) -> bytes:
        """Read ``count`` bytes at ``offset``. When the server sent holes, the result is a
        :class:`~trionbd.chain.Sparse` (plain ``bytes`` that also knows its holes)."""
        req = await self._submit(Cmd.READ, flags, offset, count)
        data = req.buf if req.buf is not None else bytes(count)
        if req.holes:
            return Sparse(bytes(data), tuple(_merge(req.holes)))
        return data if type(data) is bytes else bytes(data)

    async def pwrite(self, buf: bytes, offset: int, flags: int = 0) -> None:
        """Write ``buf`` at ``offset`` (``CmdFlag.FUA`` for a durable write)."""
        await self._submit(Cmd.WRITE, flags, offset, len(buf), bytes(buf))

    async def flush(self, flags: int = 0) -> None:
        await self._submit(Cmd.FLUSH, flags, 0, 0)

    async def trim(self, count: int, offset: int, flags: int = 0) -> None:
        await self._submit(Cmd.TRIM, flags, offset, count)

    async def zero(self, count: int, offset: int, flags: int = 0) -> None:
        """Write zeroes (``CmdFlag.NO_HOLE``, ``CmdFlag.FAST_ZERO``, ``CmdFlag.FUA``)."""
        await self._submit(Cmd.WRITE_ZEROES, flags, offset, count)

    async def cache(self, count: int, offset: int, flags: int = 0) -> None:
        await self._submit(Cmd.CACHE, flags, offset, count)

    async def block_status(
        self, count: int, offset: int, flags: int = 0, *, context: str = BASE_ALLOCATION
    ) -> list[Extent]:
        """Extents of meta context ``context`` (by default ``base:allocation``) from
        ``offset`` on, as the server reported them (they may cover less than ``count``,
        or run past it); their ``flags`` are the context's status bits.
        ``CmdFlag.REQ_ONE`` asks for one extent. The context must have been negotiated
        (:attr:`meta_contexts`). When the server answers with every selected context,
        only this one's extents are kept; with extended headers and a server that takes
        the payload form, the request names this context alone."""
        cid = self._contexts.get(context)
        if cid is None:
            raise NBDError(errno.EINVAL, f"{self.peer}: meta context {context} was not negotiated")
        ids = U32.pack(cid) if self._ids_payload else b""
        req = await self._submit(Cmd.BLOCK_STATUS, flags, offset, count, ids, context=cid)
        if not req.extents:
            raise NBDError(errno.EIO, f"{self.peer}: block status reply without {context} extents")
        out = []
        pos = offset
        for length, state in req.extents:
            out.append(Extent(pos, length, state))
            pos += length
        return out

    async def _submit(
        self,
        command: int,
        flags: int,
        offset: int,
        length: int,
        data: bytes = b"",
        context: int | None = None,
    ) -> _Request:
        if self._failure is not None:
            raise ConnectionFailed(self._failure)
        if self._closing:
            raise ConnectionFailed(f"{self.peer}: the client is disconnecting")
        if not self._running:
            raise RuntimeError(
                f"{self!r} is not running: use 'async with client' or nursery.start(client.run)"
            )
        longest = 1 << (64 if self._proto.extended else 32)
        if not (0 <= offset < 1 << 64 and 0 <= length < longest and 0 <= flags < 1 << 16):
            raise NBDError(
                errno.EINVAL,
                f"request out of range: offset {offset}, length {length}, flags 0x{flags:x}",
            )
        cookie = next(self._cookies)
        req = _Request(cookie, command, flags, offset, length, data, context=context)
        self._pending[cookie] = req
        self._enqueue(req)
        # Cancelled while waiting: the request still goes out and its late reply is
        # dropped; the connection stays in step.
        await req.done.wait()
        if req.error is not None:
            raise req.error
        return req

    def _enqueue(self, req: _Request) -> None:
        self._queue.append(req)
        self._wakeup.set()

    def _frame(self, req: _Request) -> bytes:
        return self._proto.request(
            req.cookie, req.command, req.flags, req.offset, req.length, req.data
        )

    async def _write_loop(self) -> None:
        """The only task that sends: requests leave in the order they were queued (all
        that queued up meanwhile in one system call), and no caller's cancellation can
        leave half a request on the wire."""
        queue = self._queue
        while True:
            if not queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            batch = list(queue)
            queue.clear()
            # Requests that failed meanwhile (done already) are skipped. NBD_CMD_DISC
            # goes out after disconnect() marked the connection as over.
            frames: list[Buffer] = []
            for r in batch:
                if not r.done.is_set() and self._proto.phase is ClientPhase.TRANSMISSION:
                    frames.append(self._frame(r))
            try:
                await self._transport.send(frames)
            except STREAM_ERRORS as e:
                self._fail(f"{self.peer}: connection lost while sending: {describe(e)}")
                return
            finally:
                discs = [r for r in batch if r.command == Cmd.DISC]
                for r in discs:
                    r.done.set()  # sent, or never will be: disconnect() goes on
            if discs:
                return

    async def _read_loop(self) -> None:
        proto = self._proto
        try:
            while True:
                if proto.phase is ClientPhase.CLOSED:
                    return  # after NBD_CMD_DISC
                event = proto.next_event()
                if event is NEED_DATA:
                    proto.receive_data(await self._transport.receive())
                elif isinstance(event, ConnectionClosed):
                    self._fail(self._lost("the server closed the connection"))
                    return
                else:
                    self._dispatch(event)
        except ProtocolError as e:
            self._fail(self._lost(f"protocol error: {e}"))
        except STREAM_ERRORS as e:
            self._fail(self._lost(describe(e)))

    def _lost(self, why: str) -> str:
        n = len(self._pending)
        in_flight = f" with {n} request{'s' if n != 1 else ''} in flight" if n else ""
        return f"{self.peer}: connection lost{in_flight}: {why}"

    def _dispatch(self, event: ClientEvent) -> None:
        if not isinstance(event, ReplyEvent):
            raise RemoteProtocolError(f"{event} in transmission")
        cookie = event.cookie
        req = self._pending.get(cookie)
        if req is None:
            raise RemoteProtocolError(f"reply for cookie {cookie}, which is not in flight")
        kind = type(event)
        if kind is SimpleReply:
            assert isinstance(event, SimpleReply)
            if event.error:
                req.error = RequestError(event.error, "")
            elif req.command == Cmd.READ:
                req.buf = event.data
                req.received = len(event.data)
            self._complete(req)
            return
        if kind is DataChunk:
            assert isinstance(event, DataChunk)
            self._place(req, event.offset, len(event.data), event.data)
        elif kind is HoleChunk:
            assert isinstance(event, HoleChunk)
            self._place(req, event.offset, event.length, None)
        elif kind is BlockStatusChunk:
            assert isinstance(event, BlockStatusChunk)
            if req.command != Cmd.BLOCK_STATUS:
                raise RemoteProtocolError(f"block status chunk for cookie {cookie} ({req.command})")
            if event.context_id == req.context:
                if req.extents is not None:
                    raise RemoteProtocolError(
                        f"two block status chunks of context {req.context} for cookie {cookie}"
                    )
                req.extents = list(event.extents)
        elif kind is ErrorChunk:
            assert isinstance(event, ErrorChunk)
            if req.error is None:
                req.error = RequestError(event.error, event.message, event.offset)
        if isinstance(event, Chunk) and event.done:
            self._complete(req)

    def _place(self, req: _Request, offset: int, length: int, data: bytes | None) -> None:
        """Put a data (or hole, ``data is None``) chunk of a READ reply in place."""
        start = offset - req.offset
        if req.command != Cmd.READ or start < 0 or start + length > req.length:
            raise RemoteProtocolError(
                f"read chunk at offset {offset} (+{length}) outside the request "
                f"(offset {req.offset}, length {req.length}, command {req.command})"
            )
        if req.received + length > req.length:
            raise RemoteProtocolError(f"read chunks for cookie {req.cookie} overlap")
        if data is None:
            req.holes.append((start, length))
        elif length == req.length:
            req.buf = data
        else:
            if not isinstance(req.buf, bytearray):
                req.buf = bytearray(req.length)
            req.buf[start : start + length] = data
        req.received += length

    def _complete(self, req: _Request) -> None:
        if req.command == Cmd.READ and req.error is None and req.received != req.length:
            req.error = NBDError(
                errno.EIO,
                f"{self.peer}: read reply covered {req.received} of {req.length} bytes",
            )
        del self._pending[req.cookie]
        req.done.set()
        if not self._pending and self._idle is not None:
            self._idle.set()

    def _fail(self, why: str) -> None:
        """The connection is over: fail every request still waiting."""
        if self._failure is None:
            self._failure = why
        pending = list(self._pending.values())
        self._pending.clear()
        for req in pending:
            req.error = ConnectionFailed(self._failure)
            req.done.set()
        if self._idle is not None:
            self._idle.set()


def _merge(holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in sorted(holes):
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out
