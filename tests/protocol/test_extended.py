"""Extended headers in the state machines, byte for byte: the option and its order rules,
32-byte requests with 64-bit lengths and PAYLOAD_LEN, extended replies and
BLOCK_STATUS_EXT, and the client's side of them.

Layouts from the specification's extension (doc/proto.md of NetworkBlockDevice/nbd):
request ``>IHHQQQ`` magic 0x21e41c71; reply header ``>IHHQQQ`` magic 0x6e8a278c whose
offset echoes the request's; BLOCK_STATUS_EXT payload ``>II`` (id, count) + ``>QQ`` each.
"""

from __future__ import annotations

import struct

import pytest

from tests.protocol.test_server import COOKIE, FULL, events, h, negotiating, one
from trionbd.protocol import (
    NEED_DATA,
    BadRequest,
    BlockStatusChunk,
    ClientConnection,
    Cmd,
    CmdFlag,
    DataChunk,
    Disconnect,
    Err,
    ErrorChunk,
    ExtendedHeadersOption,
    HoleChunk,
    InfoOption,
    InvalidOption,
    LocalProtocolError,
    MetaContextOption,
    NoneChunk,
    Opt,
    OptionReply,
    Phase,
    RemoteProtocolError,
    Rep,
    Request,
    ServerConnection,
    StartTLSOption,
    StructuredReplyOption,
    TransmissionFlag,
    wire,
)
from trionbd.protocol.client import ClientPhase
from trionbd.protocol.constants import (
    BASE_ALLOCATION,
    MAX_DISCARDED_WRITE,
    MAX_EXTENTS,
    MAX_REQUEST,
)
from trionbd.protocol.replies import EXTENDED, STRUCTURED

GiB = 1 << 30
TF = TransmissionFlag
PAYLOAD_LEN = CmdFlag.PAYLOAD_LEN


def extended(conn: ServerConnection) -> None:
    """Ask for and accept extended headers."""
    assert one(conn, wire.option_request(Opt.EXTENDED_HEADERS)) == ExtendedHeadersOption(
        Opt.EXTENDED_HEADERS
    )
    conn.accept_extended_headers(Opt.EXTENDED_HEADERS)


def select(conn: ServerConnection, name: str, contexts: dict[int, str]) -> None:
    event = one(
        conn,
        wire.option_request(
            Opt.SET_META_CONTEXT, wire.name_and_queries(name, list(contexts.values()))
        ),
    )
    assert isinstance(event, MetaContextOption)
    conn.reply_meta_contexts(event, contexts)


def transmitting_extended(
    size: int = 8 * GiB, contexts: dict[int, str] | None = None, name: str = "disk"
) -> ServerConnection:
    """In transmission with extended headers; ``base:allocation`` (id 1) selected unless
    ``contexts`` says otherwise."""
    conn = negotiating()
    extended(conn)
    contexts = {1: BASE_ALLOCATION} if contexts is None else contexts
    if contexts:
        select(conn, name, contexts)
    assert isinstance(
        one(conn, wire.option_request(Opt.GO, wire.name_and_infos(name, []))), InfoOption
    )
    conn.go(Opt.GO, name, size, FULL | conn.protocol_flags(name))
    assert conn.phase is Phase.TRANSMISSION
    return conn


