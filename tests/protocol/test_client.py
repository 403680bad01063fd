"""ClientConnection: parsing what a server sends, and a round trip with ServerConnection."""

from __future__ import annotations

import struct

import pytest

from trionbd.protocol import (
    NEED_DATA,
    BlockStatusChunk,
    ClientConnection,
    Cmd,
    ConnectionClosed,
    DataChunk,
    Err,
    ErrorChunk,
    ExportNameReply,
    Greeting,
    HoleChunk,
    Info,
    InfoOption,
    LocalProtocolError,
    NoneChunk,
    Opt,
    OptionReply,
    RemoteProtocolError,
    Rep,
    Request,
    ServerConnection,
    SimpleReply,
    wire,
)
from trionbd.protocol.client import ClientPhase
from trionbd.protocol.constants import REPLY_MAGIC, STRUCTURED_REPLY_MAGIC

MiB = 1 << 20
GREETING = bytes.fromhex("4e42444d41474943 49484156454f5054 0003")


def events(conn: ClientConnection, data: bytes = b"") -> list[object]:
    if data:
        conn.receive_data(data)
    out: list[object] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if conn.phase in (ClientPhase.CLIENT_FLAGS, ClientPhase.CLOSED):
            return out


def negotiating(handshake_flags: int = 3) -> ClientConnection:
    conn = ClientConnection()
    assert events(conn, wire.greeting(handshake_flags)) == [Greeting(handshake_flags)]
    conn.client_flags()
    return conn


def transmitting(structured: bool = True) -> ClientConnection:
    conn = negotiating()
    if structured:
        conn.option(Opt.STRUCTURED_REPLY)
        events(conn, wire.option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
        assert conn.structured
    conn.option(Opt.GO, wire.name_and_infos("", []))
    events(conn, wire.option_reply(Opt.GO, Rep.INFO, wire.info_export(MiB, 1)))
    events(conn, wire.option_reply(Opt.GO, Rep.ACK))
    assert conn.phase is ClientPhase.TRANSMISSION
    return conn


# --- handshake -----------------------------------------------------------------------------


def test_greeting_and_client_flags_echo_the_offer() -> None:
    conn = ClientConnection()
    assert events(conn, GREETING[:10]) == []
    assert events(conn, GREETING[10:]) == [Greeting(3)]
    assert conn.client_flags() == b"\x00\x00\x00\x03"
    assert conn.phase is ClientPhase.OPTIONS


def test_client_flags_without_no_zeroes() -> None:
    conn = ClientConnection()
    events(conn, wire.greeting(1))
    assert conn.client_flags() == b"\x00\x00\x00\x01"


def test_client_flags_only_once() -> None:
    conn = negotiating()
    with pytest.raises(LocalProtocolError):
        conn.client_flags()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"NBDMAGIX" + GREETING[8:], "bad greeting magic"),
        (GREETING[:8] + b"\x00\x00\x42\x02\x81\x86\x12\x53" + b"\0\0", "not newstyle"),
        (GREETING[:16] + b"\x00\x02", "does not offer fixed newstyle"),
    ],
)
def test_bad_greetings(data: bytes, message: str) -> None:
    conn = ClientConnection()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=message):
        conn.next_event()


def test_server_closing_before_the_greeting_ends_is_an_error() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING[:5])
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="18-byte greeting"):
        conn.next_event()


def test_option_bytes_and_one_option_at_a_time() -> None:
    conn = negotiating()
    assert conn.option(Opt.LIST) == bytes.fromhex("49484156454f5054 00000003 00000000")
    with pytest.raises(LocalProtocolError, match="still waiting"):
        conn.option(Opt.LIST)


def test_list_replies_until_ack() -> None:
    conn = negotiating()
    conn.option(Opt.LIST)
    data = wire.server_entry(Opt.LIST, Rep.SERVER, "disk", "My disk")
    data += wire.option_reply(Opt.LIST, Rep.ACK)
    assert events(conn, data) == [
        OptionReply(Opt.LIST, Rep.SERVER, b"\x00\x00\x00\x04diskMy disk"),
        OptionReply(Opt.LIST, Rep.ACK, b""),
    ]
    conn.option(Opt.ABORT)  # the ACK ended LIST: another option may follow


def test_error_reply_ends_the_option() -> None:
    conn = negotiating()
    conn.option(Opt.GO, wire.name_and_infos("x", []))
    assert events(conn, wire.option_reply(Opt.GO, Rep.ERR_UNKNOWN, b"no")) == [
        OptionReply(Opt.GO, Rep.ERR_UNKNOWN, b"no")
    ]
    assert conn.phase is ClientPhase.OPTIONS
    conn.option(Opt.LIST)


def test_reply_for_another_option_is_an_error() -> None:
    conn = negotiating()
    conn.option(Opt.LIST)
    conn.receive_data(wire.option_reply(Opt.GO, Rep.ACK))
    with pytest.raises(RemoteProtocolError, match="reply for option 7, but option 3 was sent"):
        conn.next_event()


