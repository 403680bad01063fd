"""Byte layouts shared by the server and client state machines (all big-endian).

Encoders return ``bytes``; decoders live in the state machines that own a receive
buffer. The encoders of reply chunks take plain ints (enum attribute access costs more
than the packing): they run once per request.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from .constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Info,
    ReplyFlag,
    ReplyType,
)

GREETING = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
REQUEST = struct.Struct(">IHHQQI")
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")
DATA_CHUNK_HEADER = struct.Struct(">IHHQIQ")
"""A structured chunk header followed by the 8-byte offset of OFFSET_DATA."""
HOLE_CHUNK = struct.Struct(">IHHQIQI")
HOLE_PAYLOAD = struct.Struct(">QI")
EXTENDED_HEADER = struct.Struct(">IHHQQQ")
"""An extended reply chunk header: magic, flags, type, cookie, the request's offset,
and a 64-bit payload length."""
EXTENDED_DATA_HEADER = struct.Struct(">IHHQQQQ")
"""An extended chunk header followed by the 8-byte offset of OFFSET_DATA."""
EXTENDED_HOLE_CHUNK = struct.Struct(">IHHQQQQI")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
EXTENT = struct.Struct(">II")
EXTENT_EXT = struct.Struct(">QQ")
BLOCK_STATUS_EXT_HEAD = struct.Struct(">II")
"""The payload of BLOCK_STATUS_EXT starts with the context id and the extent count."""
ERROR_HEAD = struct.Struct(">IH")

EXPORT_NAME_PADDING = bytes(124)

Buffer = bytes | bytearray | memoryview
"""What the state machines hand out to be sent: whole frames, or a payload sent as is."""

_DONE = int(ReplyFlag.DONE)
_NONE = int(ReplyType.NONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_OFFSET_HOLE = int(ReplyType.OFFSET_HOLE)
_BLOCK_STATUS = int(ReplyType.BLOCK_STATUS)
_BLOCK_STATUS_EXT = int(ReplyType.BLOCK_STATUS_EXT)
_ERROR = int(ReplyType.ERROR)
_ERROR_OFFSET = int(ReplyType.ERROR_OFFSET)


def clip_message(message: str) -> bytes:
    """UTF-8 encode ``message`` and cut it to MAX_STRING bytes (clients drop longer ones)."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= MAX_STRING:
        return raw
    return raw[: MAX_STRING - 3].decode("utf-8", "ignore").encode() + b"..."


def greeting(handshake_flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def option_request(option: int, payload: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(payload)) + payload


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(REPLY_MAGIC, option, reply, len(payload)) + payload


def server_entry(option: int, reply: int, name: str, description: str) -> bytes:
    """One ``NBD_REP_SERVER`` reply (``reply`` is passed in to keep this module enum-free)."""
    raw = name.encode()
    return option_reply(option, reply, U32.pack(len(raw)) + raw + clip_message(description))


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def info_text(info: int, text: str) -> bytes:
    return U16.pack(info) + clip_message(text)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def name_and_infos(name: str, infos: Iterable[int]) -> bytes:
    """Payload of ``NBD_OPT_INFO`` / ``NBD_OPT_GO``."""
    raw = name.encode()
    items = tuple(infos)
    return U32.pack(len(raw)) + raw + struct.pack(f">H{len(items)}H", len(items), *items)


def name_and_queries(name: str, queries: Iterable[str]) -> bytes:
    """Payload of ``NBD_OPT_LIST_META_CONTEXT`` / ``NBD_OPT_SET_META_CONTEXT``."""
    raw = name.encode()
    items = [q.encode() for q in queries]
    parts = [U32.pack(len(raw)), raw, U32.pack(len(items))]
    for q in items:
        parts += [U32.pack(len(q)), q]
    return b"".join(parts)


def request(cookie: int, command: int, flags: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


def extended_request(cookie: int, command: int, flags: int, offset: int, length: int) -> bytes:
    """A 32-byte request header; ``length`` is the payload's length if ``flags`` has
    PAYLOAD_LEN, else the effect length (64 bits)."""
    return EXTENDED_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length)


def simple_reply(cookie: int, error: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def data_chunk_header(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    """Header (and offset) of an OFFSET_DATA chunk carrying ``length`` data bytes."""
    return DATA_CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC,
        _DONE if done else 0,
        _OFFSET_DATA,
        cookie,
        length + 8,
        offset,
    )


def hole_chunk(cookie: int, offset: int, length: int, done: bool = False) -> bytes:
    return HOLE_CHUNK.pack(
        STRUCTURED_REPLY_MAGIC,
        _DONE if done else 0,
        _OFFSET_HOLE,
        cookie,
        12,
        offset,
        length,
    )


def none_chunk(cookie: int) -> bytes:
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, _DONE, _NONE, cookie, 0)


def _error_payload(error: int, message: str, offset: int | None) -> tuple[int, bytes]:
    """The type and payload of an ERROR chunk (ERROR_OFFSET with an ``offset``)."""
    text = clip_message(message)
    body = ERROR_HEAD.pack(error, len(text)) + text
    if offset is None:
        return _ERROR, body
    return _ERROR_OFFSET, body + U64.pack(offset)


def error_chunk(cookie: int, error: int, message: str, offset: int | None = None) -> bytes:
    kind, body = _error_payload(error, message, offset)
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, _DONE, kind, cookie, len(body)) + body