def xreq(command: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return wire.extended_request(cookie, command, flags, offset, length)


def bad(conn: ServerConnection, data: bytes) -> BadRequest:
    event = one(conn, data)
    assert isinstance(event, BadRequest), event
    return event


# --- the option and the order of options --------------------------------------------------


def test_extended_headers_ack_matches_the_documented_bytes() -> None:
    conn = negotiating()
    assert one(conn, wire.option_request(Opt.EXTENDED_HEADERS)) == ExtendedHeadersOption(11)
    assert conn.accept_extended_headers(Opt.EXTENDED_HEADERS) == h(
        "00 03 e8 89 04 55 65 a9 | 00 00 00 0b | 00 00 00 01 | 00 00 00 00"
    )
    assert conn.extended and conn.structured  # extended headers imply structured replies


def test_extended_headers_with_a_payload_are_invalid() -> None:
    event = one(negotiating(), wire.option_request(Opt.EXTENDED_HEADERS, b"\0"))
    assert isinstance(event, InvalidOption) and event.reply == Rep.ERR_INVALID
    assert "EXTENDED_HEADERS takes no payload" in event.message


def test_duplicates_and_structured_replies_after_extended_headers() -> None:
    conn = negotiating()
    extended(conn)
    again = one(conn, wire.option_request(Opt.EXTENDED_HEADERS))
    assert isinstance(again, InvalidOption) and again.reply == Rep.ERR_INVALID
    assert again.message == "extended headers are negotiated already"
    sr = one(conn, wire.option_request(Opt.STRUCTURED_REPLY))
    assert isinstance(sr, InvalidOption) and sr.reply == Rep.ERR_EXT_HEADER_REQD
    assert conn.extended  # refusals change nothing


def test_structured_replies_twice_is_invalid_but_extended_headers_may_follow() -> None:
    conn = negotiating()
    assert one(conn, wire.option_request(Opt.STRUCTURED_REPLY)) == StructuredReplyOption(8)
    conn.accept_structured_replies(Opt.STRUCTURED_REPLY)
    again = one(conn, wire.option_request(Opt.STRUCTURED_REPLY))
    assert isinstance(again, InvalidOption) and again.reply == Rep.ERR_INVALID
    assert again.message == "structured replies are negotiated already"
    extended(conn)  # the upgrade is allowed (libnbd and qemu ask for it first, though)
    assert conn.extended


def test_export_name_after_extended_headers_closes() -> None:
    conn = negotiating()
    extended(conn)
    with pytest.raises(RemoteProtocolError, match="EXPORT_NAME after extended headers"):
        events(conn, wire.option_request(Opt.EXPORT_NAME, b"disk"))
    assert conn.phase is Phase.CLOSED


def test_oversized_export_name_after_extended_headers_also_closes_for_that_reason() -> None:
    conn = negotiating()
    extended(conn)
    with pytest.raises(RemoteProtocolError, match="EXPORT_NAME after extended headers"):
        events(conn, wire.option_request(Opt.EXPORT_NAME, b"x" * 70000))


def test_starttls_forgets_extended_headers() -> None:
    conn = negotiating()
    extended(conn)
    select(conn, "", {1: BASE_ALLOCATION})
    assert one(conn, wire.option_request(Opt.STARTTLS)) == StartTLSOption(Opt.STARTTLS)
    conn.start_tls(Opt.STARTTLS)
    assert not conn.extended and not conn.structured and conn.meta_contexts == {}
    extended(conn)  # asked again over TLS: accepted, not a duplicate
    assert conn.extended


def test_protocol_flags_follow_the_negotiation() -> None:
    conn = negotiating()
    assert conn.protocol_flags("disk") == 0
    extended(conn)
    assert conn.protocol_flags("disk") == TF.SEND_DF  # no meta context selected yet
    select(conn, "disk", {1: BASE_ALLOCATION})
    assert conn.protocol_flags("disk") == TF.SEND_DF | TF.BLOCK_STATUS_PAYLOAD
    assert conn.protocol_flags("other") == TF.SEND_DF  # the contexts are for "disk"


def test_block_status_payload_needs_extended_headers() -> None:
    conn = negotiating()
    one(conn, wire.option_request(Opt.STRUCTURED_REPLY))
    conn.accept_structured_replies(Opt.STRUCTURED_REPLY)
    select(conn, "disk", {1: BASE_ALLOCATION})
    assert conn.protocol_flags("disk") == TF.SEND_DF
    one(conn, wire.option_request(Opt.GO, wire.name_and_infos("disk", [])))
    with pytest.raises(LocalProtocolError, match="BLOCK_STATUS_PAYLOAD"):
        conn.go(Opt.GO, "disk", GiB, FULL | TF.BLOCK_STATUS_PAYLOAD)


def test_the_negotiation_chooses_extended_replies() -> None:
    assert transmitting_extended().replies is EXTENDED


# --- requests ---------------------------------------------------------------------------------

READ_4K = h(
    "21 e4 1c 71 | 00 00 | 00 00 | 11 22 33 44 55 66 77 88 | 00 00 00 00 00 00 20 00"
    "| 00 00 00 00 00 00 10 00"
)


def test_read_request_matches_the_documented_layout() -> None:
    assert wire.extended_request(COOKIE, Cmd.READ, 0, 8192, 4096) == READ_4K
    assert one(transmitting_extended(), READ_4K) == Request(COOKIE, Cmd.READ, 0, 8192, 4096)


def test_write_carries_its_payload_and_payload_len_is_not_a_command_flag() -> None:
    conn = transmitting_extended()
    data = bytes(range(256)) * 16
    header = xreq(Cmd.WRITE, 512, len(data), PAYLOAD_LEN | CmdFlag.FUA)
    assert events(conn, header + data[:100]) == []
    assert events(conn, data[100:] + xreq(Cmd.FLUSH, cookie=8)) == [
        Request(7, Cmd.WRITE, CmdFlag.FUA, 512, len(data), data),
        Request(8, Cmd.FLUSH, 0, 0, 0),
    ]


def test_write_without_payload_len_still_carries_its_payload() -> None:
    """qemu's client (8.2 to 10) sends writes without PAYLOAD_LEN; qemu-nbd serves them."""
    conn = transmitting_extended()
    assert events(conn, xreq(Cmd.WRITE, 0, 3) + b"abc" + xreq(Cmd.READ, 0, 3, cookie=8)) == [
        Request(7, Cmd.WRITE, 0, 0, 3, b"abc"),
        Request(8, Cmd.READ, 0, 0, 3),
    ]


@pytest.mark.parametrize("command", [Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.CACHE, Cmd.BLOCK_STATUS])
def test_effect_lengths_have_64_bits(command: int) -> None:
    conn = transmitting_extended(size=8 * GiB)
    five = 5 * GiB
    assert one(conn, xreq(command, GiB, five)) == Request(7, command, 0, GiB, five)
    # Past the end: the same errors as with compact headers.
    event = bad(conn, xreq(command, 4 * GiB, five))
    expected = Err.ENOSPC if command == Cmd.WRITE_ZEROES else Err.EINVAL
    assert event.error == expected and "beyond the end" in event.message


def test_reads_keep_the_payload_limit() -> None:
    conn = transmitting_extended(size=8 * GiB)
    assert one(conn, xreq(Cmd.READ, 0, MAX_REQUEST)) == Request(7, Cmd.READ, 0, 0, MAX_REQUEST)
    event = bad(conn, xreq(Cmd.READ, 0, 5 * GiB))
    assert event.error == Err.EINVAL and "exceeds the limit" in event.message
    data = bytes(MAX_REQUEST + 1)
    event = bad(conn, xreq(Cmd.WRITE, 0, len(data), PAYLOAD_LEN) + data)
    assert event.error == Err.EINVAL and "exceeds the limit" in event.message


def test_payload_on_a_command_without_one_is_read_and_refused() -> None:
    conn = transmitting_extended()
    got = events(conn, xreq(Cmd.TRIM, 0, 5, PAYLOAD_LEN) + b"12345" + xreq(Cmd.FLUSH, cookie=8))
    assert isinstance(got[0], BadRequest) and got[0].error == Err.EINVAL
    assert got[0].message == "trim requests take no payload (PAYLOAD_LEN set)"
    assert got[1] == Request(8, Cmd.FLUSH, 0, 0, 0)


def test_payload_over_128_mib_closes() -> None:
    conn = transmitting_extended()
    with pytest.raises(RemoteProtocolError, match="payload"):
        events(conn, xreq(Cmd.WRITE, 0, MAX_DISCARDED_WRITE + 1, PAYLOAD_LEN))


def test_compact_request_after_extended_headers_closes() -> None:
    conn = transmitting_extended()
    with pytest.raises(RemoteProtocolError, match="0x21e41c71"):
        events(conn, wire.request(7, Cmd.READ, 0, 0, 512) + bytes(4))


def test_disc_and_unknown_commands() -> None:
    conn = transmitting_extended()
    assert bad(conn, xreq(42)).error == Err.EINVAL
    assert events(conn, xreq(Cmd.DISC)) == [Disconnect()]


def test_requests_split_anywhere() -> None:
    conn = transmitting_extended()
    stream = xreq(Cmd.WRITE, 0, 3, PAYLOAD_LEN, cookie=1) + b"abc" + xreq(Cmd.READ, 0, 3, cookie=2)
    got: list[object] = []
    for i in range(len(stream)):
        got += events(conn, stream[i : i + 1])
    assert got == [Request(1, Cmd.WRITE, 0, 0, 3, b"abc"), Request(2, Cmd.READ, 0, 0, 3)]


# --- block status with a payload (NBD_FLAG_BLOCK_STATUS_PAYLOAD) -------------------------


def status_payload(length: int, *ids: int) -> bytes:
    return struct.pack(f">Q{len(ids)}I", length, *ids)


def status_request(payload: bytes, offset: int = 0, flags: int = 0) -> bytes:
    return xreq(Cmd.BLOCK_STATUS, offset, len(payload), flags | PAYLOAD_LEN) + payload


TWO = {1: BASE_ALLOCATION, 2: "qemu:dirty-bitmap:b"}


def test_block_status_payload_names_the_contexts() -> None:
    conn = transmitting_extended(contexts=TWO)
    assert conn.export_flags & TF.BLOCK_STATUS_PAYLOAD
    event = one(conn, status_request(status_payload(6 * GiB, 2), offset=GiB))
    assert event == Request(7, Cmd.BLOCK_STATUS, 0, GiB, 6 * GiB, struct.pack(">I", 2))
    assert isinstance(event, Request) and conn.contexts_of(event) == (2,)
    plain = one(conn, xreq(Cmd.BLOCK_STATUS, 0, 4096, CmdFlag.REQ_ONE))
    assert isinstance(plain, Request) and conn.contexts_of(plain) == (1, 2)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (status_payload(4096, 3), "context id 3, not selected"),
        (status_payload(4096, 1, 1), "names a context id twice"),
        (status_payload(4096), "8 + 4 per context id expected"),
        (status_payload(4096, 1) + b"\0", "8 + 4 per context id expected"),
        (b"\0" * 4, "8 + 4 per context id expected"),
        (status_payload(9 * GiB, 1), "beyond the end"),
    ],
)
def test_bad_block_status_payloads_are_read_and_refused(payload: bytes, message: str) -> None:
    conn = transmitting_extended(contexts=TWO)
    got = events(conn, status_request(payload) + xreq(Cmd.FLUSH, cookie=8))
    assert isinstance(got[0], BadRequest) and got[0].error == Err.EINVAL
    assert message in got[0].message
    assert got[1] == Request(8, Cmd.FLUSH, 0, 0, 0)