def test_unsolicited_option_reply_is_an_error() -> None:
    conn = negotiating()
    conn.receive_data(wire.option_reply(Opt.GO, Rep.ACK))
    with pytest.raises(RemoteProtocolError, match="option None was sent"):
        conn.next_event()


def test_ack_with_payload_and_bad_reply_magic() -> None:
    conn = negotiating()
    conn.option(Opt.STRUCTURED_REPLY)
    conn.receive_data(wire.option_reply(Opt.STRUCTURED_REPLY, Rep.ACK, b"x"))
    with pytest.raises(RemoteProtocolError, match="ACK with a 1-byte payload"):
        conn.next_event()
    conn = negotiating()
    conn.option(Opt.LIST)
    conn.receive_data(b"\0" * 20)
    with pytest.raises(RemoteProtocolError, match="bad option reply magic"):
        conn.next_event()


def test_option_reply_too_large() -> None:
    conn = negotiating()
    conn.option(Opt.LIST)
    conn.receive_data(struct.pack(">QIII", REPLY_MAGIC, Opt.LIST, Rep.SERVER, 1 << 30))
    with pytest.raises(RemoteProtocolError, match="too large"):
        conn.next_event()


def test_abort_ack_closes_and_starttls_ack_forgets_structured_replies() -> None:
    conn = negotiating()
    conn.option(Opt.STRUCTURED_REPLY)
    events(conn, wire.option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    conn.option(Opt.STARTTLS)
    events(conn, wire.option_reply(Opt.STARTTLS, Rep.ACK))
    assert not conn.structured
    conn.option(Opt.ABORT)
    events(conn, wire.option_reply(Opt.ABORT, Rep.ACK))
    assert conn.phase is ClientPhase.CLOSED


@pytest.mark.parametrize(("flags", "size"), [(3, 10), (1, 134)])
def test_export_name_reply(flags: int, size: int) -> None:
    conn = negotiating(flags)
    conn.option(Opt.EXPORT_NAME, b"disk")
    reply = bytes.fromhex("00000000 00100000 0003") + bytes(size - 10)
    assert events(conn, reply[:-1]) == []
    assert events(conn, reply[-1:]) == [ExportNameReply(MiB, 3)]
    assert conn.phase is ClientPhase.TRANSMISSION


def test_export_name_refused_by_a_close() -> None:
    conn = negotiating()
    conn.option(Opt.EXPORT_NAME, b"nope")
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()


# --- transmission --------------------------------------------------------------------------


def test_simple_read_reply_carries_the_data() -> None:
    conn = transmitting(structured=False)
    conn.request(1, Cmd.READ, 0, 0, 4)
    assert events(conn, wire.simple_reply(1, 0) + b"ab") == []
    assert events(conn, b"cd") == [SimpleReply(1, 0, b"abcd")]


def test_simple_read_error_has_no_data() -> None:
    conn = transmitting(structured=False)
    conn.request(1, Cmd.READ, 0, 0, 4)
    conn.request(2, Cmd.WRITE, 0, 0, 1, b"x")
    data = wire.simple_reply(1, Err.EIO) + wire.simple_reply(2, 0)
    assert events(conn, data) == [SimpleReply(1, Err.EIO), SimpleReply(2, 0)]


def test_request_bytes() -> None:
    conn = transmitting()
    assert conn.request(0x1122334455667788, Cmd.READ, 0, 0, 4096) == bytes.fromhex(
        "25609513 0000 0000 1122334455667788 0000000000000000 00001000"
    )
    assert conn.request(2, Cmd.WRITE, 1, 8, 2, b"hi").endswith(b"hi")
    with pytest.raises(LocalProtocolError, match="already in flight"):
        conn.request(0x1122334455667788, Cmd.READ, 0, 0, 1)
    with pytest.raises(LocalProtocolError, match="write of 3 bytes with 2 bytes"):
        conn.request(3, Cmd.WRITE, 0, 0, 3, b"hi")


def test_requests_only_in_transmission() -> None:
    with pytest.raises(LocalProtocolError):
        negotiating().request(1, Cmd.READ, 0, 0, 1)


def test_structured_chunks() -> None:
    conn = transmitting()
    conn.request(5, Cmd.READ, 0, 0, 8192)
    data = wire.data_chunk_header(5, 0, 4, done=False) + b"abcd"
    data += wire.hole_chunk(5, 4, 8188, done=True)
    data += wire.block_status_chunk(6, 1, [(4096, 0), (4096, 3)])
    data += wire.error_chunk(7, Err.ENOSPC, "full", offset=512)
    data += wire.error_chunk(8, Err.EINVAL, "")
    data += wire.none_chunk(9)
    assert events(conn, data) == [
        DataChunk(5, 0, b"abcd", False),
        HoleChunk(5, 4, 8188, True),
        BlockStatusChunk(6, 1, ((4096, 0), (4096, 3)), True),
        ErrorChunk(7, Err.ENOSPC, "full", 512, True),
        ErrorChunk(8, Err.EINVAL, "", None, True),
        NoneChunk(9, True),
    ]
    conn.request(5, Cmd.READ, 0, 0, 1)  # the cookie was released by DONE


def test_unknown_error_chunk_type_fails_the_request_only() -> None:
    conn = transmitting()
    chunk = struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 0x8123, 4, 6) + b"\0" * 6
    [event] = events(conn, chunk + wire.none_chunk(5))[:1]
    assert isinstance(event, ErrorChunk) and event.error == Err.EIO
    assert "0x8123" in event.message or "33059" in event.message


