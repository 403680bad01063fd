"""Events: what the state machines have understood from the bytes they were fed.

Every event is a frozen dataclass. Server-side events describe what a client sent;
client-side events describe what a server sent. Events of one kind share a base class
naming what they have in common: :class:`OptionEvent` (``.option``),
:class:`RequestEvent` (the request header), :class:`ReplyEvent` (``.cookie``) and
:class:`Chunk` (``.done``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA`, its only value (test with ``event is NEED_DATA``)."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""Not an event: more bytes must be fed before another event can be produced."""


# --- server side: options -------------------------------------------------------------


class OptionEvent:
    """Base of the events of one option: ``option`` is its code (an ``Opt`` value for
    the options trionbd knows)."""

    __slots__ = ()
    option: int


@dataclass(frozen=True, slots=True)
class ExportNameOption(OptionEvent):
    """``NBD_OPT_EXPORT_NAME``: the client enters transmission with this export or we close."""

    option: int
    name: str


@dataclass(frozen=True, slots=True)
class AbortOption(OptionEvent):
    option: int


@dataclass(frozen=True, slots=True)
class ListOption(OptionEvent):
    option: int


@dataclass(frozen=True, slots=True)
class StartTLSOption(OptionEvent):
    option: int


@dataclass(frozen=True, slots=True)
class StructuredReplyOption(OptionEvent):
    option: int


@dataclass(frozen=True, slots=True)
class ExtendedHeadersOption(OptionEvent):
    """``NBD_OPT_EXTENDED_HEADERS``: 32-byte headers (and structured replies) wanted."""

    option: int


@dataclass(frozen=True, slots=True)
class InfoOption(OptionEvent):
    """``NBD_OPT_INFO`` or ``NBD_OPT_GO`` (``option`` tells which)."""

    option: int
    name: str
    requests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MetaContextOption(OptionEvent):
    """``NBD_OPT_LIST_META_CONTEXT`` or ``NBD_OPT_SET_META_CONTEXT``."""

    option: int
    name: str
    queries: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnknownOption(OptionEvent):
    """An option this server does not implement; its payload was discarded."""

    option: int


@dataclass(frozen=True, slots=True)
class InvalidOption(OptionEvent):
    """A known option with a malformed payload. Answer it with ``reply`` and ``message``."""

    option: int
    reply: int
    message: str


# --- server side: transmission --------------------------------------------------------


class RequestEvent:
    """Base of :class:`Request` and :class:`BadRequest`: the request's header."""

    __slots__ = ()
    cookie: int
    command: int
    flags: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True, init=False)
class Request(RequestEvent):
    """A valid request. ``data`` is the payload of a WRITE; for a BLOCK_STATUS that
    names the meta contexts it wants (extended headers), their ids, 4 bytes each (see
    ``ServerConnection.contexts_of``); else empty. ``length`` is the effect length.

    One is made for every request, so its ``__init__`` is written out, setting the slots
    through their descriptors: the one ``dataclass`` generates for a frozen class calls
    ``object.__setattr__`` by name for each field, 0.4 µs of a request's 6 to 7."""

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    data: bytes = b""

    def __init__(
        self, cookie: int, command: int, flags: int, offset: int, length: int, data: bytes = b""
    ) -> None:
        _set_cookie(self, cookie)
        _set_command(self, command)
        _set_flags(self, flags)
        _set_offset(self, offset)
        _set_length(self, length)
        _set_data(self, data)


# The slot descriptors' setters: they write a slot directly, frozen or not.
_set_cookie = Request.__dict__["cookie"].__set__
_set_command = Request.__dict__["command"].__set__
_set_flags = Request.__dict__["flags"].__set__
_set_offset = Request.__dict__["offset"].__set__
_set_length = Request.__dict__["length"].__set__
_set_data = Request.__dict__["data"].__set__


@dataclass(frozen=True, slots=True)
class BadRequest(RequestEvent):
    """A request that must be answered with ``error`` (an ``Err`` value) and ``message``.

    Any payload it carried has been (or is being) discarded.
    """

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    error: int
    message: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """``NBD_CMD_DISC``: finish in-flight requests, then close."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side at a message boundary."""


# --- client side ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Greeting:
    handshake_flags: int


@dataclass(frozen=True, slots=True)
class OptionReply:
    """One option reply; ``payload`` is the raw reply payload."""

    option: int
    reply: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ExportNameReply:
    size: int
    flags: int


class ReplyEvent:
    """Base of the replies to a request (simple replies and structured chunks)."""

    __slots__ = ()
    cookie: int


class Chunk(ReplyEvent):
    """Base of the structured reply chunks: ``done`` is set on a request's last chunk."""

    __slots__ = ()
    done: bool


@dataclass(frozen=True, slots=True)
class SimpleReply(ReplyEvent):
    """A simple reply; ``data`` holds a successful READ's bytes."""

    cookie: int
    error: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class DataChunk(Chunk):
    cookie: int
    offset: int
    data: bytes
    done: bool


@dataclass(frozen=True, slots=True)
class HoleChunk(Chunk):
    cookie: int
    offset: int
    length: int
    done: bool


@dataclass(frozen=True, slots=True)
class BlockStatusChunk(Chunk):
    cookie: int
    context_id: int
    extents: tuple[tuple[int, int], ...]
    done: bool


@dataclass(frozen=True, slots=True)
class ErrorChunk(Chunk):
    cookie: int
    error: int
    message: str
    offset: int | None
    done: bool


@dataclass(frozen=True, slots=True)
class NoneChunk(Chunk):
    cookie: int
    done: bool
