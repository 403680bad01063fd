"""The frames of a reply to a request, in the shape the negotiation chose.

When transmission starts, :class:`~trionbd.protocol.server.ServerConnection` sets its
``replies`` to :data:`SIMPLE` (no structured replies), :data:`STRUCTURED` or
:data:`EXTENDED` (extended headers). The server asks it for the reply to a request with
its data, extents or error and sends the frames as they are: one list of buffers per
reply, kept together and sent with others in one ``writev``; a read's data is one of the
buffers, never copied. Which header shape goes out is decided here, not by the server.

Every method takes the request (a :class:`~trionbd.protocol.events.RequestEvent`: a
``Request``, or a ``BadRequest`` for :meth:`Replies.error`) and runs once per request:
plain ints, no enum arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from . import wire
from .constants import MAX_EXTENTS, CmdFlag
from .errors import LocalProtocolError
from .events import RequestEvent
from .wire import Buffer

_DF = int(CmdFlag.DF)

Extents = Sequence[tuple[int, int]]
"""The ``(length, flags)`` pairs of one meta context's block status answer, in order."""


class Replies(Protocol):
    """The frames of the reply to one request."""

    def ok(self, req: RequestEvent) -> list[Buffer]:
        """Success with no data: WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE."""
        ...

    def read(self, req: RequestEvent, data: Buffer) -> list[Buffer]:
        """A successful READ of ``data`` (``req.length`` bytes; none for a 0-byte read)."""
        ...

    def sparse_read(
        self, req: RequestEvent, data: Buffer, holes: Sequence[tuple[int, int]]
    ) -> list[Buffer]:
        """A successful READ of ``data`` that is zero in ``holes`` (``(start, length)``
        pairs relative to ``data``, in order, not touching): the holes need not be sent."""
        ...

    def block_status(self, req: RequestEvent, contexts: Mapping[int, Extents]) -> list[Buffer]:
        """A successful BLOCK_STATUS: the extents of each selected meta context, by id
        (at most MAX_EXTENTS of each are sent)."""
        ...

    def error(self, req: RequestEvent, error: int, message: str) -> list[Buffer]:
        """A failed request: ``error`` is an ``Err`` value; ``message`` is sent where the
        shape allows it (structured replies)."""
        ...


class SimpleReplies:
    """Replies without structured replies: a 16-byte simple reply, the data after it."""

    def ok(self, req: RequestEvent) -> list[Buffer]:
        return [wire.simple_reply(req.cookie, 0)]

    def read(self, req: RequestEvent, data: Buffer) -> list[Buffer]:
        if not data:
            return [wire.simple_reply(req.cookie, 0)]
        return [wire.simple_reply(req.cookie, 0), data]

    def sparse_read(
        self, req: RequestEvent, data: Buffer, holes: Sequence[tuple[int, int]]
    ) -> list[Buffer]:
        return self.read(req, data)

    def block_status(self, req: RequestEvent, contexts: Mapping[int, Extents]) -> list[Buffer]:
        raise LocalProtocolError("block status replies need structured replies")

    def error(self, req: RequestEvent, error: int, message: str) -> list[Buffer]:
        return [wire.simple_reply(req.cookie, error)]


