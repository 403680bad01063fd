"""Random and mutated input: the state machines give events or a clean protocol error.

Never any other exception, never a hang, and the events do not depend on how the byte
stream was split into receives.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from trionbd.protocol import (
    NEED_DATA,
    AbortOption,
    ClientConnection,
    Cmd,
    CmdFlag,
    ConnectionClosed,
    Disconnect,
    InfoOption,
    Opt,
    Phase,
    RemoteProtocolError,
    ServerConnection,
    TransmissionFlag,
    wire,
)
from trionbd.protocol.constants import BASE_ALLOCATION

HANDSHAKE = b"".join(
    [
        b"\x00\x00\x00\x03",
        wire.option_request(Opt.STRUCTURED_REPLY),
        wire.option_request(Opt.LIST),
        wire.option_request(Opt.INFO, wire.name_and_infos("disk", [1, 2, 3])),
        wire.option_request(
            Opt.LIST_META_CONTEXT, wire.name_and_queries("disk", [BASE_ALLOCATION, "base:"])
        ),
        wire.option_request(Opt.SET_META_CONTEXT, wire.name_and_queries("disk", [BASE_ALLOCATION])),
        wire.option_request(99, b"whatever"),
        wire.option_request(Opt.GO, wire.name_and_infos("disk", [3])),
    ]
)
REQUESTS = b"".join(
    [
        wire.request(1, Cmd.READ, 0, 0, 4096),
        wire.request(2, Cmd.WRITE, 1, 512, 5) + b"hello",
        wire.request(3, Cmd.WRITE_ZEROES, 2, 0, 1 << 20),
        wire.request(4, Cmd.BLOCK_STATUS, 8, 0, 1 << 20),
        wire.request(5, Cmd.WRITE, 0, 1 << 30, 3) + b"bad",
        wire.request(6, Cmd.FLUSH, 0, 0, 0),
        wire.request(7, Cmd.DISC, 0, 0, 0),
    ]
)
EXTENDED_HANDSHAKE = b"".join(
    [
        b"\x00\x00\x00\x03",
        wire.option_request(Opt.EXTENDED_HEADERS),
        wire.option_request(Opt.SET_META_CONTEXT, wire.name_and_queries("disk", [BASE_ALLOCATION])),
        wire.option_request(Opt.GO, wire.name_and_infos("disk", [3])),
    ]
)
PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
EXTENDED_REQUESTS = b"".join(
    [
        wire.extended_request(1, Cmd.READ, 0, 0, 4096),
        wire.extended_request(2, Cmd.WRITE, PAYLOAD_LEN, 512, 5) + b"hello",
        wire.extended_request(3, Cmd.WRITE, 0, 512, 3) + b"abc",  # qemu 10 leaves the flag off
        wire.extended_request(4, Cmd.WRITE_ZEROES, 2, 0, 1 << 20),
        wire.extended_request(5, Cmd.BLOCK_STATUS, PAYLOAD_LEN, 0, 12)
        + struct.pack(">QI", 1 << 20, 1),
        wire.extended_request(6, Cmd.TRIM, PAYLOAD_LEN, 0, 4) + b"junk",
        wire.extended_request(7, Cmd.WRITE_ZEROES, 0, 0, 5 << 30),
        wire.extended_request(8, Cmd.DISC, 0, 0, 0),
    ]
)
SESSIONS = {
    "compact": (HANDSHAKE, REQUESTS),
    "extended": (EXTENDED_HANDSHAKE, EXTENDED_REQUESTS),
}
SIZE = 1 << 20


def drive(chunks: list[bytes], eof: bool = True) -> list[object]:
    """Run a server state machine over ``chunks`` like the real server does."""
    conn = ServerConnection()
    out: list[object] = []
    feed = [*chunks, b""] if eof else list(chunks)
    try:
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                if not feed:
                    return out
                conn.receive_data(feed.pop(0))
                continue
            out.append(event)
            if isinstance(event, ConnectionClosed | Disconnect | AbortOption):
                return out
            if isinstance(event, InfoOption) and event.option == Opt.GO:
                flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_WRITE_ZEROES
                conn.go(Opt.GO, event.name, SIZE, flags | conn.protocol_flags(event.name))
            elif type(event).__name__ == "StructuredReplyOption":
                conn.accept_structured_replies(Opt.STRUCTURED_REPLY)
            elif type(event).__name__ == "ExtendedHeadersOption":
                conn.accept_extended_headers(Opt.EXTENDED_HEADERS)
            elif type(event).__name__ == "MetaContextOption":
                conn.reply_meta_contexts(event, {1: BASE_ALLOCATION})  # type: ignore[arg-type]
    except RemoteProtocolError as e:
        assert conn.phase is Phase.CLOSED, e
        out.append(("error", str(e)))
        return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = []
    last = 0
    for p in [*points, len(data)]:
        if p > last:
            pieces.append(data[last:p])
            last = p
    return pieces


def test_the_reference_sessions_parse() -> None:
    got = drive([HANDSHAKE + REQUESTS])
    assert len(got) == 7 + 7
    assert isinstance(got[-1], Disconnect)
    got = drive([EXTENDED_HANDSHAKE + EXTENDED_REQUESTS])
    assert len(got) == 3 + 8
    assert isinstance(got[-1], Disconnect)


@given(st.lists(st.integers(min_value=0), max_size=30), st.sampled_from(sorted(SESSIONS)))
@settings(max_examples=200, deadline=None)
def test_splitting_the_stream_does_not_change_the_events(cuts: list[int], session: str) -> None:
    data = b"".join(SESSIONS[session])
    assert drive(split(data, cuts)) == drive([data])


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_random_bytes_during_the_handshake(data: bytes) -> None:
    drive([data])
    drive([b"\x00\x00\x00\x03" + data])


@given(st.binary(max_size=400), st.sampled_from(sorted(SESSIONS)))
@settings(max_examples=300, deadline=None)
def test_random_bytes_during_transmission(data: bytes, session: str) -> None:
    drive([SESSIONS[session][0], data])


@given(st.data(), st.sampled_from(sorted(SESSIONS)))
@settings(max_examples=300, deadline=None)
def test_mutated_sessions(data: st.DataObject, session: str) -> None:
    stream = bytearray(b"".join(SESSIONS[session]))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        pos = data.draw(st.integers(0, len(stream) - 1))
        if kind == "flip":
            stream[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "delete":
            del stream[pos : pos + data.draw(st.integers(1, 8))]
        elif kind == "insert":
            stream[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del stream[pos:]
        if not stream:
            stream = bytearray(b"\0")
    drive([bytes(stream)])
    drive([bytes(stream)], eof=False)


@given(
    st.binary(max_size=300),
    st.sampled_from(["greeting", "options", "transmission", "extended transmission"]),
)
@settings(max_examples=300, deadline=None)
def test_client_state_machine_on_random_bytes(data: bytes, phase: str) -> None:
    conn = ClientConnection()
    if phase != "greeting":
        conn.receive_data(wire.greeting(3))
        conn.next_event()
        conn.client_flags()
        if phase == "extended transmission":
            conn.option(Opt.EXTENDED_HEADERS)
            conn.receive_data(wire.option_reply(Opt.EXTENDED_HEADERS, 1))
            conn.next_event()
        conn.option(Opt.GO, wire.name_and_infos("", []))
        if phase.endswith("transmission"):
            conn.receive_data(wire.option_reply(Opt.GO, 1))
            conn.next_event()
            conn.request(1, Cmd.READ, 0, 0, 100)
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        for _ in range(1000):
            event = conn.next_event()
            if isinstance(event, ConnectionClosed) or event is NEED_DATA:
                break
            if conn.phase.name == "CLOSED":
                break
    except RemoteProtocolError:
        pass  # a clean refusal; anything else propagates and fails the test
