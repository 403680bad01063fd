"""The client side of NBD as a sans-IO state machine.

Used by the ``nbd`` plugin to proxy another server and by the tests to talk to ours.
The caller sends the bytes returned by :meth:`ClientConnection.option` and
:meth:`ClientConnection.request`, feeds what the server sends to
:meth:`ClientConnection.receive_data`, and takes events out of
:meth:`ClientConnection.next_event`. The ``parse_*`` functions decode the payloads of
option replies (``OptionReply.payload``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from . import wire
from .constants import (
    EXTENDED_REPLY_MAGIC,
    IHAVEOPT,
    MAX_REQUEST,
    NBDMAGIC,
    REP_FLAG_ERROR,
    REPLY_MAGIC,
    REPLY_TYPE_FLAG_ERROR,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Err,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA,
    BlockStatusChunk,
    ConnectionClosed,
    DataChunk,
    ErrorChunk,
    ExportNameReply,
    Greeting,
    HoleChunk,
    NeedData,
    NoneChunk,
    OptionReply,
    ReplyEvent,
    SimpleReply,
)
from .wire import (
    BLOCK_STATUS_EXT_HEAD,
    CHUNK_HEADER,
    EXTENDED_HEADER,
    GREETING,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    OPTION_REPLY_HEADER,
    SIMPLE_REPLY,
    U16,
    U32,
    U64,
)

ClientEvent = Greeting | OptionReply | ExportNameReply | ReplyEvent | ConnectionClosed

MAX_OPTION_REPLY = 64 * 1024 * 1024
"""Longest option reply payload accepted from a server."""
MAX_CHUNK = MAX_REQUEST + 8
"""Longest structured chunk payload accepted from a server."""
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)


class ClientPhase(enum.Enum):
    GREETING = "waiting for the greeting"
    CLIENT_FLAGS = "about to send client flags"
    OPTIONS = "option haggling"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class ClientConnection:
    """One connection to an NBD server, seen from the client."""

    def __init__(self) -> None:
        self.phase = ClientPhase.GREETING
        self.handshake_flags = HandshakeFlag(0)
        self.structured = False
        self.extended = False
        """Extended headers were negotiated: 32-byte requests and reply headers (and
        structured replies)."""
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._pending_option: int | None = None
        self._reads: dict[int, int] = {}
        """cookie -> length of in-flight READ requests (to size simple replies)."""

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the server; ``b""`` means it closed the connection."""
        if not data:
            self._eof = True
            return
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 1 << 16:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def _need(self, what: str) -> NeedData | ConnectionClosed:
        if not self._eof:
            return NEED_DATA
        closed_cleanly = self.buffered == 0
        self.phase = ClientPhase.CLOSED
        if closed_cleanly:
            return ConnectionClosed()
        raise RemoteProtocolError(
            f"server closed the connection: expected {what}, got {self.buffered} bytes"
        )

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    # --- handshake -----------------------------------------------------------------------

    def client_flags(self) -> bytes:
        """The 4-byte client flags, echoing what the server offered."""
        if self.phase is not ClientPhase.CLIENT_FLAGS:
            raise LocalProtocolError(f"cannot send client flags while {self.phase.value}")
        flags = ClientFlag.C_FIXED_NEWSTYLE
        if self.handshake_flags & HandshakeFlag.NO_ZEROES:
            flags |= ClientFlag.C_NO_ZEROES
        self.phase = ClientPhase.OPTIONS
        return U32.pack(flags)

    def option(self, option: int, payload: bytes = b"") -> bytes:
        """An option request. Only one may be outstanding at a time."""
        if self.phase is not ClientPhase.OPTIONS:
            raise LocalProtocolError(f"cannot send an option while {self.phase.value}")
        if self._pending_option is not None:
            raise LocalProtocolError(
                f"option {self._pending_option} is still waiting for its final reply"
            )
        self._pending_option = option
        return wire.option_request(option, payload)

    def next_event(self) -> ClientEvent | NeedData:
        if self.phase is ClientPhase.TRANSMISSION:
            return self._next_reply()
        if self.phase is ClientPhase.OPTIONS:
            if self._pending_option == Opt.EXPORT_NAME:
                return self._export_name_reply()
            return self._option_reply()
        if self.phase is ClientPhase.GREETING:
            return self._greeting()
        if self.phase is ClientPhase.CLIENT_FLAGS:
            return NEED_DATA
        raise LocalProtocolError("the connection is closed")

    def _greeting(self) -> ClientEvent | NeedData:
        if self.buffered < GREETING.size:
            return self._need("an 18-byte greeting")
        magic, newstyle, flags = GREETING.unpack_from(self._buf, self._pos)
        if magic != NBDMAGIC:
            raise RemoteProtocolError(f"bad greeting magic 0x{magic:016x}, expected NBDMAGIC")
        if newstyle != IHAVEOPT:
            raise RemoteProtocolError(
                f"server is not newstyle: got 0x{newstyle:016x} where IHAVEOPT was expected"
            )
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError(f"server does not offer fixed newstyle (flags 0x{flags:04x})")
        self._pos += GREETING.size
        self.handshake_flags = HandshakeFlag(flags & 0x3)
        self.phase = ClientPhase.CLIENT_FLAGS
        return Greeting(flags)

    def _option_reply(self) -> ClientEvent | NeedData:
        if self.buffered < OPTION_REPLY_HEADER.size:
            return self._need("a 20-byte option reply header")
        magic, option, reply, length = OPTION_REPLY_HEADER.unpack_from(self._buf, self._pos)
        if magic != REPLY_MAGIC:
            raise RemoteProtocolError(f"bad option reply magic 0x{magic:016x}")
        if self._pending_option is None or option != self._pending_option:
            raise RemoteProtocolError(
                f"reply for option {option}, but option {self._pending_option} was sent"
            )
        if length > MAX_OPTION_REPLY:
            raise RemoteProtocolError(f"option reply of {length} bytes is too large")
        if self.buffered < OPTION_REPLY_HEADER.size + length:
            return self._need(f"{length} bytes of option reply payload")
        self._pos += OPTION_REPLY_HEADER.size
        payload = self._take(length)
        if reply == Rep.ACK or reply & REP_FLAG_ERROR:
            self._pending_option = None
            if reply == Rep.ACK:
                if length:
                    raise RemoteProtocolError(f"ACK with a {length}-byte payload")
                if option == Opt.STRUCTURED_REPLY:
                    self.structured = True
                elif option == Opt.EXTENDED_HEADERS:
                    self.structured = self.extended = True
                elif option == Opt.GO:
                    self.phase = ClientPhase.TRANSMISSION
                elif option == Opt.ABORT:
                    self.phase = ClientPhase.CLOSED
                elif option == Opt.STARTTLS:
                    self.structured = self.extended = False
        return OptionReply(option, reply, payload)

    def _export_name_reply(self) -> ClientEvent | NeedData:
        zeroes = not self.handshake_flags & HandshakeFlag.NO_ZEROES
        size = 134 if zeroes else 10
        if self.buffered < size:
            return self._need(f"a {size}-byte EXPORT_NAME reply")
        export_size, flags = wire.EXPORT_NAME_REPLY.unpack_from(self._buf, self._pos)
        self._pos += size
        self._pending_option = None
        self.phase = ClientPhase.TRANSMISSION
        return ExportNameReply(export_size, flags)

    # --- transmission --------------------------------------------------------------------

    def request(
        self, cookie: int, command: int, flags: int, offset: int, length: int, data: bytes = b""
    ) -> bytes:
        """A request header, followed by ``data``: a WRITE's bytes, or for a BLOCK_STATUS
        (extended headers only) the ids of the meta contexts it asks about, 4 bytes each
        (the payload form: PAYLOAD_LEN, then the effect length ``length`` and the ids).
        With extended headers the header has 32 bytes and a WRITE carries PAYLOAD_LEN."""
        if self.phase is not ClientPhase.TRANSMISSION:
            raise LocalProtocolError(f"cannot send a request while {self.phase.value}")
        if command == Cmd.WRITE and len(data) != length:
            raise LocalProtocolError(f"write of {length} bytes with {len(data)} bytes of data")
        if command == Cmd.BLOCK_STATUS and data:
            if not self.extended or len(data) % 4:
                raise LocalProtocolError(
                    "block status with context ids needs extended headers and 4 bytes per id"
                )
            payload = U64.pack(length) + data
            return (
                wire.extended_request(cookie, command, flags | _PAYLOAD_LEN, offset, len(payload))
                + payload
            )
        if command == Cmd.READ:
            if cookie in self._reads:
                raise LocalProtocolError(f"cookie {cookie} is already in flight")
            self._reads[cookie] = length
        elif command == Cmd.DISC:
            self.phase = ClientPhase.CLOSED
        if self.extended:
            if command == Cmd.WRITE:
                flags |= _PAYLOAD_LEN
            return wire.extended_request(cookie, command, flags, offset, length) + data
        return wire.request(cookie, command, flags, offset, length) + data

    def _next_reply(self) -> ClientEvent | NeedData:
        if self.extended:
            return self._next_extended_reply()
        if self.buffered < 4:
            return self._need("a reply")
        (magic,) = U32.unpack_from(self._buf, self._pos)
        if magic == SIMPLE_REPLY_MAGIC:
            if self.buffered < SIMPLE_REPLY.size:
                return self._need("a 16-byte simple reply")
            _, error, cookie = SIMPLE_REPLY.unpack_from(self._buf, self._pos)
            length = self._reads.get(cookie, 0) if error == 0 else 0
            if self.buffered < SIMPLE_REPLY.size + length:
                return self._need(f"{length} bytes of read data")
            self._pos += SIMPLE_REPLY.size
            self._reads.pop(cookie, None)
            return SimpleReply(cookie, error, self._take(length))
        if magic != STRUCTURED_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad reply magic 0x{magic:08x}")
        if self.buffered < CHUNK_HEADER.size:
            return self._need("a 20-byte chunk header")
        _, flags, kind, cookie, length = CHUNK_HEADER.unpack_from(self._buf, self._pos)
        if length > MAX_CHUNK:
            raise RemoteProtocolError(f"chunk of {length} bytes is too large")
        if self.buffered < CHUNK_HEADER.size + length:
            return self._need(f"{length} bytes of chunk payload")
        self._pos += CHUNK_HEADER.size
        payload = self._take(length)
        done = bool(flags & ReplyFlag.DONE)
        if done:
            self._reads.pop(cookie, None)
        return _parse_chunk(kind, cookie, payload, done, False)

    def _next_extended_reply(self) -> ClientEvent | NeedData:
        """The next chunk after extended headers: 32-byte headers only (the offset they
        echo is the request's, not checked here)."""
        if self.buffered < EXTENDED_HEADER.size:
            return self._need("a 32-byte extended reply header")
        magic, flags, kind, cookie, _, length = EXTENDED_HEADER.unpack_from(self._buf, self._pos)
        if magic != EXTENDED_REPLY_MAGIC:
            raise RemoteProtocolError(
                f"bad reply magic 0x{magic:08x}: extended headers were negotiated, "
                f"0x{EXTENDED_REPLY_MAGIC:08x} expected"
            )
        if length > MAX_CHUNK:
            raise RemoteProtocolError(f"chunk of {length} bytes is too large")
        if self.buffered < EXTENDED_HEADER.size + length:
            return self._need(f"{length} bytes of chunk payload")
        self._pos += EXTENDED_HEADER.size
        payload = self._take(length)
        done = bool(flags & ReplyFlag.DONE)
        if done:
            self._reads.pop(cookie, None)
        return _parse_chunk(kind, cookie, payload, done, True)