def test_block_status_payload_not_advertised_without_meta_contexts() -> None:
    conn = transmitting_extended(contexts={})
    assert not conn.export_flags & TF.BLOCK_STATUS_PAYLOAD
    event = bad(conn, status_request(status_payload(4096, 1)))
    assert "not advertised" in event.message


# --- replies ----------------------------------------------------------------------------------

READ = Request(COOKIE, Cmd.READ, 0, 0x2000, 8)
HEADER = "6e 8a 27 8c"


def test_success_without_data_is_a_none_chunk_never_a_simple_reply() -> None:
    write = Request(COOKIE, Cmd.WRITE, 0, 0x2000, 2, b"hi")
    assert EXTENDED.ok(write) == [
        h(
            f"{HEADER} | 00 01 | 00 00 | 11 22 33 44 55 66 77 88 | 00 00 00 00 00 00 20 00"
            "| 00 00 00 00 00 00 00 00"
        )
    ]
    assert EXTENDED.read(Request(COOKIE, Cmd.READ, 0, 0x2000, 0), b"") == EXTENDED.ok(write)


def test_read_is_one_data_chunk_echoing_the_request_offset() -> None:
    assert EXTENDED.read(READ, b"abcdefgh") == [
        h(
            f"{HEADER} | 00 01 | 00 01 | 11 22 33 44 55 66 77 88 | 00 00 00 00 00 00 20 00"
            "| 00 00 00 00 00 00 00 10 | 00 00 00 00 00 00 20 00"
        ),
        b"abcdefgh",
    ]


