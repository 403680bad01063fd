"""The client's handshake: options one at a time, until GO (or EXPORT_NAME) hands the
connection to a :class:`~.transmission.Client`."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Self

import trio

from ..chain.types import Export
from ..net.transport import Transport
from ..protocol import wire
from ..protocol.client import (
    ClientConnection,
    ClientEvent,
    ClientPhase,
    ExportInfo,
    parse_info_replies,
    parse_meta_context_reply,
    parse_server_reply,
)
from ..protocol.constants import BASE_ALLOCATION, REP_FLAG_ERROR, Info, Opt, Rep, TransmissionFlag
from ..protocol.errors import ProtocolError
from ..protocol.events import NEED_DATA, ExportNameReply, Greeting, OptionReply
from .errors import STREAM_ERRORS, ConnectionFailed, OptionError, failures
from .transmission import Client

ABORT_TIMEOUT = 1.0
"""Seconds :meth:`Handshake.aclose` waits for the server's ACK to ``NBD_OPT_ABORT``."""
INFO_REQUESTS = (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)
"""What INFO and GO ask the server for (``NBD_INFO_EXPORT`` always comes)."""


class Handshake:
    """A connection in the handshake (option) phase: list exports, ask about one, or
    enter transmission with :meth:`go`.

    Options are sent one at a time (the protocol allows no pipelining here). Use it as
    an async context manager, or call :meth:`aclose`: unless :meth:`go` succeeded, that
    sends ``NBD_OPT_ABORT`` and closes the stream.
    """

    def __init__(self, stream: trio.abc.Stream, peer: str):
        self.peer = peer
        self._transport = Transport(stream)
        self._proto = ClientConnection()
        self._finished = False

    @property
    def structured(self) -> bool:
        """Whether the server accepted structured replies (or extended headers)."""
        return self._proto.structured

    @property
    def extended(self) -> bool:
        """Whether the server accepted extended headers."""
        return self._proto.extended

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _start(self, structured_replies: bool, extended_headers: bool) -> None:
        with failures(self.peer, "reading the greeting"):
            event = await self._event()
            if not isinstance(event, Greeting):
                raise ConnectionFailed(f"{self.peer}: closed the connection before its greeting")
            await self._transport.send([self._proto.client_flags()])
        if structured_replies and extended_headers:
            try:
                await self._option(Opt.EXTENDED_HEADERS)
                return  # structured replies come with them
            except OptionError:
                pass  # compact headers; structured replies may still be had
        if structured_replies:
            try:
                await self._option(Opt.STRUCTURED_REPLY)
            except OptionError:
                pass  # simple replies only; the client copes

    async def _event(self) -> ClientEvent:
        proto = self._proto
        while True:
            event = proto.next_event()
            if event is not NEED_DATA:
                return event
            proto.receive_data(await self._transport.receive())

    async def _option(self, option: Opt, payload: bytes = b"") -> list[OptionReply]:
        """Send one option; return its non-final replies; raise ``OptionError`` on refusal."""
        if self._finished:
            raise ConnectionFailed(f"{self.peer}: the handshake is over")
        with failures(self.peer, f"negotiating {option.name}"):
            await self._transport.send([self._proto.option(option, payload)])
            replies: list[OptionReply] = []
            while True:
                event = await self._event()
                if not isinstance(event, OptionReply):
                    raise ConnectionFailed(
                        f"{self.peer}: closed the connection during {option.name}"
                    )
                if event.reply == Rep.ACK:
                    return replies
                if event.reply & REP_FLAG_ERROR:
                    message = event.payload.decode("utf-8", "replace")
                    raise OptionError(option, event.reply, message)
                replies.append(event)

    async def list_exports(self) -> list[Export]:
        """The server's export list (``NBD_OPT_LIST``): names and descriptions."""
        replies = await self._option(Opt.LIST)
        with failures(self.peer, "reading the export list"):
            return [
                Export(*parse_server_reply(r.payload)) for r in replies if r.reply == Rep.SERVER
            ]

    async def list_meta_contexts(self, export: str = "", queries: Sequence[str] = ()) -> list[str]:
        """The meta contexts the server offers for ``export`` (``NBD_OPT_LIST_META_CONTEXT``):
        those ``queries`` name (a query ending in ``:`` asks for a namespace, such as
        ``qemu:dirty-bitmap:``), or with no queries all it will tell. A server that does
        not know the option raises ``OptionError``."""
        replies = await self._option(Opt.LIST_META_CONTEXT, wire.name_and_queries(export, queries))
        with failures(self.peer, "reading the meta context list"):
            return [
                parse_meta_context_reply(r.payload)[1]
                for r in replies
                if r.reply == Rep.META_CONTEXT
            ]

    async def info(self, export: str = "") -> ExportInfo:
        """What the server says about ``export`` (``NBD_OPT_INFO``); the handshake goes on.

        ``""`` is the default export; ``.name`` is its canonical name if the server says.
        """
        return await self._export_info(Opt.INFO, export, f"reading INFO of {export!r}")

    async def _export_info(self, option: Opt, export: str, doing: str) -> ExportInfo:
        """Ask INFO or GO about ``export`` and read the answer (``doing`` names the step
        in errors)."""
        replies = await self._option(option, wire.name_and_infos(export, INFO_REQUESTS))
        with failures(self.peer, doing):
            return parse_info_replies(export, [r.payload for r in replies if r.reply == Rep.INFO])

    async def go(
        self, export: str = "", *, base_allocation: bool = True, meta_contexts: Sequence[str] = ()
    ) -> Client:
        """Enter transmission with ``export``; the stream now belongs to the returned client.

        With structured replies, ``NBD_OPT_SET_META_CONTEXT`` first selects
        ``base:allocation`` (unless ``base_allocation`` is false) and the contexts named
        in ``meta_contexts`` (``qemu:dirty-bitmap:NAME``, ...), so that
        :meth:`Client.block_status` can ask about them; those the server does not offer
        are left out (:attr:`Client.meta_contexts` says which it selected). A server
        answering GO with ``ERR_UNSUP`` gets ``NBD_OPT_EXPORT_NAME`` instead (it closes
        the connection if it refuses that: ``ConnectionFailed``), unless extended headers
        were negotiated, which rule EXPORT_NAME out.
        """
        wanted = [BASE_ALLOCATION] if base_allocation else []
        wanted += [name for name in meta_contexts if name not in wanted]
        contexts: dict[str, int] = {}
        if wanted and self.structured:
            payload = wire.name_and_queries(export, wanted)
            try:
                replies = await self._option(Opt.SET_META_CONTEXT, payload)
            except OptionError:
                replies = []  # no meta contexts on this server
            with failures(self.peer, "reading meta contexts"):
                for reply in replies:
                    if reply.reply == Rep.META_CONTEXT:
                        cid, name = parse_meta_context_reply(reply.payload)
                        if name in wanted:
                            contexts[name] = cid
        try:
            info = await self._export_info(Opt.GO, export, f"reading GO replies for {export!r}")
        except OptionError as e:
            if e.reply != Rep.ERR_UNSUP or self.extended:
                raise
            info = await self._export_name(export)
        self._finished = True
        return Client(self._transport, self._proto, info, contexts, self.peer)

    async def _export_name(self, export: str) -> ExportInfo:
        with failures(self.peer, f"negotiating EXPORT_NAME {export!r}"):
            await self._transport.send([self._proto.option(Opt.EXPORT_NAME, export.encode())])
            event = await self._event()
        if not isinstance(event, ExportNameReply):
            raise ConnectionFailed(
                f"{self.peer}: closed the connection after EXPORT_NAME {export!r} "
                "(no such export, or the server refused it)"
            )
        return ExportInfo(export, event.size, TransmissionFlag(event.flags))

    async def aclose(self) -> None:
        """Abort the handshake (unless :meth:`go` succeeded) and close the stream."""
        if self._finished:
            return
        self._finished = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(ABORT_TIMEOUT):
                try:
                    if self._proto.phase is ClientPhase.OPTIONS:
                        await self._transport.send([self._proto.option(Opt.ABORT)])
                        await self._event()  # the ACK; the server closes after it
                except (ProtocolError, *STREAM_ERRORS):
                    pass
            await self._transport.aclose()


async def handshake(
    stream: trio.abc.Stream,
    *,
    structured_replies: bool = True,
    extended_headers: bool = True,
    peer: str = "NBD server",
) -> Handshake:
    """Read the greeting on ``stream``, send the client flags and (by default) ask for
    extended headers, then, if the server refuses them, structured replies (no
    ``structured_replies``: neither). The stream belongs to the result (closed if this
    fails)."""
    h = Handshake(stream, peer)
    try:
        await h._start(structured_replies, extended_headers)
    except BaseException:
        await h.aclose()
        raise
    return h
