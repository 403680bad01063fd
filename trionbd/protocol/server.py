"""The server side of NBD as a sans-IO state machine.

Feed it what the client sent with :meth:`ServerConnection.receive_data` (``b""`` for
end of file), take events out with :meth:`ServerConnection.next_event` until it returns
``NEED_DATA``, and send the bytes its reply methods return. It never blocks and never
touches a socket.

Phases: the greeting is sent, the client answers with its flags, options are haggled
(fixed newstyle only), then transmission carries requests until the client disconnects.
In transmission, :attr:`ServerConnection.replies` frames the reply to each request in
the shape the options negotiated (:mod:`.replies`), and requests are read as compact
(28-byte) or, after ``NBD_OPT_EXTENDED_HEADERS``, extended (32-byte) headers.

The rules of option order live here: ``NBD_OPT_EXPORT_NAME`` after extended headers
closes the connection (it cannot carry them); asking twice for structured replies or
extended headers is ``ERR_INVALID``, and for structured replies after extended headers
``ERR_EXT_HEADER_REQD``; an acknowledged ``STARTTLS`` forgets both and the meta contexts.

(Over ~800 lines on purpose: one state machine owns the buffer and the phase, from the
greeting to the last request; split, the per-request path would cross a module and an
object per request.)
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence

from . import wire
from .constants import (
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_DISCARDED_WRITE,
    MAX_META_QUERIES,
    MAX_OPTION_LENGTH,
    MAX_OPTION_PAYLOAD_KEPT,
    MAX_OPTIONS,
    MAX_REQUEST,
    MAX_STRING,
    REQUEST_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Err,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA,
    AbortOption,
    BadRequest,
    ConnectionClosed,
    Disconnect,
    ExportNameOption,
    ExtendedHeadersOption,
    InfoOption,
    InvalidOption,
    ListOption,
    MetaContextOption,
    NeedData,
    OptionEvent,
    Request,
    StartTLSOption,
    StructuredReplyOption,
    UnknownOption,
)
from .replies import EXTENDED, SIMPLE, STRUCTURED, Replies
from .wire import EXTENDED_REQUEST, OPTION_HEADER, REQUEST, U16, U32, U64

ServerEvent = OptionEvent | Request | BadRequest | Disconnect | ConnectionClosed

_COMPACT_BUFFER_AT = 1 << 16


class Phase(enum.Enum):
    CLIENT_FLAGS = "waiting for client flags"
    OPTIONS = "option haggling"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


# Flags each command accepts (FUA is checked against the export separately).
_ALLOWED_FLAGS = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
_WRITES = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
_WRITE = int(Cmd.WRITE)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_FLAG_NEEDS = (
    (int(CmdFlag.FUA), int(TransmissionFlag.SEND_FUA)),
    (int(CmdFlag.DF), int(TransmissionFlag.SEND_DF)),
    (int(CmdFlag.FAST_ZERO), int(TransmissionFlag.SEND_FAST_ZERO)),
)
_NEEDS = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
}
_VERB = {
    Cmd.READ: "read",
    Cmd.WRITE: "write",
    Cmd.TRIM: "trim",
    Cmd.CACHE: "cache",
    Cmd.WRITE_ZEROES: "write zeroes",
    Cmd.BLOCK_STATUS: "block status",
    Cmd.FLUSH: "flush",
}


def match_meta_contexts(event: MetaContextOption, offered: Sequence[str]) -> dict[int, str]:
    """The contexts (id -> name) that the queries of LIST/SET_META_CONTEXT select among
    ``offered``; a context's id is its position there, from 1.

    SET selects the names asked for exactly. LIST also reads a query ending in ``:``
    (a namespace, ``base:``, ``qemu:``, or ``qemu:dirty-bitmap:``) as every offered name
    that starts with it, and no query at all as everything offered. Queries matching
    nothing are ignored, as the specification wants for unknown namespaces.
    """
    contexts = dict(enumerate(offered, 1))
    if event.option == Opt.LIST_META_CONTEXT and not event.queries:
        return contexts
    wildcard = event.option == Opt.LIST_META_CONTEXT
    return {
        cid: name
        for cid, name in contexts.items()
        if any(
            q == name or (wildcard and q.endswith(":") and name.startswith(q))
            for q in event.queries
        )
    }


class _Invalid(Exception):
    """A malformed option payload: answered with ``reply`` and the message."""

    def __init__(self, message: str, reply: Rep = Rep.ERR_INVALID):
        super().__init__(message)
        self.reply = reply


def _decode_string(raw: bytes, what: str) -> str:
    """Decode a protocol string (UTF-8, no NUL, at most MAX_STRING bytes)."""
    if len(raw) > MAX_STRING:
        raise _Invalid(f"{what} is {len(raw)} bytes long; the limit is {MAX_STRING} bytes")
    if b"\0" in raw:
        raise _Invalid(f"{what} contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Invalid(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


class ServerConnection:
    """One client's NBD session, seen from the server, as a pure state machine."""

    def __init__(
        self, handshake_flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    ):
        self.handshake_flags = HandshakeFlag(handshake_flags)
        self.phase = Phase.CLIENT_FLAGS
        self.client_no_zeroes = False
        self.structured = False
        self.extended = False
        """Extended headers were negotiated (they imply :attr:`structured`)."""
        self.tls_active = False
        self.option_budget = MAX_OPTIONS
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._discard = 0
        self._after_discard: ServerEvent | None = None
        # Meta contexts selected by the last SET_META_CONTEXT, and the export it named.
        self.meta_export: str | None = None
        self.meta_contexts: dict[int, str] = {}
        # Set when transmission starts.
        self.export_size = 0
        self.export_flags = TransmissionFlag.HAS_FLAGS
        self.block_status_ok = False
        self.replies: Replies = SIMPLE
        """Frames the replies to requests, in the shape negotiated (set when
        transmission starts)."""
        self._valid: dict[int, tuple[int, int]] = {}

    # --- input ---------------------------------------------------------------------------

    def greeting(self) -> bytes:
        """The 18 bytes the server sends as soon as the client connects."""
        return wire.greeting(self.handshake_flags)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the client; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
            return
        if self._discard:
            n = min(self._discard, len(data))
            self._discard -= n
            data = data[n:]
            if not data:
                return
        buf = self._buf
        if self._pos == len(buf):
            buf.clear()
            self._pos = 0
        elif self._pos > _COMPACT_BUFFER_AT:
            del buf[: self._pos]
            self._pos = 0
        buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (must be 0 before STARTTLS)."""
        return len(self._buf) - self._pos

    def next_event(self) -> ServerEvent | NeedData:
        """The next event, or ``NEED_DATA``. Raises ``RemoteProtocolError`` when the
        client broke the protocol: the connection must then be closed."""
        if self._discard:
            return self._need(f"the rest of a discarded payload ({self._discard} bytes)")
        if self._after_discard is not None:
            event, self._after_discard = self._after_discard, None
            return event
        if self.phase is Phase.TRANSMISSION:
            # A flag test and a method call: cheaper than calling a parser chosen at
            # _start and kept in an attribute (about 190 instructions per request).
            if self.extended:
                return self._next_extended_request()
            return self._next_request()
        if self.phase is Phase.OPTIONS:
            return self._next_option()
        if self.phase is Phase.CLIENT_FLAGS:
            return self._client_flags()
        raise LocalProtocolError("the connection is closed; no more events")

    def _need(self, what: str) -> NeedData | ConnectionClosed:
        if not self._eof:
            return NEED_DATA
        where = self._where()
        self.phase = Phase.CLOSED
        if self.buffered == 0 and not self._discard:
            return ConnectionClosed()
        raise RemoteProtocolError(
            f"client closed the connection in {where}: expected {what}, got {self.buffered} bytes"
        )

    def _where(self) -> str:
        return self.phase.value

    def _client_flags(self) -> ServerEvent | NeedData:
        if self.buffered < 4:
            return self._need("4 bytes of client flags")
        (flags,) = U32.unpack_from(self._buf, self._pos)
        self._pos += 4
        offered = int(self.handshake_flags)
        if flags & ~offered:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(
                f"client flags 0x{flags:08x} set bits the server did not offer (0x{offered:04x})"
            )
        if not flags & ClientFlag.C_FIXED_NEWSTYLE:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(
                "client does not speak fixed newstyle (client flags "
                f"0x{flags:08x} lack C_FIXED_NEWSTYLE); only fixed newstyle is served"
            )
        self.client_no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return self._next_option()

    # --- options -------------------------------------------------------------------------

    def grant_options(self, count: int) -> None:
        """Allow ``count`` more options (the server grants some per listed export)."""
        self.option_budget += count

    def _next_option(self) -> ServerEvent | NeedData:
        if self.buffered < OPTION_HEADER.size:
            return self._need("a 16-byte option header")
        magic, option, length = OPTION_HEADER.unpack_from(self._buf, self._pos)
        if magic != IHAVEOPT:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(
                f"bad option magic: expected 0x{IHAVEOPT:016x} (IHAVEOPT), got 0x{magic:016x}"
            )
        if length > MAX_OPTION_LENGTH:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(
                f"option {option} has a {length}-byte payload; the limit is "
                f"{MAX_OPTION_LENGTH} bytes"
            )
        if self.option_budget <= 0:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError("client sent too many options without entering transmission")
        known = option in Opt._value2member_map_ and option != Opt.PEEK_EXPORT
        if not known or length > MAX_OPTION_PAYLOAD_KEPT:
            # Skip the payload without keeping it in memory.
            self._pos += OPTION_HEADER.size
            self.option_budget -= 1
            if option == Opt.EXPORT_NAME:
                self._check_export_name_allowed()
                self.phase = Phase.CLOSED
                raise RemoteProtocolError(
                    f"export name of {length} bytes; the limit is {MAX_STRING} bytes"
                )
            event: ServerEvent
            if known:
                event = InvalidOption(
                    option,
                    Rep.ERR_TOO_BIG,
                    f"option payload of {length} bytes exceeds the limit of "
                    f"{MAX_OPTION_PAYLOAD_KEPT} bytes",
                )
            else:
                event = UnknownOption(option)
            take = min(length, self.buffered)
            self._pos += take
            self._discard = length - take
            if self._discard:
                self._after_discard = event
                return self._need(f"{length} bytes of option payload")
            return event
        if self.buffered < OPTION_HEADER.size + length:
            return self._need(f"{length} bytes of option {option} payload")
        start = self._pos + OPTION_HEADER.size
        payload = bytes(self._buf[start : start + length])
        self._pos = start + length
        self.option_budget -= 1
        return self._parse_option(Opt(option), payload)

    def _parse_option(self, option: Opt, payload: bytes) -> ServerEvent:
        try:
            return self._parse_option_payload(option, payload)
        except _Invalid as e:
            if option is Opt.EXPORT_NAME:
                # EXPORT_NAME cannot carry an error reply: the only answer is to close.
                self.phase = Phase.CLOSED
                raise RemoteProtocolError(str(e)) from None
            return InvalidOption(option, e.reply, str(e))

    def _check_export_name_allowed(self) -> None:
        if self.extended:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError("EXPORT_NAME after extended headers were negotiated (use GO)")

    def _parse_option_payload(self, option: Opt, payload: bytes) -> ServerEvent:
        if option is Opt.EXPORT_NAME:
            self._check_export_name_allowed()
            return ExportNameOption(option, _decode_string(payload, "export name"))
        if option is Opt.ABORT:
            return AbortOption(option)
        if option in (Opt.LIST, Opt.STARTTLS, Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS):
            if payload:
                raise _Invalid(f"{option.name} takes no payload, got {len(payload)} bytes")
            if option is Opt.LIST:
                return ListOption(option)
            if option is Opt.STARTTLS:
                return StartTLSOption(option)
            if self.extended:
                if option is Opt.STRUCTURED_REPLY:
                    raise _Invalid(
                        "extended headers are negotiated already (they include structured replies)",
                        Rep.ERR_EXT_HEADER_REQD,
                    )
                raise _Invalid("extended headers are negotiated already")
            if option is Opt.EXTENDED_HEADERS:
                return ExtendedHeadersOption(option)
            if self.structured:
                raise _Invalid("structured replies are negotiated already")
            return StructuredReplyOption(option)
        if option in (Opt.INFO, Opt.GO):
            return self._parse_info(option, payload)
        return self._parse_meta(option, payload)

    def _parse_info(self, option: Opt, payload: bytes) -> ServerEvent:
        size = len(payload)
        if size < 6:
            raise _Invalid(f"{option.name} payload of {size} bytes; at least 6 expected")
        (n,) = U32.unpack_from(payload, 0)
        if n > size - 6:
            raise _Invalid(f"export name length {n} runs past the {size}-byte payload")
        (count,) = U16.unpack_from(payload, 4 + n)
        if size != 6 + n + 2 * count:
            raise _Invalid(
                f"{option.name} payload is {size} bytes; {6 + n + 2 * count} expected for "
                f"a {n}-byte name and {count} info requests"
            )
        name = _decode_string(payload[4 : 4 + n], "export name")
        requests = struct.unpack_from(f">{count}H", payload, 6 + n)
        return InfoOption(option, name, requests)

    def _parse_meta(self, option: Opt, payload: bytes) -> ServerEvent:
        size = len(payload)
        if size < 8:
            raise _Invalid(f"{option.name} payload of {size} bytes; at least 8 expected")
        (n,) = U32.unpack_from(payload, 0)
        if n > size - 8:
            raise _Invalid(f"export name length {n} runs past the {size}-byte payload")
        name = _decode_string(payload[4 : 4 + n], "export name")
        (count,) = U32.unpack_from(payload, 4 + n)
        if count > MAX_META_QUERIES:
            raise _Invalid(
                f"{count} meta context queries; the limit is {MAX_META_QUERIES}", Rep.ERR_TOO_BIG
            )
        pos = 8 + n
        queries = []
        for i in range(count):
            if pos + 4 > size:
                raise _Invalid(f"query {i} runs past the {size}-byte payload")
            (q,) = U32.unpack_from(payload, pos)
            if q > size - pos - 4:
                raise _Invalid(f"query {i} of {q} bytes runs past the {size}-byte payload")
            queries.append(_decode_string(payload[pos + 4 : pos + 4 + q], f"query {i}"))
            pos += 4 + q
        if pos != size:
            raise _Invalid(f"{size - pos} stray bytes after the last query")
        return MetaContextOption(option, name, tuple(queries))

    # --- option replies ------------------------------------------------------------------

    def _check_options_phase(self) -> None:
        if self.phase is not Phase.OPTIONS:
            raise LocalProtocolError(f"cannot send an option reply in {self._where()}")

    def reply(self, option: int, reply: Rep = Rep.ACK, payload: bytes = b"") -> bytes:
        """One option reply with a raw payload."""
        self._check_options_phase()
        return wire.option_reply(option, reply, payload)

    def reply_error(self, option: int, reply: Rep, message: str) -> bytes:
        """An error reply; the message is cut to MAX_STRING bytes."""
        if not reply.is_error:
            raise LocalProtocolError(f"{reply.name} is not an error reply")
        return self.reply(option, reply, wire.clip_message(message))

    def reply_server(self, option: int, name: str, description: str = "") -> bytes:
        """One ``NBD_REP_SERVER`` entry of a LIST answer.

        Raises ``LocalProtocolError`` for a name no client could ask for: longer than
        MAX_STRING bytes, or not encodable as UTF-8 (e.g. a file name that is not UTF-8).
        """
        try:
            raw = name.encode()
        except UnicodeEncodeError:
            raise LocalProtocolError(f"export name {name!r} is not valid UTF-8") from None
        if len(raw) > MAX_STRING:
            raise LocalProtocolError(
                f"export name longer than {MAX_STRING} bytes: {name[:64]!r}..."
            )
        self._check_options_phase()
        return wire.server_entry(option, Rep.SERVER, name, description)

    def reply_info(
        self,
        option: int,
        requests: tuple[int, ...],
        *,
        name: str,
        description: str | None,
        size: int,
        flags: int,
        block_size: tuple[int, int, int],
    ) -> bytes:
        """The INFO replies for INFO/GO: EXPORT always first, then what was requested."""
        parts = [self.reply(option, Rep.INFO, wire.info_export(size, flags))]
        for info in dict.fromkeys(requests):
            if info == Info.NAME:
                parts.append(self.reply(option, Rep.INFO, wire.info_text(Info.NAME, name)))
            elif info == Info.DESCRIPTION and description:
                parts.append(
                    self.reply(option, Rep.INFO, wire.info_text(Info.DESCRIPTION, description))
                )
            elif info == Info.BLOCK_SIZE:
                parts.append(self.reply(option, Rep.INFO, wire.info_block_size(*block_size)))
        return b"".join(parts)

    def accept_structured_replies(self, option: int) -> bytes:
        """ACK ``NBD_OPT_STRUCTURED_REPLY``; READ replies will be chunked from now on."""
        self.structured = True
        return self.reply(option, Rep.ACK)

    def accept_extended_headers(self, option: int) -> bytes:
        """ACK ``NBD_OPT_EXTENDED_HEADERS``: from transmission on, requests and replies
        have 32-byte headers, and every reply is chunked (structured replies are
        implied)."""
        self.extended = True
        self.structured = True
        return self.reply(option, Rep.ACK)

    def protocol_flags(self, name: str) -> int:
        """The transmission flags that depend on the negotiation, not on the export:
        ``SEND_DF`` with structured replies, and ``BLOCK_STATUS_PAYLOAD`` with extended
        headers once meta contexts are selected for export ``name`` (as the client
        named it)."""
        flags = 0
        if self.structured:
            flags |= TransmissionFlag.SEND_DF.value
        if self.extended and self.meta_export == name and self.meta_contexts:
            flags |= TransmissionFlag.BLOCK_STATUS_PAYLOAD.value
        return flags

    def reply_meta_contexts(self, event: MetaContextOption, contexts: Mapping[int, str]) -> bytes:
        """Answer LIST/SET_META_CONTEXT with ``contexts`` (id -> name) and an ACK.

        For SET this also records the selection, replacing any earlier one.
        """
        is_set = event.option == Opt.SET_META_CONTEXT
        if is_set:
            self.meta_export = event.name
            self.meta_contexts = dict(contexts)
        parts = [
            self.reply(event.option, Rep.META_CONTEXT, U32.pack(cid if is_set else 0) + n.encode())
            for cid, n in contexts.items()
        ]
        parts.append(self.reply(event.option, Rep.ACK))
        return b"".join(parts)

    def clear_meta_contexts(self) -> None:
        """A failed SET_META_CONTEXT still replaces the selection (with nothing)."""
        self.meta_export = None
        self.meta_contexts = {}

    def start_tls(self, option: int) -> bytes:
        """ACK STARTTLS. Everything negotiated before is forgotten (spec)."""
        if self.buffered:
            raise RemoteProtocolError(
                f"client sent {self.buffered} bytes after STARTTLS before the TLS handshake"
            )
        ack = self.reply(option, Rep.ACK)
        self.tls_active = True
        self.structured = False
        self.extended = False
        self.clear_meta_contexts()
        return ack

    def abort(self, option: int) -> bytes:
        """ACK ABORT; the connection is over."""
        ack = self.reply(option, Rep.ACK)
        self.phase = Phase.CLOSED
        return ack

    # --- entering transmission -----------------------------------------------------------

    def _start(self, name: str, size: int, flags: int) -> None:
        tflags = TransmissionFlag(flags) | TransmissionFlag.HAS_FLAGS
        if tflags & TransmissionFlag.SEND_DF and not self.structured:
            raise LocalProtocolError("SEND_DF advertised without structured replies")
        if tflags & TransmissionFlag.BLOCK_STATUS_PAYLOAD and not self.extended:
            raise LocalProtocolError("BLOCK_STATUS_PAYLOAD advertised without extended headers")
        if tflags & TransmissionFlag.SEND_FAST_ZERO and not (
            tflags & TransmissionFlag.SEND_WRITE_ZEROES
        ):
            raise LocalProtocolError("SEND_FAST_ZERO advertised without SEND_WRITE_ZEROES")
        self.export_size = size
        self.export_flags = tflags
        self.block_status_ok = (
            self.structured and self.meta_export == name and bool(self.meta_contexts)
        )
        if not self.block_status_ok:
            self.meta_contexts = {}
        self._valid = self._valid_requests()
        if self.extended:
            self.replies = EXTENDED
        else:
            self.replies = STRUCTURED if self.structured else SIMPLE
        self.phase = Phase.TRANSMISSION

    def _valid_requests(self) -> dict[int, tuple[int, int]]:
        """command -> (forbidden flag bits, longest length) for the commands this export
        serves; a request passing these (and the size check) needs no further checks.
        Everything else goes through :meth:`_check`, which finds the exact error."""
        valid: dict[int, tuple[int, int]] = {}
        unlimited = 1 << 64  # effect lengths: 32 bits, or 64 with extended headers
        tflags = int(self.export_flags)  # int arithmetic: IntFlag's is slow (once per GO)
        for cmd, allowed in _ALLOWED_FLAGS.items():
            if cmd is Cmd.FLUSH:
                continue  # offset and length must be 0: always checked in full
            if cmd is Cmd.BLOCK_STATUS and not self.block_status_ok:
                continue
            if cmd in _WRITES and tflags & TransmissionFlag.READ_ONLY.value:
                continue
            needed = _NEEDS.get(cmd)
            if needed is not None and not tflags & needed.value:
                continue
            ok = int(allowed)
            for flag, tflag in _FLAG_NEEDS:
                if not tflags & tflag:
                    ok &= ~flag
            limit = MAX_REQUEST if cmd in (Cmd.READ, Cmd.WRITE) else unlimited
            valid[int(cmd)] = (0xFFFF & ~ok, limit)
        return valid

    def go(self, option: int, name: str, size: int, flags: int) -> bytes:
        """The final ACK of a successful GO; transmission starts right after it."""
        ack = self.reply(option, Rep.ACK)
        self._start(name, size, flags)
        return ack

    def export_name_reply(self, name: str, size: int, flags: int) -> bytes:
        """The raw reply to EXPORT_NAME (with the 124 zero bytes unless NO_ZEROES)."""
        self._check_options_phase()
        out = wire.EXPORT_NAME_REPLY.pack(size, flags | TransmissionFlag.HAS_FLAGS)
        if not (self.client_no_zeroes and self.handshake_flags & HandshakeFlag.NO_ZEROES):
            out += wire.EXPORT_NAME_PADDING
        self._start(name, size, flags)
        return out

    # --- transmission --------------------------------------------------------------------

    def _next_request(self) -> ServerEvent | NeedData:
        """The next compact (28-byte) request (its sibling for extended headers is
        :meth:`_next_extended_request`, with the same checks)."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 28:
            return self._need("a 28-byte request header")
        magic, flags, command, cookie, offset, length = REQUEST.unpack_from(buf, pos)
        if magic != REQUEST_MAGIC:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(
                f"bad request magic: expected 0x{REQUEST_MAGIC:08x}, got 0x{magic:08x}"
            )
        valid = self._valid.get(command)
        if (
            valid is not None
            and not flags & valid[0]
            and length <= valid[1]
            and offset + length <= self.export_size
        ):
            problem = None
        elif command == Cmd.DISC:
            self._pos = pos + 28
            self.phase = Phase.CLOSED
            return Disconnect()
        else:
            problem = self._check(command, flags, offset, length)
        if command == _WRITE:
            if problem is not None:
                if length > MAX_DISCARDED_WRITE:
                    self.phase = Phase.CLOSED
                    raise RemoteProtocolError(
                        f"write of {length} bytes refused ({problem[1]}) and its payload is "
                        f"too large to skip (limit {MAX_DISCARDED_WRITE} bytes)"
                    )
                event = BadRequest(cookie, command, flags, offset, length, *problem)
                return self._skip_payload(event, pos + 28, length)
            end = pos + 28 + length
            if len(buf) < end:
                return self._need(f"{length} bytes of write payload")
            self._pos = end
            return Request(cookie, command, flags, offset, length, bytes(buf[pos + 28 : end]))
        self._pos = pos + 28
        if problem is not None:
            return BadRequest(cookie, command, flags, offset, length, *problem)
        return Request(cookie, command, flags, offset, length)

    def _skip_payload(self, event: BadRequest, start: int, length: int) -> ServerEvent | NeedData:
        """Answer ``event`` once the ``length`` payload bytes at ``start`` (in the
        buffer, or still to come) are thrown away."""
        take = min(length, len(self._buf) - start)
        self._pos = start + take
        self._discard = length - take
        if self._discard:
            self._after_discard = event
            return self._need(f"{self._discard} more bytes of a refused request's payload")
        return event

    def _next_extended_request(self) -> ServerEvent | NeedData:
        """The next extended (32-byte) request: a 64-bit length, which is the length of
        a payload following the header when the flags have PAYLOAD_LEN (a WRITE's data,
        a BLOCK_STATUS's context ids), else the effect length. PAYLOAD_LEN is framing,
        not a command flag: the event's flags lack it."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 32:
            return self._need("a 32-byte extended request header")
        magic, flags, command, cookie, offset, length = EXTENDED_REQUEST.unpack_from(buf, pos)
        if magic != EXTENDED_REQUEST_MAGIC:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(
                f"bad request magic: expected 0x{EXTENDED_REQUEST_MAGIC:08x} (extended "
                f"headers were negotiated), got 0x{magic:08x}"
            )
        start = pos + 32
        # A write's length is its payload's even without PAYLOAD_LEN: qemu's client (8.2
        # to 10) leaves the flag off, and qemu-nbd takes the write as it is.
        if flags & _PAYLOAD_LEN or command == _WRITE:
            flags &= ~_PAYLOAD_LEN
            if length > MAX_DISCARDED_WRITE:
                self.phase = Phase.CLOSED
                raise RemoteProtocolError(
                    f"request of type {command} with a {length}-byte payload; the limit is "
                    f"{MAX_DISCARDED_WRITE} bytes"
                )
            if command == _BLOCK_STATUS:
                return self._block_status_with_payload(cookie, flags, offset, length, start)
            if command != _WRITE:
                verb = _VERB.get(command, f"command {command}")
                event = BadRequest(
                    cookie, command, flags, offset, length, Err.EINVAL,
                    f"{verb} requests take no payload (PAYLOAD_LEN set)",
                )  # fmt: skip
                return self._skip_payload(event, start, length)
        valid = self._valid.get(command)
        if (
            valid is not None
            and not flags & valid[0]
            and length <= valid[1]
            and offset + length <= self.export_size
        ):
            problem = None
        elif command == Cmd.DISC:
            self._pos = start
            self.phase = Phase.CLOSED
            return Disconnect()
        else:
            problem = self._check(command, flags, offset, length)
        if command == _WRITE:
            if problem is not None:
                event = BadRequest(cookie, command, flags, offset, length, *problem)
                return self._skip_payload(event, start, length)
            end = start + length
            if len(buf) < end:
                return self._need(f"{length} bytes of write payload")
            self._pos = end
            return Request(cookie, command, flags, offset, length, bytes(buf[start:end]))
        self._pos = start
        if problem is not None:
            return BadRequest(cookie, command, flags, offset, length, *problem)
        return Request(cookie, command, flags, offset, length)

    def _block_status_with_payload(
        self, cookie: int, flags: int, offset: int, size: int, start: int
    ) -> ServerEvent | NeedData:
        """A BLOCK_STATUS whose payload gives its effect length and the ids of the meta
        contexts it wants (8 + 4n bytes); a payload that is malformed, not advertised or
        names ids not selected (or one twice) is read whole and refused with EINVAL."""
        if len(self._buf) - start < size:
            return self._need(f"{size} bytes of block status payload")
        payload = bytes(self._buf[start : start + size])
        self._pos = start + size
        problem: str | None = None
        error = Err.EINVAL
        length = 0
        if not self.export_flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD:
            problem = "block status with a payload was not advertised (BLOCK_STATUS_PAYLOAD)"
        elif size < 12 or (size - 8) % 4:
            problem = (
                f"block status payload of {size} bytes; 8 + 4 per context id expected, "
                "with at least one id"
            )
        else:
            (length,) = U64.unpack_from(payload)
            ids = struct.unpack_from(f">{(size - 8) // 4}I", payload, 8)
            unknown = [i for i in ids if i not in self.meta_contexts]
            if unknown:
                problem = f"block status asks for context id {unknown[0]}, not selected"
            elif len(set(ids)) != len(ids):
                problem = "block status names a context id twice"
        if problem is None:
            found = self._check(_BLOCK_STATUS, flags, offset, length)
            if found is None:
                return Request(cookie, _BLOCK_STATUS, flags, offset, length, payload[8:])
            error, problem = found
        return BadRequest(cookie, _BLOCK_STATUS, flags, offset, length, error, problem)

    def contexts_of(self, req: Request) -> tuple[int, ...]:
        """The ids of the meta contexts a BLOCK_STATUS request asks about: those its
        payload names (extended headers), else every selected one."""
        if req.data:
            return struct.unpack(f">{len(req.data) // 4}I", req.data)
        return tuple(self.meta_contexts)

    def _check(self, command: int, flags: int, offset: int, length: int) -> tuple[Err, str] | None:
        """Validate a request against the export; ``None`` when it may be served.

        The first failure wins, in nbdkit's order: read-only, range, unknown command,
        flags, size, unadvertised command (so a FUA write to a read-only export is EPERM).
        """
        tflags = self.export_flags
        cmd = Cmd(command) if command in _ALLOWED_FLAGS else None
        if cmd in _WRITES and tflags & TransmissionFlag.READ_ONLY:
            return Err.EPERM, f"{_VERB[cmd]} refused: the export is read-only"
        if cmd is Cmd.FLUSH:
            if offset or length:
                return (
                    Err.EINVAL,
                    f"flush with offset {offset} and length {length} (both must be 0)",
                )
        elif cmd is not None and offset + length > self.export_size:
            err = Err.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Err.EINVAL
            return err, (
                f"{_VERB[cmd]} of {length} bytes at offset {offset} is beyond the end of the "
                f"export (size {self.export_size})"
            )
        if cmd is None:
            return Err.EINVAL, f"unknown command {command}"
        verb = _VERB[cmd]
        # int(): ``~`` of an IntFlag complements only its defined members, so unknown
        # bits (0x8000) would slip through.
        if flags & ~int(_ALLOWED_FLAGS[cmd]):
            return Err.EINVAL, f"flags 0x{flags:04x} not valid for {verb} requests"
        if flags & CmdFlag.FUA and not tflags & TransmissionFlag.SEND_FUA:
            return Err.EINVAL, "FUA flag used but not advertised"
        if flags & CmdFlag.DF and not tflags & TransmissionFlag.SEND_DF:
            return Err.EINVAL, "DF flag used without structured replies"
        if flags & CmdFlag.FAST_ZERO and not tflags & TransmissionFlag.SEND_FAST_ZERO:
            return Err.EINVAL, "FAST_ZERO flag used but not advertised"
        if length > MAX_REQUEST and cmd in (Cmd.READ, Cmd.WRITE):
            return Err.EINVAL, f"{verb} of {length} bytes exceeds the limit of {MAX_REQUEST} bytes"
        needed = _NEEDS.get(cmd)
        if needed is not None and not tflags & needed:
            return Err.EINVAL, f"{verb} requests are not supported by this export"
        if cmd is Cmd.BLOCK_STATUS and not self.block_status_ok:
            return Err.EINVAL, (
                "block status needs structured replies and a meta context selected for this export"
            )
        return None