def test_sparse_read_chunks_echo_the_request_offset_and_carry_their_own() -> None:
    req = Request(COOKIE, Cmd.READ, 0, 1000, 40)
    data = b"a" * 10 + bytes(20) + b"b" * 10
    frames = EXTENDED.sparse_read(req, data, [(10, 20)])
    assert frames[0] == wire.extended_data_header(COOKIE, 1000, 1000, 10, done=False)
    assert bytes(frames[1]) == b"a" * 10
    assert frames[2] == h(
        f"{HEADER} | 00 00 | 00 02 | 11 22 33 44 55 66 77 88 | 00 00 00 00 00 00 03 e8"
        "| 00 00 00 00 00 00 00 0c | 00 00 00 00 00 00 03 f2 | 00 00 00 14"
    )
    assert frames[3] == wire.extended_data_header(COOKIE, 1000, 1030, 10, done=True)
    df = Request(COOKIE, Cmd.READ, CmdFlag.DF, 1000, 40)
    assert EXTENDED.sparse_read(df, data, [(10, 20)]) == EXTENDED.read(df, data)


def test_error_chunk_layout() -> None:
    assert EXTENDED.error(READ, Err.EIO, "bad") == [
        h(
            f"{HEADER} | 00 01 | 80 01 | 11 22 33 44 55 66 77 88 | 00 00 00 00 00 00 20 00"
            "| 00 00 00 00 00 00 00 09 | 00 00 00 05 | 00 03 | 62 61 64"
        )
    ]
    bad_request = BadRequest(COOKIE, 99, 0, 0x2000, 0, Err.EINVAL, "unknown command 99")
    [frame] = EXTENDED.error(bad_request, Err.EINVAL, "unknown command 99")
    assert frame[:4] == bytes.fromhex("6e8a278c")