def block_status_chunk(
    cookie: int, context_id: int, extents: Iterable[tuple[int, int]], done: bool = True
) -> bytes:
    """A BLOCK_STATUS chunk; ``extents`` are (length, flags) pairs, each length > 0."""
    body = [U32.pack(context_id)]
    body += [EXTENT.pack(length, flags) for length, flags in extents]
    payload = b"".join(body)
    header = CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, _DONE if done else 0, _BLOCK_STATUS, cookie, len(payload)
    )
    return header + payload


# --- extended reply chunks: 32-byte headers echoing the request's offset ----------------


def extended_data_header(
    cookie: int, request_offset: int, offset: int, length: int, done: bool = True
) -> bytes:
    """Header (and offset) of an extended OFFSET_DATA chunk carrying ``length`` bytes."""
    return EXTENDED_DATA_HEADER.pack(
        EXTENDED_REPLY_MAGIC,
        _DONE if done else 0,
        _OFFSET_DATA,
        cookie,
        request_offset,
        length + 8,
        offset,
    )


def extended_hole_chunk(
    cookie: int, request_offset: int, offset: int, length: int, done: bool = False
) -> bytes:
    return EXTENDED_HOLE_CHUNK.pack(
        EXTENDED_REPLY_MAGIC,
        _DONE if done else 0,
        _OFFSET_HOLE,
        cookie,
        request_offset,
        12,
        offset,
        length,
    )


def extended_none_chunk(cookie: int, request_offset: int) -> bytes:
    return EXTENDED_HEADER.pack(EXTENDED_REPLY_MAGIC, _DONE, _NONE, cookie, request_offset, 0)


def extended_error_chunk(
    cookie: int, request_offset: int, error: int, message: str, offset: int | None = None
) -> bytes:
    kind, body = _error_payload(error, message, offset)
    header = EXTENDED_HEADER.pack(
        EXTENDED_REPLY_MAGIC, _DONE, kind, cookie, request_offset, len(body)
    )
    return header + body


def block_status_ext_chunk(
    cookie: int,
    request_offset: int,
    context_id: int,
    extents: Sequence[tuple[int, int]],
    done: bool = True,
) -> bytes:
    """A BLOCK_STATUS_EXT chunk: 64-bit (length, flags) pairs, each length > 0."""
    body = [BLOCK_STATUS_EXT_HEAD.pack(context_id, len(extents))]
    body += [EXTENT_EXT.pack(length, flags) for length, flags in extents]
    payload = b"".join(body)
    header = EXTENDED_HEADER.pack(
        EXTENDED_REPLY_MAGIC,
        _DONE if done else 0,
        _BLOCK_STATUS_EXT,
        cookie,
        request_offset,
        len(payload),
    )
    return header + payload