class StructuredReplies(SimpleReplies):
    """Replies after ``NBD_OPT_STRUCTURED_REPLY``: reads and block status in chunks,
    errors with their message; other successes stay simple replies (as the
    specification allows, and as nbdkit and qemu-nbd do)."""

    def read(self, req: RequestEvent, data: Buffer) -> list[Buffer]:
        if not data:
            return [wire.none_chunk(req.cookie)]
        return [wire.data_chunk_header(req.cookie, req.offset, len(data)), data]

    def sparse_read(
        self, req: RequestEvent, data: Buffer, holes: Sequence[tuple[int, int]]
    ) -> list[Buffer]:
        """OFFSET_DATA and OFFSET_HOLE chunks covering ``data``; the last carries DONE.
        A DF (don't fragment) read gets one data chunk."""
        if req.flags & _DF or not holes:
            return self.read(req, data)
        cookie, offset = req.cookie, req.offset
        view = memoryview(data)
        frames: list[Buffer] = []
        for hole, start, length, done in _pieces(len(data), holes):
            if hole:
                frames.append(wire.hole_chunk(cookie, offset + start, length, done))
            else:
                frames.append(wire.data_chunk_header(cookie, offset + start, length, done))
                frames.append(view[start : start + length])
        return frames

    def block_status(self, req: RequestEvent, contexts: Mapping[int, Extents]) -> list[Buffer]:
        last = len(contexts) - 1
        return [
            wire.block_status_chunk(req.cookie, context_id, _capped(extents), done=i == last)
            for i, (context_id, extents) in enumerate(contexts.items())
        ]

    def error(self, req: RequestEvent, error: int, message: str) -> list[Buffer]:
        return [wire.error_chunk(req.cookie, error, message)]


class ExtendedReplies:
    """Replies after ``NBD_OPT_EXTENDED_HEADERS``: every reply is made of chunks with
    32-byte headers echoing the request's offset (no simple replies, even for success
    without data); block status goes in BLOCK_STATUS_EXT chunks with 64-bit extents."""

    def ok(self, req: RequestEvent) -> list[Buffer]:
        return [wire.extended_none_chunk(req.cookie, req.offset)]

    def read(self, req: RequestEvent, data: Buffer) -> list[Buffer]:
        if not data:
            return [wire.extended_none_chunk(req.cookie, req.offset)]
        offset = req.offset
        return [wire.extended_data_header(req.cookie, offset, offset, len(data)), data]

    def sparse_read(
        self, req: RequestEvent, data: Buffer, holes: Sequence[tuple[int, int]]
    ) -> list[Buffer]:
        if req.flags & _DF or not holes:
            return self.read(req, data)
        cookie, offset = req.cookie, req.offset
        view = memoryview(data)
        frames: list[Buffer] = []
        for hole, start, length, done in _pieces(len(data), holes):
            if hole:
                frames.append(
                    wire.extended_hole_chunk(cookie, offset, offset + start, length, done)
                )
            else:
                frames.append(
                    wire.extended_data_header(cookie, offset, offset + start, length, done)
                )
                frames.append(view[start : start + length])
        return frames

    def block_status(self, req: RequestEvent, contexts: Mapping[int, Extents]) -> list[Buffer]:
        last = len(contexts) - 1
        cookie, offset = req.cookie, req.offset
        return [
            wire.block_status_ext_chunk(cookie, offset, context_id, _capped(extents), i == last)
            for i, (context_id, extents) in enumerate(contexts.items())
        ]

    def error(self, req: RequestEvent, error: int, message: str) -> list[Buffer]:
        return [wire.extended_error_chunk(req.cookie, req.offset, error, message)]


def _pieces(size: int, holes: Sequence[tuple[int, int]]) -> list[tuple[bool, int, int, bool]]:
    """``(is_hole, start, length, is_last)`` runs covering ``size`` bytes of which
    ``holes`` (sorted, not touching) are zero."""
    pieces: list[tuple[bool, int, int]] = []
    pos = 0
    for start, length in holes:
        if start > pos:
            pieces.append((False, pos, start - pos))
        pieces.append((True, start, length))
        pos = start + length
    if pos < size:
        pieces.append((False, pos, size - pos))
    last = len(pieces) - 1
    return [(hole, start, length, i == last) for i, (hole, start, length) in enumerate(pieces)]


def _capped(extents: Extents) -> Extents:
    """At most MAX_EXTENTS extents (the client asks again for the rest)."""
    return extents if len(extents) <= MAX_EXTENTS else extents[:MAX_EXTENTS]


SIMPLE = SimpleReplies()
STRUCTURED = StructuredReplies()
EXTENDED = ExtendedReplies()