def test_block_status_ext_chunks_one_per_context_64_bit_lengths() -> None:
    req = Request(COOKIE, Cmd.BLOCK_STATUS, 0, 0, 6 * GiB)
    first, last = EXTENDED.block_status(req, {1: [(6 * GiB, 3)], 2: [(4096, 1), (8192, 0)]})
    assert first == h(
        f"{HEADER} | 00 00 | 00 06 | 11 22 33 44 55 66 77 88 | 00 00 00 00 00 00 00 00"
        "| 00 00 00 00 00 00 00 18 | 00 00 00 01 | 00 00 00 01"
        "| 00 00 00 01 80 00 00 00 | 00 00 00 00 00 00 00 03"
    )
    assert last[:8] == h(f"{HEADER} 00 01 00 06")  # DONE on the last context's chunk
    assert last[32:40] == h("00 00 00 02 00 00 00 02")  # id 2, two extents


def test_block_status_chunks_are_capped_at_2_20_extents() -> None:
    req = Request(COOKIE, Cmd.BLOCK_STATUS, 0, 0, 1 << 40)
    many = [(512, i & 1) for i in range(MAX_EXTENTS + 5)]
    [chunk] = EXTENDED.block_status(req, {1: many})
    assert len(chunk) == 32 + 8 + 16 * MAX_EXTENTS
    [chunk] = STRUCTURED.block_status(req, {1: many})
    assert len(chunk) == 20 + 4 + 8 * MAX_EXTENTS


# --- the client's side ------------------------------------------------------------------------


def client_extended() -> ClientConnection:
    conn = ClientConnection()
    conn.receive_data(wire.greeting(3))
    conn.next_event()
    conn.client_flags()
    conn.option(Opt.EXTENDED_HEADERS)
    conn.receive_data(wire.option_reply(Opt.EXTENDED_HEADERS, Rep.ACK))
    assert conn.next_event() == OptionReply(Opt.EXTENDED_HEADERS, Rep.ACK, b"")
    assert conn.extended and conn.structured
    conn.option(Opt.GO, wire.name_and_infos("", []))
    conn.receive_data(wire.option_reply(Opt.GO, Rep.ACK))
    conn.next_event()
    assert conn.phase is ClientPhase.TRANSMISSION
    return conn