def _parse_chunk(kind: int, cookie: int, payload: bytes, done: bool, extended: bool) -> ReplyEvent:
    size = len(payload)
    if kind == ReplyType.NONE:
        if size or not done:
            raise RemoteProtocolError("NONE chunk must be empty and carry DONE")
        return NoneChunk(cookie, done)
    if kind == ReplyType.OFFSET_DATA:
        if size < 9:
            raise RemoteProtocolError(f"OFFSET_DATA chunk of {size} bytes; at least 9 expected")
        return DataChunk(cookie, U64.unpack_from(payload)[0], payload[8:], done)
    if kind == ReplyType.OFFSET_HOLE:
        if size != 12:
            raise RemoteProtocolError(f"OFFSET_HOLE chunk of {size} bytes; 12 expected")
        offset, length = wire.HOLE_PAYLOAD.unpack(payload)
        if length == 0:
            raise RemoteProtocolError("OFFSET_HOLE chunk with length 0")
        return HoleChunk(cookie, offset, length, done)
    if kind == ReplyType.BLOCK_STATUS and not extended:
        if size < 12 or (size - 4) % 8:
            raise RemoteProtocolError(f"BLOCK_STATUS chunk of {size} bytes")
        (context,) = U32.unpack_from(payload)
        extents = tuple(wire.EXTENT.iter_unpack(payload[4:]))
        return BlockStatusChunk(cookie, context, extents, done)
    if kind == ReplyType.BLOCK_STATUS_EXT and extended:
        if size < 24 or (size - 8) % 16:
            raise RemoteProtocolError(f"BLOCK_STATUS_EXT chunk of {size} bytes")
        context, count = BLOCK_STATUS_EXT_HEAD.unpack_from(payload)
        if count != (size - 8) // 16:
            raise RemoteProtocolError(
                f"BLOCK_STATUS_EXT chunk of {size} bytes says it holds {count} extents"
            )
        extents = tuple(wire.EXTENT_EXT.iter_unpack(payload[8:]))
        return BlockStatusChunk(cookie, context, extents, done)
    if kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
        if size < 6:
            raise RemoteProtocolError(f"error chunk of {size} bytes; at least 6 expected")
        error, mlen = wire.ERROR_HEAD.unpack_from(payload)
        tail = 8 if kind == ReplyType.ERROR_OFFSET else 0
        if 6 + mlen + tail != size:
            raise RemoteProtocolError(f"error chunk of {size} bytes with a {mlen}-byte message")
        if error == 0:
            raise RemoteProtocolError("error chunk with error value 0")
        message = payload[6 : 6 + mlen].decode("utf-8", "replace")
        offset = U64.unpack_from(payload, 6 + mlen)[0] if tail else None
        return ErrorChunk(cookie, error, message, offset, done)
    if kind & REPLY_TYPE_FLAG_ERROR:
        # Unknown error types still fail the request (spec); keep the connection.
        return ErrorChunk(cookie, Err.EIO, f"unknown error chunk type {kind}", None, done)
    if kind in (ReplyType.BLOCK_STATUS, ReplyType.BLOCK_STATUS_EXT):
        negotiated = "were" if extended else "were not"
        raise RemoteProtocolError(
            f"{ReplyType(kind).name} chunk, but extended headers {negotiated} negotiated"
        )
    raise RemoteProtocolError(f"unknown structured reply chunk type {kind}")