def _chunk(kind: int, payload: bytes, flags: int = 1) -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, 1, len(payload)) + (payload)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x12\x34\x56\x78" + b"\0" * 16, "bad reply magic 0x12345678"),
        (_chunk(0, b"x"), "NONE chunk must be empty"),
        (_chunk(0, b"", flags=0), "NONE chunk must be empty and carry DONE"),
        (_chunk(1, b"\0" * 8), "OFFSET_DATA chunk of 8 bytes"),
        (_chunk(2, b"\0" * 11), "OFFSET_HOLE chunk of 11 bytes"),
        (_chunk(2, b"\0" * 12), "OFFSET_HOLE chunk with length 0"),
        (_chunk(5, b"\0" * 8), "BLOCK_STATUS chunk of 8 bytes"),
        (_chunk(5, b"\0" * 13), "BLOCK_STATUS chunk of 13 bytes"),
        (_chunk(0x8001, b"\0" * 5), "error chunk of 5 bytes"),
        (_chunk(0x8001, b"\0\0\0\x16\0\x05ab"), "with a 5-byte message"),
        (_chunk(0x8001, b"\0\0\0\0\0\0"), "error value 0"),
        (_chunk(3, b""), "unknown structured reply chunk type 3"),
        (
            struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 1, 1, 0xFFFFFFFF),
            "chunk of 4294967295 bytes is too large",
        ),
    ],
)
def test_malformed_replies(data: bytes, message: str) -> None:
    conn = transmitting()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=message):
        conn.next_event()


def test_server_closing_inside_a_reply_is_an_error() -> None:
    conn = transmitting()
    conn.request(1, Cmd.READ, 0, 0, 4096)
    conn.receive_data(wire.data_chunk_header(1, 0, 4096) + b"x" * 100)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="4104 bytes of chunk payload"):
        conn.next_event()


def test_server_closing_between_replies_is_clean() -> None:
    conn = transmitting()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()


def test_disc_closes_the_client() -> None:
    conn = transmitting()
    conn.request(1, Cmd.DISC, 0, 0, 0)
    assert conn.phase is ClientPhase.CLOSED


# --- both state machines together ------------------------------------------------------------


def test_round_trip_between_client_and_server() -> None:
    server = ServerConnection()
    client = ClientConnection()
    assert events(client, server.greeting()) == [Greeting(3)]
    server.receive_data(client.client_flags())
    assert server.next_event() is NEED_DATA

    server.receive_data(client.option(Opt.STRUCTURED_REPLY))
    sr = server.next_event()
    assert events(client, server.accept_structured_replies(sr.option)) == [  # type: ignore[union-attr]
        OptionReply(Opt.STRUCTURED_REPLY, Rep.ACK, b"")
    ]

    server.receive_data(client.option(Opt.GO, wire.name_and_infos("disk", [Info.BLOCK_SIZE])))
    go = server.next_event()
    assert go == InfoOption(Opt.GO, "disk", (Info.BLOCK_SIZE,))
    out = server.reply_info(
        Opt.GO,
        (Info.BLOCK_SIZE,),
        name="disk",
        description=None,
        size=MiB,
        flags=0x4ED,
        block_size=(1, 4096, 32 * MiB),
    )
    out += server.go(Opt.GO, "disk", MiB, 0x4ED)
    replies = events(client, out)
    assert [r.reply for r in replies] == [Rep.INFO, Rep.INFO, Rep.ACK]  # type: ignore[attr-defined]
    assert client.phase is ClientPhase.TRANSMISSION

    server.receive_data(client.request(1, Cmd.WRITE, 1, 100, 3, b"abc"))
    server.receive_data(client.request(2, Cmd.READ, 0, 100, 3))
    assert server.next_event() == Request(1, Cmd.WRITE, 1, 100, 3, b"abc")
    assert server.next_event() == Request(2, Cmd.READ, 0, 100, 3)
    assert server.next_event() is NEED_DATA
    reply = wire.simple_reply(1, 0) + wire.data_chunk_header(2, 100, 3) + b"abc"
    assert events(client, reply) == [SimpleReply(1, 0), DataChunk(2, 100, b"abc", True)]
