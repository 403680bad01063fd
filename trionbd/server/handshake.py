"""The handshake of one connection: options answered one at a time from the chain,
until the client enters transmission with GO or EXPORT_NAME, aborts or leaves.

The client has ``handshake_timeout`` seconds for each option (the time the chain takes
to answer does not count). A client over the connection limit, or one that has not sent
STARTTLS under ``--tls=require``, has its options refused unseen
(:meth:`Handshake._refused_unseen`). An export that cannot be opened, described or
listed is answered with the matching option error and its message, and the reason is
logged as a warning (:meth:`~.connection.Connection.warn`); the client may go on
negotiating.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from ..chain import Caps, LayerContext
from ..chain.errors import NBDError
from ..chain.types import CacheMode, FuaMode, ZeroMode, each_export
from ..protocol.constants import (
    BASE_ALLOCATION,
    MAX_OPTIONS,
    Opt,
    Rep,
    TransmissionFlag,
)
from ..protocol.errnos import option_error
from ..protocol.errors import LocalProtocolError
from ..protocol.events import (
    NEED_DATA,
    AbortOption,
    ConnectionClosed,
    ExportNameOption,
    ExtendedHeadersOption,
    InfoOption,
    InvalidOption,
    ListOption,
    MetaContextOption,
    OptionEvent,
    StartTLSOption,
    StructuredReplyOption,
    UnknownOption,
)
from ..protocol.server import match_meta_contexts
from ..protocol.wire import Buffer
from .tls import TLSMode, client_dn

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("trionbd.server")

LIST_BATCH = 512
"""``NBD_REP_SERVER`` replies sent per write while streaming an export list."""

_TF = TransmissionFlag


def transmission_flags(caps: Caps) -> int:
    """The transmission flags advertising what an open context can do (the protocol
    adds those that depend on the negotiation: ``ServerConnection.protocol_flags``)."""
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
    if caps.multi_conn:
        f |= _TF.CAN_MULTI_CONN.value
    if caps.cache is not CacheMode.NONE:
        f |= _TF.SEND_CACHE.value
    return f


class Handshake:
    """Answers the options of one connection (see the module doc)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.proto = conn.proto
        self.config = conn.config
        self.chain = conn.chain
        self._last_warning: str | None = None
        """The last reason logged: a client asking INFO, then GO, about an export that
        cannot be opened gets the same answer twice, logged once."""

    async def run(self) -> LayerContext | None:
        """Haggle options until the client enters transmission (returns its context), or
        ``None`` when the connection is to close.

        The handshake timeout is the client's time: it has ``handshake_timeout`` seconds
        from the greeting or the previous answer to send a whole option, and a send may
        wait that long for it to read. The time the plugin and filters take to answer
        does not count (their work is never cut short by it). Raises
        ``trio.TooSlowError`` when the client overstays."""
        conn = self.conn
        proto = self.proto
        timeout = self.config.handshake_timeout
        clock = trio.current_time
        deadline = math.inf if timeout is None else clock() + timeout
        while True:
            event = proto.next_event()
            if event is NEED_DATA:
                if not await conn.receive(deadline):
                    return None
                continue
            conn.debug("option %s", event)
            if isinstance(event, OptionEvent) and (refused := self._refused_unseen(event.option)):
                reply, message = refused
                if isinstance(event, ExportNameOption):
                    log.info("conn %d: EXPORT_NAME refused (%s); closing", conn.id, message)
                    return None
                await self._send_error(event.option, reply, message)
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
                    await conn.send([proto.accept_structured_replies(event.option)])
                else:
                    await self._send_error(
                        event.option, Rep.ERR_UNSUP, "structured replies are off"
                    )
            elif isinstance(event, ExtendedHeadersOption):
                if self.config.extended_headers and self.config.structured_replies:
                    await conn.send([proto.accept_extended_headers(event.option)])
                else:
                    await self._send_error(event.option, Rep.ERR_UNSUP, "extended headers are off")
            elif isinstance(event, MetaContextOption):
                await self._meta_context(event)
            elif isinstance(event, StartTLSOption):
                if not await self._starttls(event.option):
                    return None
            elif isinstance(event, AbortOption):
                try:
                    await conn.send([proto.abort(event.option)])
                except (trio.BrokenResourceError, ConnectionError):
                    pass  # the client may close without reading the ACK
                return None
            elif isinstance(event, InvalidOption):
                await self._send_error(event.option, Rep(event.reply), event.message)
            elif isinstance(event, UnknownOption):
                await self._send_error(
                    event.option, Rep.ERR_UNSUP, f"option {event.option} is not supported"
                )
            elif isinstance(event, ConnectionClosed):
                return None
            else:
                raise LocalProtocolError(f"unexpected event during the handshake: {event}")
            if timeout is not None:
                deadline = clock() + timeout

    async def _send_error(self, option: int, reply: Rep, message: str) -> None:
        """Answer ``option`` with the error ``reply`` and ``message``."""
        self.conn.debug("option %d answered %s: %s", option, reply.name, message)
        await self.conn.send([self.proto.reply_error(option, reply, message)])

    def _refused_unseen(self, option: int) -> tuple[Rep, str] | None:
        """``(error, message)`` if ``option`` is refused without looking at it: a client
        over the connection limit gets ERR_POLICY for every option but ABORT; under
        ``--tls=require`` before TLS, every option but STARTTLS and ABORT gets
        ERR_TLS_REQD."""
        if option == Opt.ABORT:
            return None
        if self.conn.unserved_reason is not None:
            return Rep.ERR_POLICY, self.conn.unserved_reason
        if self.config.tls is TLSMode.REQUIRE and not self.conn.is_tls and option != Opt.STARTTLS:
            return Rep.ERR_TLS_REQD, "TLS is required: send STARTTLS first"
        return None

    async def _option_failed(self, option: int, what: str, error: Exception) -> None:
        """Answer an option whose backend call raised: an ``NBDError`` becomes the
        matching error reply, and its reason a warning; anything else is a bug, logged
        once with its traceback, and answered ERR_UNKNOWN. Either way the client may go
        on negotiating."""
        if isinstance(error, NBDError):
            warning = f"{what}: {error.message}"
            if warning != self._last_warning:
                self._last_warning = warning
                self.conn.warn("%s", warning)
            await self._send_error(option, option_error(error.errno), error.message)
            return
        log.error("conn %d: %s failed unexpectedly", self.conn.id, what, exc_info=error)
        await self._send_error(option, Rep.ERR_UNKNOWN, f"{what}: internal server error")

    async def _starttls(self, option: int) -> bool:
        """Answer STARTTLS; after an ACK the TLS handshake follows and everything
        negotiated before is forgotten. False when the connection must close."""
        conn = self.conn
        context = self.config.tls_context
        if self.config.tls is TLSMode.OFF or context is None:
            await self._send_error(option, Rep.ERR_POLICY, "TLS is off on this server")
            return True
        if conn.is_tls:
            await self._send_error(option, Rep.ERR_INVALID, "TLS is already active")
            return True
        await conn.send([self.proto.start_tls(option)])
        timeout = self.config.handshake_timeout
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                version = await conn.transport.start_tls(context)
        except trio.BrokenResourceError as e:
            log.warning("conn %d: TLS handshake failed: %s; closing", conn.id, e.__cause__ or e)
            return False
        conn.info.is_tls = True
        stream = conn.transport.stream
        if isinstance(stream, trio.SSLStream):
            conn.info.certificate_dn = client_dn(stream.getpeercert())
        conn.debug("TLS handshake done (%s)", version)
        return True

    async def _open(self, requested: str) -> tuple[str, LayerContext]:
        """Resolve ``""`` to the default export's name and open the export."""
        top = self.chain.top
        readonly = self.config.readonly
        is_tls = self.conn.is_tls
        name = requested or await top.default_export(readonly, is_tls)
        return name, await top.open(readonly, name, is_tls)

    async def _info(self, event: InfoOption) -> LayerContext | None:
        conn = self.conn
        proto = self.proto
        try:
            name, ctx = await self._open(event.name)
        except Exception as e:
            await self._option_failed(event.option, f"opening export {event.name!r}", e)
            return None
        if event.option == Opt.GO:
            conn.ctx = ctx
        try:
            assert ctx.caps is not None
            caps = ctx.caps
            flags = transmission_flags(caps) | proto.protocol_flags(event.name)
            try:
                description = await ctx.export_description()
            except Exception as e:
                conn.ctx = None
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
                await conn.send([frames, proto.go(event.option, event.name, caps.size, flags)])
                conn.info.export_name = name
                return ctx
            await conn.send([frames, proto.reply(event.option, Rep.ACK)])
        except BaseException:
            with trio.CancelScope(shield=True):
                await ctx.close()
            raise
        with trio.CancelScope(shield=True):
            await ctx.close()
        return None

    async def _export_name(self, event: ExportNameOption) -> LayerContext | None:
        conn = self.conn
        try:
            name, ctx = await self._open(event.name)
        except NBDError as e:
            conn.warn("opening export %r: %s; closing (EXPORT_NAME)", event.name, e.message)
            return None
        except Exception as e:
            log.error(
                "conn %d: opening export %r failed unexpectedly; closing (EXPORT_NAME)",
                conn.id, event.name, exc_info=e,
            )  # fmt: skip
            return None
        assert ctx.caps is not None
        conn.ctx = ctx
        flags = transmission_flags(ctx.caps) | self.proto.protocol_flags(event.name)
        try:
            await conn.send([self.proto.export_name_reply(event.name, ctx.caps.size, flags)])
        except BaseException:
            with trio.CancelScope(shield=True):
                await ctx.close()
            raise
        conn.info.export_name = name
        return ctx

    async def _list(self, option: int) -> None:
        conn = self.conn
        proto = self.proto
        batch: list[Buffer] = []
        count = 0
        try:
            exports = await self.chain.top.list_exports(self.config.readonly, conn.is_tls)
            # A streamed list may fail after some of it was sent: the error reply ends it.
            async for export in each_export(exports):
                try:
                    batch.append(proto.reply_server(option, export.name, export.description))
                except LocalProtocolError as e:
                    log.warning("conn %d: not listing an export: %s", conn.id, e)
                    continue
                count += 1
                if len(batch) >= LIST_BATCH:
                    await conn.send(batch)
                    batch = []
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise  # the client is gone: nothing to answer
        except Exception as e:
            await self._option_failed(option, "listing exports", e)
            return
        batch.append(proto.reply(option, Rep.ACK))
        await conn.send(batch)
        proto.grant_options(MAX_OPTIONS * count)  # nbdinfo --list asks about each export

    async def _meta_context(self, event: MetaContextOption) -> None:
        proto = self.proto
        is_set = event.option == Opt.SET_META_CONTEXT
        if not self.config.meta_contexts:
            if is_set:
                proto.clear_meta_contexts()
            await self._send_error(event.option, Rep.ERR_UNSUP, "meta contexts are off")
            return
        if is_set and not proto.structured:
            proto.clear_meta_contexts()
            await self._send_error(
                event.option,
                Rep.ERR_INVALID,
                "SET_META_CONTEXT needs structured replies to be negotiated first",
            )
            return
        readonly, is_tls = self.config.readonly, self.conn.is_tls
        try:
            others = await self.chain.top.meta_contexts(readonly, event.name, is_tls)
            offered = [BASE_ALLOCATION, *others]
        except Exception as e:
            if is_set:
                proto.clear_meta_contexts()
            await self._option_failed(event.option, f"meta contexts of {event.name!r}", e)
            return
        contexts = match_meta_contexts(event, offered)
        await self.conn.send([proto.reply_meta_contexts(event, contexts)])