def test_client_sends_extended_requests_and_flags_write_payloads() -> None:
    conn = client_extended()
    assert conn.request(COOKIE, Cmd.READ, 0, 8192, 4096) == READ_4K
    write = conn.request(1, Cmd.WRITE, CmdFlag.FUA, 0, 3, b"abc")
    assert write == wire.extended_request(1, Cmd.WRITE, PAYLOAD_LEN | CmdFlag.FUA, 0, 3) + b"abc"
    assert conn.request(2, Cmd.WRITE_ZEROES, 0, 0, 5 * GiB)[24:32] == (5 * GiB).to_bytes(8, "big")


def test_client_parses_every_extended_chunk_the_server_makes() -> None:
    conn = client_extended()
    conn.request(5, Cmd.READ, 0, 1000, 40)
    stream = b"".join(
        bytes(f)
        for f in EXTENDED.sparse_read(
            Request(5, Cmd.READ, 0, 1000, 40), b"a" * 10 + bytes(20) + b"b" * 10, [(10, 20)]
        )
    )
    stream += b"".join(
        EXTENDED.block_status(Request(6, Cmd.BLOCK_STATUS, 0, 0, 0), {1: [(6 * GiB, 3)]})
    )
    stream += b"".join(EXTENDED.error(Request(7, Cmd.TRIM, 0, 0, 1), Err.ENOSPC, "full"))
    stream += b"".join(EXTENDED.ok(Request(8, Cmd.FLUSH, 0, 0, 0)))
    assert events_of(conn, stream) == [
        DataChunk(5, 1000, b"a" * 10, False),
        HoleChunk(5, 1010, 20, False),
        DataChunk(5, 1030, b"b" * 10, True),
        BlockStatusChunk(6, 1, ((6 * GiB, 3),), True),
        ErrorChunk(7, Err.ENOSPC, "full", None, True),
        NoneChunk(8, True),
    ]


def events_of(conn: ClientConnection, data: bytes) -> list[object]:
    conn.receive_data(data)
    out: list[object] = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
    return out


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        # (followed by bytes enough for a 32-byte header)
        (wire.simple_reply(1, 0) + bytes(16), "extended headers were negotiated"),
        (wire.none_chunk(1) + bytes(12), "extended headers were negotiated"),
        (
            wire.EXTENDED_HEADER.pack(0x6E8A278C, 1, 5, 1, 0, 12) + bytes(12),
            "BLOCK_STATUS chunk, but extended headers were negotiated",
        ),
        (
            wire.EXTENDED_HEADER.pack(0x6E8A278C, 1, 6, 1, 0, 24)
            + struct.pack(">IIQQ", 1, 2, 512, 0),
            "says it holds 2 extents",
        ),
    ],
)
def test_client_refuses_replies_that_do_not_match_extended_headers(
    reply: bytes, message: str
) -> None:
    conn = client_extended()
    conn.receive_data(reply)
    with pytest.raises(RemoteProtocolError, match=message):
        conn.next_event()


def test_compact_client_refuses_block_status_ext() -> None:
    conn = ClientConnection()
    conn.receive_data(wire.greeting(3))
    conn.next_event()
    conn.client_flags()
    conn.option(Opt.GO, wire.name_and_infos("", []))
    conn.receive_data(wire.option_reply(Opt.GO, Rep.ACK))
    conn.next_event()
    chunk = EXTENDED.block_status(Request(6, Cmd.BLOCK_STATUS, 0, 0, 0), {1: [(512, 0)]})[0]
    conn.receive_data(wire.CHUNK_HEADER.pack(0x668E33EF, 1, 6, 6, 24) + bytes(chunk)[32:])
    with pytest.raises(
        RemoteProtocolError, match="BLOCK_STATUS_EXT chunk, but extended headers were not"
    ):
        conn.next_event()
