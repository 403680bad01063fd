"""One client connection: the handshake, then transmission until the client leaves.

Options are answered one at a time from the chain; the client has ``handshake_timeout``
seconds for each of them (the time the chain takes to answer does not count). A client
over the connection limit, or one that has not sent STARTTLS under ``--tls=require``,
has its options refused unseen (:meth:`Connection._refusal`).

Requests of one connection are served concurrently: each runs as a task in the
connection's request nursery, at most ``max_in_flight`` of them, holding at most
``max_buffered`` bytes of payload; beyond either the reader waits. The first task to
finish sends the replies queued meanwhile in as few ``writev`` calls as possible, under
the send lock; a request holds its slot and its payload bytes until its reply has left
(:meth:`Connection._reply`). When every layer of the chain is ``nonblocking`` (memory,
page-cache files), READ, WRITE and BLOCK_STATUS are instead served inline by the
reader, and their replies leave together once the reader has parsed everything
received (or BATCH_BYTES wait): a task per 4 KiB read costs more than the read itself.
With ``idle_timeout``, a connection that sends nothing while none of its requests is in
flight is closed.

Each connection counts its requests, the bytes read and written and its errors (plain
integer attributes, summed per export by ``Server.stats``). A connection whose export
goes away is *retired* (``Server.close_connections``): it answers whatever still arrives
with ``ESHUTDOWN`` until the client disconnects or the grace period ends.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import trio

from ..chain.client import ClientInfo, set_current_client
from ..chain.errors import NBDError
from ..chain.next import Caps, Layer, Next
from ..chain.types import CacheMode, FuaMode, Sparse, ZeroMode, each_export
from ..net.transport import Transport
from ..protocol import wire
from ..protocol.constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    MAX_OPTIONS,
    Cmd,
    CmdFlag,
    Err,
    Opt,
    Rep,
    TransmissionFlag,
)
from ..protocol.errnos import nbd_error, option_error
from ..protocol.errors import LocalProtocolError, RemoteProtocolError
from ..protocol.events import (
    NEED_DATA,
    AbortOption,
    BadRequest,
    ConnectionClosed,
    Disconnect,
    ExportNameOption,
    InfoOption,
    InvalidOption,
    ListOption,
    MetaContextOption,
    OptionEvent,
    Request,
    StartTLSOption,
    StructuredReplyOption,
    UnknownOption,
)
from ..protocol.server import ServerConnection
from ..protocol.wire import Buffer
from .tls import TLSMode

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("trionbd.server")

LIST_BATCH = 512
"""``NBD_REP_SERVER`` replies sent per write while streaming an export list."""
BATCH_BYTES = 1 << 17
"""Inline replies are flushed once this many bytes wait. Kept below a Unix socket's
send buffer (about 200 KiB): a larger writev only half-completes and then waits for the
client, which doubled the CPU per 256 KiB read and halved sequential throughput."""

# Plain ints for the per-request path (enum attribute access and arithmetic are slow).
_READ, _WRITE, _BLOCK_STATUS = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.BLOCK_STATUS)
_INLINE = frozenset({_READ, _WRITE, _BLOCK_STATUS})
_FLUSH, _TRIM, _ZERO, _CACHE = int(Cmd.FLUSH), int(Cmd.TRIM), int(Cmd.WRITE_ZEROES), int(Cmd.CACHE)
_DF = int(CmdFlag.DF)

_PAYLOAD = frozenset({_READ, _WRITE})
"""Commands whose requests hold payload in memory (counted against max_buffered)."""

_TF = TransmissionFlag


def transmission_flags(caps: Caps, structured: bool) -> int:
    """The transmission flags advertising what an open context can do."""
    f = int(_TF.HAS_FLAGS)  # plain ints: IntFlag arithmetic is slow and this runs per INFO
    if not caps.write:
        f |= _TF.READ_ONLY.value
    if caps.flush:
        f |= _TF.SEND_FLUSH.value
    if caps.write and caps.fua is not FuaMode.NONE:
        f |= _TF.SEND_FUA.value
    if caps.rotational:
        f |= _TF.ROTATIONAL.value
    if caps.trim:
        f |= _TF.SEND_TRIM.value
    if caps.zero is not ZeroMode.NONE:
        f |= _TF.SEND_WRITE_ZEROES.value
        if caps.fast_zero:
            f |= _TF.SEND_FAST_ZERO.value
    if structured:
        f |= _TF.SEND_DF.value
    if caps.multi_conn:
        f |= _TF.CAN_MULTI_CONN.value
    if caps.cache is not CacheMode.NONE:
        f |= _TF.SEND_CACHE.value
    return f


class Connection:
    """One client, from greeting to close."""

    def __init__(
        self, server: Server, stream: trio.abc.Stream, conn_id: int, refusal: str | None = None
    ):
        self.server = server
        self.chain = server.chain
        self.config = server.config
        self.id = conn_id
        self.refusal = refusal
        """Why every option is refused (ERR_POLICY), for a client that is not served."""
        self.transport = Transport(stream)
        self.proto = ServerConnection(self.config.handshake_flags)
        self.info = ClientInfo(conn_id, _peer_name(stream))
        self.ctx: Next | None = None
        """The context of the export chosen for transmission: set as soon as GO or
        EXPORT_NAME has opened it (``Server.close_connections`` sees the export in use
        while the answer is sent), back to ``None`` if GO then fails."""
        self.draining = False
        self.retire_deadline: float | None = None
        """Set by :meth:`retire`: when a retired connection closes at the latest."""
        self.closed = trio.Event()
        # Statistics: plain ints, cheap to bump on the per-request path.
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors = 0
        self._stall_limit: float | None = None
        """While negotiating: how long a send may wait for the client to read."""
        self._receive_scope: trio.CancelScope | None = None
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
        self._send_lock = trio.StrictFIFOLock()
        self._sending = False
        self._batch: list[Buffer] = []
        self._batch_bytes = 0

    def __repr__(self) -> str:
        return f"<Connection {self.id}>"

    def debug(self, msg: str, *args: object) -> None:
        log.debug("conn %d: " + msg, self.id, *args)

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def is_tls(self) -> bool:
        return self.info.is_tls

    async def run(self) -> None:
        """Serve this client until it leaves (or the server drains it)."""
        set_current_client(self.info)
        try:
            ctx = None
            self._stall_limit = self.config.handshake_timeout
            try:
                await self._send([self.proto.greeting()])
                ctx = await self._negotiate()
            except trio.TooSlowError:
                log.info(
                    "conn %d: no complete option within %ss (handshake timeout); closing",
                    self.id,
                    self.config.handshake_timeout,
                )
            self._stall_limit = None
            if ctx is None:
                return
            try:
                await self._transmit(ctx)
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(self.config.shutdown_timeout):
                        if self.server.shutting_down or self.retire_deadline is not None:
                            await self._flush_at_shutdown(ctx)
                        await ctx.close()
        # except*: errors raised while requests are in flight arrive wrapped in the
        # request nursery's ExceptionGroup. Whatever goes wrong, only this client is lost.
        except* RemoteProtocolError as group:
            for e in group.exceptions:
                log.warning("conn %d: protocol error: %s; closing", self.id, e)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as group:
            self.debug("connection lost: %s", "; ".join(map(str, group.exceptions)))
        except* Exception as group:
            for error in group.exceptions:
                log.error("conn %d: internal error; closing", self.id, exc_info=error)
        finally:
            await self.transport.aclose()
            self.closed.set()

    async def _flush_at_shutdown(self, ctx: Next) -> None:
        """The server is going away: flush a writable context, so that writes acknowledged
        to the client leave every layer's buffers (write-back caches, the plugin's own).
        A client that leaves on its own flushes if it cares; nbdkit does not flush then."""
        caps = ctx.caps
        if caps is None or not (caps.write and caps.flush):
            return
        try:
            await ctx.flush(0)
        except (NBDError, OSError) as e:
            log.error("conn %d: flush at shutdown failed: %s", self.id, e)

    def drain(self) -> None:
        """Stop reading new requests; in-flight ones finish and get their replies."""
        self.draining = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    def uses(self, layer: Layer, match: Callable[[Next], bool]) -> bool:
        """Whether this connection's context of ``layer`` satisfies ``match``."""
        ctx = self.ctx
        while ctx is not None:
            if ctx.layer is layer:
                return match(ctx)
            ctx = ctx.below
        return False

    def retire(self, grace: float) -> None:
        """The export went away: stop serving it. Requests in flight finish; requests
        still arriving get ``ESHUTDOWN``; the connection closes when the client
        disconnects, or after ``grace`` seconds (cancelling what still runs)."""
        if self.retire_deadline is None:
            self.retire_deadline = trio.current_time() + grace
            self.debug("export %r retired; closing within %.1fs", self.info.export_name, grace)
        self.drain()

    async def _receive(self, deadline: float) -> bool:
        """Feed the next bytes to the state machine; False when draining. Raises
        ``trio.TooSlowError`` when no byte arrived before ``deadline`` (the handshake
        and idle timeouts)."""
        if self.draining:
            return False
        data = self.transport.receive_nowait()
        if data is not None:  # no wait, so no cancel scope needed
            self.proto.receive_data(data)
            return True
        with trio.CancelScope(deadline=deadline) as scope:
            self._receive_scope = scope
            data = await self.transport.receive()
            self.proto.receive_data(data)
        self._receive_scope = None
        if self.draining:
            return False
        if scope.cancelled_caught:
            raise trio.TooSlowError
        return True

    async def _send(self, buffers: list[Buffer]) -> None:
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # uncontended: no scheduler round trip
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self.transport.send(buffers, self._stall_limit)
        finally:
            lock.release()

    # --- handshake -----------------------------------------------------------------------

    async def _negotiate(self) -> Next | None:
        """Haggle options until the client enters transmission (returns its context).

        The handshake timeout is the client's time: it has ``handshake_timeout`` seconds
        from the greeting or the previous answer to send a whole option, and a send may
        wait that long for it to read. The time the plugin and filters take to answer
        does not count (their work is never cut short by it). Raises
        ``trio.TooSlowError`` when the client overstays."""
        proto = self.proto
        timeout = self.config.handshake_timeout
        clock = trio.current_time
        deadline = math.inf if timeout is None else clock() + timeout
        while True:
            event = proto.next_event()
            if event is NEED_DATA:
                if not await self._receive(deadline):
                    return None
                continue
            self.debug("option %s", event)
            refused = self._refusal(event)
            if refused is not None:
                option, reply, message = refused
                if isinstance(event, ExportNameOption):
                    log.info("conn %d: EXPORT_NAME refused (%s); closing", self.id, message)
                    return None
                await self._refuse(option, reply, message)
            elif isinstance(event, InfoOption):
                ctx = await self._info(event)
                if ctx is not None:
                    return ctx
            elif isinstance(event, ExportNameOption):
                return await self._export_name(event)
            elif isinstance(event, ListOption):
                await self._list(event.option)
            elif isinstance(event, StructuredReplyOption):
                if self.config.structured_replies:
                    await self._send([proto.accept_structured_replies(event.option)])
                else:
                    await self._refuse(event.option, Rep.ERR_UNSUP, "structured replies are off")
            elif isinstance(event, MetaContextOption):
                await self._meta_context(event)
            elif isinstance(event, StartTLSOption):
                if not await self._starttls(event.option):
                    return None
            elif isinstance(event, AbortOption):
                try:
                    await self._send([proto.abort(event.option)])
                except (trio.BrokenResourceError, ConnectionError):
                    pass  # the client may close without reading the ACK
                return None
            elif isinstance(event, InvalidOption):
                await self._refuse(event.option, Rep(event.reply), event.message)
            elif isinstance(event, UnknownOption):
                await self._refuse(
                    event.option, Rep.ERR_UNSUP, f"option {event.option} is not supported"
                )
            elif isinstance(event, ConnectionClosed):
                return None
            else:
                raise LocalProtocolError(f"unexpected event during the handshake: {event}")
            if timeout is not None:
                deadline = clock() + timeout

    async def _refuse(self, option: int, reply: Rep, message: str) -> None:
        self.debug("refusing option %d with %s: %s", option, reply.name, message)
        await self._send([self.proto.reply_error(option, reply, message)])

    def _refusal(self, event: object) -> tuple[int, Rep, str] | None:
        """``(option, error, message)`` if the option ``event`` is refused unseen: a
        client over the connection limit gets ERR_POLICY for every option but ABORT;
        under ``--tls=require`` before TLS, every option but STARTTLS and ABORT gets
        ERR_TLS_REQD."""
        if not isinstance(event, OptionEvent) or event.option == Opt.ABORT:
            return None
        option = event.option
        if self.refusal is not None:
            return option, Rep.ERR_POLICY, self.refusal
        if self.config.tls is TLSMode.REQUIRE and not self.is_tls and option != Opt.STARTTLS:
            return option, Rep.ERR_TLS_REQD, "TLS is required: send STARTTLS first"
        return None

    async def _option_failed(self, option: int, what: str, error: Exception) -> None:
        """Answer an option whose backend call raised: an ``NBDError`` becomes the
        matching error reply; anything else is a bug, logged once with its traceback,
        and answered ERR_UNKNOWN. Either way the client may go on negotiating."""
        if isinstance(error, NBDError):
            await self._refuse(option, option_error(error.errno), error.message)
            return
        log.error("conn %d: %s failed unexpectedly", self.id, what, exc_info=error)
        await self._refuse(option, Rep.ERR_UNKNOWN, f"{what}: internal server error")

    async def _starttls(self, option: int) -> bool:
        """Answer STARTTLS; after an ACK the TLS handshake follows and everything
        negotiated before is forgotten. False when the connection must close."""
        context = self.config.tls_context
        if self.config.tls is TLSMode.OFF or context is None:
            await self._refuse(option, Rep.ERR_POLICY, "TLS is off on this server")
            return True
        if self.is_tls:
            await self._refuse(option, Rep.ERR_INVALID, "TLS is already active")
            return True
        await self._send([self.proto.start_tls(option)])
        timeout = self.config.handshake_timeout
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                version = await self.transport.start_tls(context)
        except trio.BrokenResourceError as e:
            log.warning("conn %d: TLS handshake failed: %s; closing", self.id, e.__cause__ or e)
            return False
        self.info.is_tls = True
        self.debug("TLS handshake done (%s)", version)
        return True

    async def _open(self, requested: str) -> tuple[str, Next]:
        """Resolve ``""`` to the default export's name and open the export."""
        top = self.chain.top
        readonly = self.config.readonly
        name = requested or await top.default_export(readonly, self.is_tls)
        return name, await top.open(readonly, name, self.is_tls)

    async def _info(self, event: InfoOption) -> Next | None:
        proto = self.proto
        try:
            name, ctx = await self._open(event.name)
        except Exception as e:
            await self._option_failed(event.option, f"opening export {event.name!r}", e)
            return None
        if event.option == Opt.GO:
            self.ctx = ctx
        try:
            assert ctx.caps is not None
            caps = ctx.caps
            flags = transmission_flags(caps, proto.structured)
            try:
                description = await ctx.export_description()
            except Exception as e:
                self.ctx = None
                with trio.CancelScope(shield=True):
                    await ctx.close()
                await self._option_failed(event.option, f"describing export {name!r}", e)
                return None
            frames = proto.reply_info(
                event.option,
                event.requests,
                name=name,
                description=description,
                size=caps.size,
                flags=flags,
                block_size=caps.block_size,
            )
            if event.option == Opt.GO:
                await self._send([frames, proto.go(event.option, event.name, caps.size, flags)])
                self.info.export_name = name
                return ctx
            await self._send([frames, proto.reply(event.option, Rep.ACK)])
        except BaseException:
            with trio.CancelScope(shield=True):
                await ctx.close()
            raise
        with trio.CancelScope(shield=True):
            await ctx.close()
        return None

    async def _export_name(self, event: ExportNameOption) -> Next | None:
        try:
            name, ctx = await self._open(event.name)
        except NBDError as e:
            log.info("conn %d: export %r: %s; closing (EXPORT_NAME)", self.id, event.name, e)
            return None
        except Exception as e:
            log.error(
                "conn %d: opening export %r failed unexpectedly; closing (EXPORT_NAME)",
                self.id, event.name, exc_info=e,
            )  # fmt: skip
            return None
        assert ctx.caps is not None
        self.ctx = ctx
        flags = transmission_flags(ctx.caps, self.proto.structured)
        try:
            await self._send([self.proto.export_name_reply(event.name, ctx.caps.size, flags)])
        except BaseException:
            with trio.CancelScope(shield=True):
                await ctx.close()
            raise
        self.info.export_name = name
        return ctx

    async def _list(self, option: int) -> None:
        proto = self.proto
        batch: list[Buffer] = []
        count = 0
        try:
            exports = await self.chain.top.list_exports(self.config.readonly, self.is_tls)
            # A streamed list may fail after some of it was sent: the error reply ends it.
            async for export in each_export(exports):
                try:
                    batch.append(proto.reply_server(option, export.name, export.description))
                except LocalProtocolError as e:
                    log.warning("conn %d: not listing an export: %s", self.id, e)
                    continue
                count += 1
                if len(batch) >= LIST_BATCH:
                    await self._send(batch)
                    batch = []
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise  # the client is gone: nothing to answer
        except Exception as e:
            await self._option_failed(option, "listing exports", e)
            return
        batch.append(proto.reply(option, Rep.ACK))
        await self._send(batch)
        proto.grant_options(MAX_OPTIONS * count)  # nbdinfo --list asks about each export

    async def _meta_context(self, event: MetaContextOption) -> None:
        proto = self.proto
        is_set = event.option == Opt.SET_META_CONTEXT
        if not self.config.meta_contexts:
            if is_set:
                proto.clear_meta_contexts()
            await self._refuse(event.option, Rep.ERR_UNSUP, "meta contexts are off")
            return
        if is_set and not proto.structured:
            proto.clear_meta_contexts()
            await self._refuse(
                event.option,
                Rep.ERR_INVALID,
                "SET_META_CONTEXT needs structured replies to be negotiated first",
            )
            return
        wanted = {BASE_ALLOCATION} if is_set else {BASE_ALLOCATION, "base:"}
        matched = not event.queries and not is_set
        matched = matched or any(q in wanted for q in event.queries)
        contexts = {BASE_ALLOCATION_ID: BASE_ALLOCATION} if matched else {}
        await self._send([proto.reply_meta_contexts(event, contexts)])

    # --- transmission --------------------------------------------------------------------

    async def _transmit(self, ctx: Next) -> None:
        proto = self.proto
        inline = self.server.inline
        serve = self._serve
        batch = self._batch
        limit = self._limit
        idle = self.config.idle_timeout
        self.debug(
            "transmission on export %r (flags 0x%04x)", self.info.export_name, proto.export_flags
        )
        drained = False
        async with trio.open_nursery() as requests:
            while True:
                event = proto.next_event()
                kind = type(event)
                if kind is Request:
                    event = cast(Request, event)
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
                        received = await self._receive(deadline)
                    except trio.TooSlowError:
                        log.info(
                            "conn %d: idle for %ss with no request in flight (idle timeout); "
                            "closing",
                            self.id,
                            idle,
                        )
                        received = False
                    if not received:
                        drained = True
                        break
                elif kind is BadRequest:
                    event = cast(BadRequest, event)
                    self.debug("bad request: %s", event.message)
                    self.requests += 1
                    batch += self._error(event.cookie, event.error, event.message)
                elif kind is Disconnect or kind is ConnectionClosed:
                    self.debug("client disconnected (%s)", kind.__name__)
                    if kind is ConnectionClosed and self._tasks:
                        # Gone without NBD_CMD_DISC: no one will read the replies, so stop
                        # the requests still running (a remote plugin's GETs, say).
                        self.debug("cancelling %d requests in flight", self._tasks)
                        requests.cancel_scope.cancel()
                    break
                else:
                    raise LocalProtocolError(f"unexpected event in transmission: {event}")
            if batch:
                await self._flush_batch()
            if drained and self.retire_deadline is not None:
                requests.cancel_scope.deadline = self.retire_deadline
                await self._refuse_retired()

    async def _refuse_retired(self) -> None:
        """Answer every request still arriving with ``ESHUTDOWN`` until the client
        disconnects (or the server shuts down, or the grace period ends)."""
        proto = self.proto
        message = f"export {self.info.export_name!r} is gone; disconnect"
        while not self.server.shutting_down:
            event = proto.next_event()
            if isinstance(event, Request | BadRequest):
                self.requests += 1
                await self._send(self._error(event.cookie, Err.ESHUTDOWN, message))
            elif event is NEED_DATA:
                with trio.CancelScope() as self._receive_scope:
                    proto.receive_data(await self.transport.receive())
                if self._receive_scope.cancelled_caught:
                    return
            else:
                return

    async def _flush_batch(self) -> None:
        frames = self._batch[:]
        self._batch.clear()
        self._batch_bytes = 0
        slots = self._queued_slots
        if not slots:
            await self._send(frames)
            return
        held = self._queued_held
        self._queued_slots = self._queued_held = 0
        try:
            await self._send(frames)
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
        self.debug("%d bytes held by requests in flight; reading waits", self._held)
        while self._held > self.config.max_buffered:
            self._freed = trio.Event()
            await self._freed.wait()

    async def _serve_task(self, ctx: Next, request: Request, held: int) -> None:
        """Serve ``request`` and see its reply sent; ``held`` is its payload (counted
        against ``max_buffered`` by the reader) until then."""
        queued = False
        try:
            frames = await self._serve(ctx, request)
            queued = True  # from here on the batch holds the slot and the payload
            try:
                await self._reply(frames, held)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as e:
                self.debug("reply to cookie %d not sent: %s", request.cookie, e)
        finally:
            if not queued:
                self._release(1, held)
            self._tasks -= 1
            idle = self.config.idle_timeout
            if idle is not None and not self._tasks and self._receive_scope is not None:
                # The reader waits without a deadline while requests are in flight.
                self._receive_scope.deadline = trio.current_time() + idle

    def _error(self, cookie: int, error: int, message: str) -> list[Buffer]:
        """The error reply to a request, counted in :attr:`errors`."""
        self.errors += 1
        if self.proto.structured:
            return [wire.error_chunk(cookie, error, message)]
        return [wire.simple_reply(cookie, error)]

    async def _serve(self, ctx: Next, req: Request) -> list[Buffer]:
        """Do one request; return its reply frames (errors become error replies)."""
        cmd = req.command
        self.requests += 1
        try:
            if cmd == _READ:
                if req.length == 0:
                    return self._empty_read(req.cookie)
                data = await ctx.pread(req.length, req.offset, req.flags)
                if len(data) != req.length:
                    raise NBDError(
                        errno.EIO,
                        f"{ctx.layer.name}: read of {req.length} bytes returned {len(data)}",
                    )
                self.bytes_read += req.length
                return self._read_reply(req, data)
            if cmd == _WRITE:
                if req.length:
                    await ctx.pwrite(req.data, req.offset, req.flags)
                    self.bytes_written += req.length
            elif cmd == _BLOCK_STATUS:
                if req.length == 0:
                    raise NBDError(errno.EINVAL, "block status of 0 bytes")
                extents = await ctx.extents(req.length, req.offset, req.flags)
                pairs = [(e.length, e.flags) for e in extents]
                return [wire.block_status_chunk(req.cookie, BASE_ALLOCATION_ID, pairs)]
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
            return [wire.simple_reply(req.cookie, 0)]
        except NBDError as e:
            self.debug("cookie %d: %s", req.cookie, e)
            return self._error(req.cookie, nbd_error(e.errno, req.flags), e.message)
        except OSError as e:
            code = e.errno or errno.EIO
            self.debug("cookie %d: %s", req.cookie, e)
            return self._error(req.cookie, nbd_error(code, req.flags), str(e))
        except Exception:
            log.exception("conn %d: request %s failed unexpectedly", self.id, req)
            return self._error(req.cookie, Err.EIO, "internal server error")

    def _empty_read(self, cookie: int) -> list[Buffer]:
        if self.proto.structured:
            return [wire.none_chunk(cookie)]
        return [wire.simple_reply(cookie, 0)]

    def _read_reply(self, req: Request, data: bytes) -> list[Buffer]:
        if not self.proto.structured:
            return [wire.simple_reply(req.cookie, 0), data]
        if type(data) is Sparse and data.holes and not req.flags & _DF:
            return _sparse_chunks(req.cookie, req.offset, data)
        return [wire.data_chunk_header(req.cookie, req.offset, len(data)), data]


def _peer_name(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        try:
            peer = stream.socket.getpeername()
        except OSError:
            return "?"
        if isinstance(peer, tuple):
            return f"{peer[0]}:{peer[1]}"
        return str(peer) or "unix"
    return type(stream).__name__


def _sparse_chunks(cookie: int, offset: int, data: Sparse) -> list[Buffer]:
    """OFFSET_DATA and OFFSET_HOLE chunks covering ``data``; the last carries DONE."""
    view = memoryview(data)
    pieces: list[tuple[bool, int, int]] = []  # (is_hole, start, length)
    pos = 0
    for start, length in data.holes:
        if start > pos:
            pieces.append((False, pos, start - pos))
        pieces.append((True, start, length))
        pos = start + length
    if pos < len(data):
        pieces.append((False, pos, len(data) - pos))
    frames: list[Buffer] = []
    last = len(pieces) - 1
    for i, (hole, start, length) in enumerate(pieces):
        if hole:
            frames.append(wire.hole_chunk(cookie, offset + start, length, done=i == last))
        else:
            frames.append(wire.data_chunk_header(cookie, offset + start, length, done=i == last))
            frames.append(view[start : start + length])
    return frames