# --- option reply payloads ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What a server said about an export: its ``NBD_REP_INFO`` replies to INFO/GO, or
    the raw reply to EXPORT_NAME (which carries only size and flags)."""

    name: str
    """The canonical name (``NBD_INFO_NAME``), else the name that was asked for."""
    size: int
    flags: TransmissionFlag
    description: str | None = None
    block_size: tuple[int, int, int] | None = None
    """(minimum, preferred, maximum payload) from ``NBD_INFO_BLOCK_SIZE``, if sent."""


def parse_info_replies(name: str, payloads: Iterable[bytes]) -> ExportInfo:
    """Combine the payloads of the ``NBD_REP_INFO`` replies to INFO/GO for ``name``.

    Unknown info types are ignored (spec); a missing ``NBD_INFO_EXPORT`` or a payload of
    the wrong size raises ``RemoteProtocolError``.
    """
    export: tuple[int, int] | None = None
    canonical = name
    description: str | None = None
    block_size: tuple[int, int, int] | None = None
    for payload in payloads:
        if len(payload) < 2:
            raise RemoteProtocolError(f"NBD_REP_INFO of {len(payload)} bytes; at least 2 expected")
        (kind,) = U16.unpack_from(payload)
        if kind == Info.EXPORT:
            if len(payload) != INFO_EXPORT.size:
                raise RemoteProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes; 12 expected")
            export = INFO_EXPORT.unpack(payload)[1:]
        elif kind == Info.NAME:
            canonical = payload[2:].decode("utf-8", "replace")
        elif kind == Info.DESCRIPTION:
            description = payload[2:].decode("utf-8", "replace")
        elif kind == Info.BLOCK_SIZE:
            if len(payload) != INFO_BLOCK_SIZE.size:
                raise RemoteProtocolError(
                    f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes; 14 expected"
                )
            _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(payload)
            block_size = (minimum, preferred, maximum)
    if export is None:
        raise RemoteProtocolError(f"export {name!r} acknowledged without NBD_INFO_EXPORT")
    size, flags = export
    if not flags & TransmissionFlag.HAS_FLAGS:
        raise RemoteProtocolError(f"transmission flags 0x{flags:04x} lack HAS_FLAGS")
    return ExportInfo(canonical, size, TransmissionFlag(flags), description, block_size)


def parse_server_reply(payload: bytes) -> tuple[str, str]:
    """``(name, description)`` from an ``NBD_REP_SERVER`` payload (LIST)."""
    if len(payload) < 4:
        raise RemoteProtocolError(f"NBD_REP_SERVER of {len(payload)} bytes; at least 4 expected")
    (length,) = U32.unpack_from(payload)
    if length > len(payload) - 4:
        raise RemoteProtocolError(
            f"NBD_REP_SERVER names a {length}-byte export in a {len(payload)}-byte reply"
        )
    name = payload[4 : 4 + length].decode("utf-8", "replace")
    return name, payload[4 + length :].decode("utf-8", "replace")


def parse_meta_context_reply(payload: bytes) -> tuple[int, str]:
    """``(context id, name)`` from an ``NBD_REP_META_CONTEXT`` payload."""
    if len(payload) < 5:
        raise RemoteProtocolError(
            f"NBD_REP_META_CONTEXT of {len(payload)} bytes; at least 5 expected"
        )
    return U32.unpack_from(payload)[0], payload[4:].decode("utf-8", "replace")
