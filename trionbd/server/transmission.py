"""Transmission: serving one connection's requests until the client leaves.

Requests of one connection are served concurrently: each runs as a task in the
connection's request nursery, at most ``max_in_flight`` of them, holding at most
``max_buffered`` bytes of payload; beyond either the reader waits. The first task to
finish sends the replies queued meanwhile in as few ``writev`` calls as possible, under
the send lock; a request holds its slot and its payload bytes until its reply has left
(:meth:`Transmission._reply`). When every layer of the chain is ``nonblocking`` (memory,
page-cache files), READ, WRITE and BLOCK_STATUS are instead served inline by the
reader, and their replies leave together once the reader has parsed everything
received (or BATCH_BYTES wait): a task per 4 KiB read costs more than the read itself.
With ``idle_timeout``, a connection that sends nothing while none of its requests is in
flight is closed.

The frames of each reply come from the state machine (``proto.replies``), which knows
the reply shape the client negotiated. A failed request is answered with the NBD error
of its errno and its message, and the reason is logged as a warning
(:meth:`~.connection.Connection.warn`), except the answers a client is meant to fall
back from (``ENOTSUP`` to a fast zero, ``EOVERFLOW`` to a DF read).

It counts the requests, the bytes read and written and the errors in the connection's
``counters``. It refers to the connection, never the other way round: once the client
has gone, nothing keeps the connection (and its receive buffer) alive.
"""

from __future__ import annotations

import errno
import logging
import math
from typing import TYPE_CHECKING

import trio

from ..chain import LayerContext
from ..chain.errors import DropConnection, NBDError
from ..chain.types import CacheMode, Sparse
from ..protocol.constants import BASE_ALLOCATION, Cmd, Err
from ..protocol.errnos import nbd_error
from ..protocol.errors import LocalProtocolError
from ..protocol.events import (
    NEED_DATA,
    BadRequest,
    ConnectionClosed,
    Disconnect,
    Request,
    RequestEvent,
)
from ..protocol.wire import Buffer

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("trionbd.server")

BATCH_BYTES = 1 << 17
"""Inline replies are flushed once this many bytes wait. Kept below a Unix socket's
send buffer (about 200 KiB): a larger writev only half-completes and then waits for the
client, which doubled the CPU per 256 KiB read and halved sequential throughput."""

# Plain ints for the per-request path (enum attribute access and arithmetic are slow).
_READ, _WRITE, _BLOCK_STATUS = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.BLOCK_STATUS)
_INLINE = frozenset({_READ, _WRITE, _BLOCK_STATUS})
_FLUSH, _TRIM, _ZERO, _CACHE = int(Cmd.FLUSH), int(Cmd.TRIM), int(Cmd.WRITE_ZEROES), int(Cmd.CACHE)

_PAYLOAD = frozenset({_READ, _WRITE})
"""Commands whose requests hold payload in memory (counted against max_buffered)."""
_FALL_BACK = frozenset({Err.ENOTSUP, Err.EOVERFLOW})
"""Errors that tell a client to do without FAST_ZERO or DF: expected, not logged."""


