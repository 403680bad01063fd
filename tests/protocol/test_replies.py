"""The frames of replies to requests, as the state machine chooses them per negotiation.

The encoders themselves are checked byte for byte in test_server.py; here: which frames
each reply is made of, for simple and structured replies.
"""

from __future__ import annotations

import pytest

from tests.protocol.test_server import COOKIE, h, transmitting
from trionbd.protocol import BadRequest, Cmd, CmdFlag, Err, LocalProtocolError, Request, wire
from trionbd.protocol.replies import SIMPLE, STRUCTURED

READ = Request(COOKIE, Cmd.READ, 0, 4096, 8)


def test_the_negotiation_chooses_the_reply_shape() -> None:
    assert transmitting(structured=True).replies is STRUCTURED
    assert transmitting(structured=False, meta=False).replies is SIMPLE


def test_simple_replies() -> None:
    ok = h("67 44 66 98 00 00 00 00 11 22 33 44 55 66 77 88")
    write = Request(COOKIE, Cmd.WRITE, 0, 0, 2, b"hi")
    assert SIMPLE.ok(write) == [ok]
    assert SIMPLE.read(READ, b"abcdefgh") == [ok, b"abcdefgh"]
    assert SIMPLE.read(Request(COOKIE, Cmd.READ, 0, 0, 0), b"") == [ok]
    # Holes cannot be told without structured replies: the zeroes are sent.
    assert SIMPLE.sparse_read(READ, bytes(8), [(0, 8)]) == [ok, bytes(8)]
    bad = BadRequest(COOKIE, 99, 0, 0, 0, Err.EINVAL, "unknown command 99")
    assert SIMPLE.error(bad, Err.EINVAL, "unknown command 99") == [
        wire.simple_reply(COOKIE, Err.EINVAL)
    ]
    with pytest.raises(LocalProtocolError):
        SIMPLE.block_status(READ, {1: [(8, 0)]})


def test_structured_read_is_one_data_chunk_and_its_data() -> None:
    data = b"abcdefgh"
    frames = STRUCTURED.read(READ, data)
    assert frames == [wire.data_chunk_header(COOKIE, 4096, 8), data]
    assert frames[1] is data  # sent as is, not copied


def test_structured_empty_read_is_a_none_chunk() -> None:
    assert STRUCTURED.read(Request(COOKIE, Cmd.READ, 0, 0, 0), b"") == [wire.none_chunk(COOKIE)]


def test_structured_successes_without_data_stay_simple_replies() -> None:
    flush = Request(COOKIE, Cmd.FLUSH, 0, 0, 0)
    assert STRUCTURED.ok(flush) == [wire.simple_reply(COOKIE, 0)]


def test_sparse_read_sends_holes_as_hole_chunks_and_done_on_the_last() -> None:
    req = Request(COOKIE, Cmd.READ, 0, 1000, 40)
    data = b"a" * 10 + bytes(20) + b"b" * 10
    frames = STRUCTURED.sparse_read(req, data, [(10, 20)])
    assert [bytes(f) for f in frames] == [
        wire.data_chunk_header(COOKIE, 1000, 10, done=False),
        b"a" * 10,
        wire.hole_chunk(COOKIE, 1010, 20),
        wire.data_chunk_header(COOKIE, 1030, 10, done=True),
        b"b" * 10,
    ]


def test_sparse_read_ending_in_a_hole_marks_the_hole_done() -> None:
    req = Request(COOKIE, Cmd.READ, 0, 0, 16)
    frames = STRUCTURED.sparse_read(req, bytes(16), [(0, 16)])
    assert frames == [wire.hole_chunk(COOKIE, 0, 16, done=True)]


def test_df_read_gets_one_data_chunk_despite_its_holes() -> None:
    req = Request(COOKIE, Cmd.READ, CmdFlag.DF, 0, 16)
    data = bytes(16)
    assert STRUCTURED.sparse_read(req, data, [(0, 16)]) == [
        wire.data_chunk_header(COOKIE, 0, 16),
        data,
    ]


def test_block_status_has_one_chunk_per_context_and_done_on_the_last() -> None:
    req = Request(COOKIE, Cmd.BLOCK_STATUS, 0, 0, 0x100000)
    assert STRUCTURED.block_status(req, {1: [(0x100000, 3)]}) == [
        wire.block_status_chunk(COOKIE, 1, [(0x100000, 3)])
    ]
    assert STRUCTURED.block_status(req, {1: [(0x80000, 0)], 2: [(0x100000, 1)]}) == [
        wire.block_status_chunk(COOKIE, 1, [(0x80000, 0)], done=False),
        wire.block_status_chunk(COOKIE, 2, [(0x100000, 1)]),
    ]


def test_structured_errors_carry_their_message() -> None:
    req = Request(COOKIE, Cmd.WRITE, 0, 0, 2, b"hi")
    assert STRUCTURED.error(req, Err.ENOSPC, "disk full") == [
        wire.error_chunk(COOKIE, Err.ENOSPC, "disk full")
    ]