class Transmission:
    """Serves the requests of one connection on the export's context ``ctx``."""

    def __init__(self, conn: Connection, ctx: LayerContext):
        self.conn = conn
        self.ctx = ctx
        self.proto = conn.proto
        self.config = conn.config
        self.replies = conn.proto.replies
        self.counters = conn.counters
        self._limit = trio.Semaphore(self.config.max_in_flight)
        """Slots of requests served by tasks, each held until the reply has left."""
        self._tasks = 0
        """Requests served by tasks that have not finished."""
        self._held = 0
        """Bytes of READ and WRITE payload held by those requests and unsent replies."""
        self._freed = trio.Event()
        self._queued_slots = 0
        self._queued_held = 0
        """The slots and payload bytes of the task replies waiting in ``_batch``."""
        self._sending = False
        self._batch: list[Buffer] = []
        self._batch_bytes = 0

    async def run(self) -> None:
        """Read and serve requests until the client disconnects or the connection is
        drained; then wait for the requests in flight (a retired connection answers
        what still arrives with ESHUTDOWN meanwhile)."""
        conn = self.conn
        proto = self.proto
        ctx = self.ctx
        inline = conn.server.inline
        serve = self._serve
        batch = self._batch
        limit = self._limit
        idle = self.config.idle_timeout
        conn.debug(
            "transmission on export %r (flags 0x%04x)", conn.info.export_name, proto.export_flags
        )
        drained = False
        async with trio.open_nursery() as requests:
            while True:
                event = proto.next_event()
                if type(event) is Request:
                    if inline and event.command in _INLINE:
                        frames = await serve(ctx, event)
                        batch += frames
                        # The request's length, not the frames': a sparse read's last
                        # frame may be a 20-byte hole chunk after megabytes of data.
                        self._batch_bytes += event.length
                        if self._batch_bytes >= BATCH_BYTES:
                            await self._flush_batch()
                    else:
                        try:
                            limit.acquire_nowait()  # no scheduler pass when below the limit
                        except trio.WouldBlock:
                            await limit.acquire()
                        self._tasks += 1
                        held = event.length if event.command in _PAYLOAD else 0
                        requests.start_soon(self._serve_task, ctx, event, held)
                        if held:
                            self._held += held
                            if self._held > self.config.max_buffered:
                                await self._wait_for_memory()
                elif event is NEED_DATA:
                    if batch:
                        await self._flush_batch()
                    if idle is None or self._tasks:
                        deadline = math.inf
                    else:
                        deadline = trio.current_time() + idle
                    try:
                        received = await conn.receive(deadline)
                    except trio.TooSlowError:
                        log.info(
                            "conn %d: idle for %ss with no request in flight (idle timeout); "
                            "closing",
                            conn.id,
                            idle,
                        )
                        received = False
                    if not received:
                        drained = True
                        break
                elif type(event) is BadRequest:
                    conn.warn("bad request: %s", event.message)
                    self.counters.requests += 1
                    batch += self._error(event, event.error, event.message)
                elif type(event) is Disconnect or type(event) is ConnectionClosed:
                    conn.debug("client disconnected (%s)", type(event).__name__)
                    if type(event) is ConnectionClosed and self._tasks:
                        # Gone without NBD_CMD_DISC: no one will read the replies, so stop
                        # the requests still running (a remote plugin's GETs, say).
                        conn.debug("cancelling %d requests in flight", self._tasks)
                        requests.cancel_scope.cancel()
                    break
                else:
                    raise LocalProtocolError(f"unexpected event in transmission: {event}")
            if batch:
                await self._flush_batch()
            if drained and conn.retire_deadline is not None:
                requests.cancel_scope.deadline = conn.retire_deadline
                await self._answer_retired()

    async def _answer_retired(self) -> None:
        """Answer every request still arriving with ``ESHUTDOWN`` until the client
        disconnects (or the server shuts down, or the grace period ends)."""
        conn = self.conn
        proto = self.proto
        message = f"export {conn.info.export_name!r} is gone; disconnect"
        while not conn.server.shutting_down:
            event = proto.next_event()
            if isinstance(event, RequestEvent):
                self.counters.requests += 1
                await conn.send(self._error(event, Err.ESHUTDOWN, message))
            elif event is NEED_DATA:
                with trio.CancelScope() as scope:
                    conn.receive_scope = scope
                    proto.receive_data(await conn.transport.receive())
                if scope.cancelled_caught:
                    return
            else:
                return

    async def _flush_batch(self) -> None:
        frames = self._batch[:]
        self._batch.clear()
        self._batch_bytes = 0
        slots = self._queued_slots
        if not slots:
            await self.conn.send(frames)
            return
        held = self._queued_held
        self._queued_slots = self._queued_held = 0
        try:
            await self.conn.send(frames)
        finally:
            self._release(slots, held)

    def _release(self, slots: int, held: int) -> None:
        """Task replies have left (or will never leave): free their in-flight slots and
        payload bytes, so that the reader may go on."""
        for _ in range(slots):
            self._limit.release()
        if held:
            self._held -= held
            self._freed.set()

    async def _reply(self, frames: list[Buffer], held: int) -> None:
        """Queue a task's reply frames and see that they are sent.

        Replies of requests served by tasks are combined: the first task to finish
        becomes the sender, lets the other runnable tasks finish and queue their
        replies, then sends everything queued in as few ``writev`` calls as possible;
        tasks finishing meanwhile only queue. Each request's frames stay together.
        The request's in-flight slot and its ``held`` payload bytes stay taken until its
        frames have been sent: a client that does not read its replies stops the
        reader, instead of making the batch grow without bound.
        """
        self._batch += frames
        self._queued_slots += 1
        self._queued_held += held
        if self._sending:
            return
        self._sending = True
        try:
            await trio.lowlevel.cancel_shielded_checkpoint()
            while self._batch:
                await self._flush_batch()
        except BaseException:
            # The connection broke or is being cancelled: what is still queued will
            # never be sent. Let go of it, so that a reader waiting for a slot or for
            # memory is not left waiting.
            slots, held = self._queued_slots, self._queued_held
            self._batch.clear()
            self._batch_bytes = self._queued_slots = self._queued_held = 0
            self._release(slots, held)
            raise
        finally:
            self._sending = False

    async def _wait_for_memory(self) -> None:
        """Stop reading while the requests in flight hold more than ``max_buffered``
        bytes of payload: the client's further requests wait in the socket."""
        self.conn.debug("%d bytes held by requests in flight; reading waits", self._held)
        while self._held > self.config.max_buffered:
            self._freed = trio.Event()
            await self._freed.wait()

    async def _serve_task(self, ctx: LayerContext, request: Request, held: int) -> None:
        """Serve ``request`` and see its reply sent; ``held`` is its payload (counted
        against ``max_buffered`` by the reader) until then."""
        queued = False
        try:
            frames = await self._serve(ctx, request)
            queued = True  # from here on the batch holds the slot and the payload
            try:
                await self._reply(frames, held)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as e:
                self.conn.debug("reply to cookie %d not sent: %s", request.cookie, e)
        finally:
            if not queued:
                self._release(1, held)
            self._tasks -= 1
            idle = self.config.idle_timeout
            scope = self.conn.receive_scope
            if idle is not None and not self._tasks and scope is not None:
                # The reader waits without a deadline while requests are in flight.
                scope.deadline = trio.current_time() + idle

    def _error(self, req: RequestEvent, error: int, message: str) -> list[Buffer]:
        """The error reply to a request, counted in the connection's errors."""
        self.counters.errors += 1
        return self.replies.error(req, error, message)

    def _failed(self, req: Request, code: int, message: str) -> list[Buffer]:
        """The reply to a request the chain failed with the host errno ``code``; the
        reason is logged unless the client is meant to fall back."""
        error = nbd_error(code, req.flags)
        if error in _FALL_BACK:
            self.conn.debug("cookie %d: %s", req.cookie, message)
        else:
            self.conn.warn(
                "%s of %d bytes at offset %d failed: %s",
                Cmd(req.command).name, req.length, req.offset, message,
            )  # fmt: skip
        return self._error(req, error, message)

    async def _serve(self, ctx: LayerContext, req: Request) -> list[Buffer]:
        """Do one request; return its reply frames (errors become error replies)."""
        cmd = req.command
        self.counters.requests += 1
        replies = self.replies
        try:
            if cmd == _READ:
                if req.length == 0:
                    return replies.read(req, b"")
                data = await ctx.pread(req.length, req.offset, req.flags)
                if len(data) != req.length:
                    raise NBDError(
                        errno.EIO,
                        f"{ctx.layer.name}: read of {req.length} bytes returned {len(data)}",
                    )
                self.counters.bytes_read += req.length
                if type(data) is Sparse:
                    return replies.sparse_read(req, data, data.holes)
                return replies.read(req, data)
            if cmd == _WRITE:
                if req.length:
                    await ctx.pwrite(req.data, req.offset, req.flags)
                    self.counters.bytes_written += req.length
            elif cmd == _BLOCK_STATUS:
                if req.length == 0:
                    raise NBDError(errno.EINVAL, "block status of 0 bytes")
                proto = self.proto
                contexts = {}
                for cid in proto.contexts_of(req):  # selected ones (protocol/ checked)
                    name = proto.meta_contexts[cid]
                    if name == BASE_ALLOCATION:
                        extents = await ctx.extents(req.length, req.offset, req.flags)
                    else:
                        extents = await ctx.meta_extents(name, req.length, req.offset, req.flags)
                    contexts[cid] = [(e.length, e.flags) for e in extents]
                return replies.block_status(req, contexts)
            elif cmd == _FLUSH:
                await ctx.flush(0)
            elif cmd == _TRIM:
                if req.length:
                    await ctx.trim(req.length, req.offset, req.flags)
            elif cmd == _ZERO:
                if req.length:
                    await ctx.zero(req.length, req.offset, req.flags)
            elif cmd == _CACHE:
                # Some clients send CACHE without SEND_CACHE: a no-op success is kindest.
                if req.length and ctx.caps is not None and ctx.caps.cache is not CacheMode.NONE:
                    await ctx.cache(req.length, req.offset, req.flags)
            return replies.ok(req)
        except NBDError as e:
            return self._failed(req, e.errno, e.message)
        except OSError as e:
            return self._failed(req, e.errno or errno.EIO, str(e))
        except DropConnection:
            raise
        except Exception:
            log.exception("conn %d: request %s failed unexpectedly", self.conn.id, req)
            return self._error(req, Err.EIO, "internal server error")
