"""ServerConnection, byte for byte: the handshake, every option, every request.

Byte examples come from docs/nbd-protocol.md; nothing here does I/O.
"""

from __future__ import annotations

import struct

import pytest

from trionbd.protocol import (
    NEED_DATA,
    AbortOption,
    BadRequest,
    Cmd,
    CmdFlag,
    ConnectionClosed,
    Disconnect,
    Err,
    ExportNameOption,
    HandshakeFlag,
    Info,
    InfoOption,
    InvalidOption,
    ListOption,
    LocalProtocolError,
    MetaContextOption,
    Opt,
    Phase,
    RemoteProtocolError,
    Rep,
    Request,
    ServerConnection,
    StartTLSOption,
    StructuredReplyOption,
    TransmissionFlag,
    UnknownOption,
    wire,
)
from trionbd.protocol.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_DISCARDED_WRITE,
    MAX_OPTION_LENGTH,
    MAX_OPTION_PAYLOAD_KEPT,
    MAX_OPTIONS,
    MAX_REQUEST,
    MAX_STRING,
    REPLY_MAGIC,
)
from trionbd.protocol.server import match_meta_contexts

MiB = 1 << 20
TF = TransmissionFlag
FULL = 0x0DED
"""HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES DF MULTI_CONN CACHE FAST_ZERO (doc's example)."""
COOKIE = 0x1122334455667788


def h(text: str) -> bytes:
    """Hex with spaces and ``|`` separators, as written in the protocol notes."""
    return bytes.fromhex(text.replace("|", " "))


def events(conn: ServerConnection, data: bytes = b"") -> list[object]:
    """Feed ``data`` and collect events until NEED_DATA (or the connection closes)."""
    if data:
        conn.receive_data(data)
    out: list[object] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if isinstance(event, ConnectionClosed | Disconnect | AbortOption):
            return out


def one(conn: ServerConnection, data: bytes) -> object:
    got = events(conn, data)
    assert len(got) == 1, got
    return got[0]


def negotiating(client_flags: int = 3, **kw: int) -> ServerConnection:
    conn = ServerConnection(**kw)
    assert events(conn, struct.pack(">I", client_flags)) == []
    assert conn.phase is Phase.OPTIONS
    return conn


def transmitting(
    size: int = MiB,
    flags: int = FULL,
    structured: bool = True,
    meta: bool = True,
    name: str = "disk",
) -> ServerConnection:
    conn = negotiating()
    if structured:
        one(conn, wire.option_request(Opt.STRUCTURED_REPLY))
        conn.accept_structured_replies(Opt.STRUCTURED_REPLY)
    else:
        flags &= ~TF.SEND_DF
    if meta:
        event = one(
            conn,
            wire.option_request(
                Opt.SET_META_CONTEXT, wire.name_and_queries(name, [BASE_ALLOCATION])
            ),
        )
        assert isinstance(event, MetaContextOption)
        conn.reply_meta_contexts(event, {1: BASE_ALLOCATION})
    go = one(conn, wire.option_request(Opt.GO, wire.name_and_infos(name, [])))
    assert isinstance(go, InfoOption)
    conn.go(Opt.GO, name, size, flags)
    assert conn.phase is Phase.TRANSMISSION
    return conn


def req(command: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return wire.request(cookie, command, flags, offset, length)


# --- greeting and client flags ----------------------------------------------------------


def test_greeting_is_the_18_documented_bytes() -> None:
    assert ServerConnection().greeting() == h(
        "4e 42 44 4d 41 47 49 43 49 48 41 56 45 4f 50 54 00 03"
    )


def test_greeting_without_no_zeroes() -> None:
    conn = ServerConnection(HandshakeFlag.FIXED_NEWSTYLE)
    assert conn.greeting()[-2:] == b"\x00\x01"


def test_client_flags_fixed_newstyle_and_no_zeroes() -> None:
    conn = negotiating(3)
    assert conn.client_no_zeroes


def test_client_flags_may_omit_no_zeroes() -> None:
    conn = negotiating(1)
    assert not conn.client_no_zeroes


def test_client_flags_arriving_byte_by_byte() -> None:
    conn = ServerConnection()
    for byte in b"\x00\x00\x00":
        assert events(conn, bytes([byte])) == []
        assert conn.phase is Phase.CLIENT_FLAGS
    assert events(conn, b"\x03") == []
    assert conn.phase is Phase.OPTIONS


def test_non_fixed_newstyle_client_is_refused() -> None:
    conn = ServerConnection()
    conn.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError, match="fixed newstyle"):
        conn.next_event()
    assert conn.phase is Phase.CLOSED


def test_no_zeroes_alone_is_still_non_fixed() -> None:
    conn = ServerConnection()
    conn.receive_data(b"\x00\x00\x00\x02")
    with pytest.raises(RemoteProtocolError, match="C_FIXED_NEWSTYLE"):
        conn.next_event()


@pytest.mark.parametrize("flags", [0x4, 0x7, 0x80000001, 0xFFFFFFFF])
def test_unknown_client_flag_bits_are_refused(flags: int) -> None:
    conn = ServerConnection()
    conn.receive_data(struct.pack(">I", flags))
    with pytest.raises(RemoteProtocolError, match=f"0x{flags:08x}"):
        conn.next_event()
    assert conn.phase is Phase.CLOSED


def test_no_zeroes_refused_when_not_offered() -> None:
    conn = ServerConnection(HandshakeFlag.FIXED_NEWSTYLE)
    conn.receive_data(b"\x00\x00\x00\x03")
    with pytest.raises(RemoteProtocolError, match="did not offer"):
        conn.next_event()


def test_eof_before_client_flags_is_a_clean_close() -> None:
    conn = ServerConnection()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()


def test_eof_inside_client_flags_is_an_error() -> None:
    conn = ServerConnection()
    conn.receive_data(b"\x00\x00")
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="4 bytes of client flags"):
        conn.next_event()


# --- option framing -----------------------------------------------------------------------


def test_bad_option_magic_closes() -> None:
    conn = negotiating()
    conn.receive_data(struct.pack(">QII", 0x49484156454F5055, Opt.LIST, 0))
    with pytest.raises(RemoteProtocolError, match=r"bad option magic.*IHAVEOPT"):
        conn.next_event()
    assert conn.phase is Phase.CLOSED


def test_option_split_across_many_receives() -> None:
    conn = negotiating()
    data = wire.option_request(Opt.GO, wire.name_and_infos("disk", [Info.BLOCK_SIZE]))
    for byte in data[:-1]:
        assert events(conn, bytes([byte])) == []
    assert events(conn, data[-1:]) == [InfoOption(Opt.GO, "disk", (Info.BLOCK_SIZE,))]


def test_several_options_in_one_receive() -> None:
    conn = negotiating()
    data = wire.option_request(Opt.STRUCTURED_REPLY) + wire.option_request(Opt.LIST)
    assert events(conn, data) == [
        StructuredReplyOption(Opt.STRUCTURED_REPLY),
        ListOption(Opt.LIST),
    ]


def test_eof_between_options_is_a_clean_close() -> None:
    conn = negotiating()
    one(conn, wire.option_request(Opt.LIST))
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.phase is Phase.CLOSED


@pytest.mark.parametrize("cut", [1, 15, 16, 20])
def test_eof_inside_an_option_is_an_error(cut: int) -> None:
    conn = negotiating()
    data = wire.option_request(Opt.GO, wire.name_and_infos("disk", []))
    conn.receive_data(data[:cut])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="client closed the connection in option"):
        conn.next_event()


# --- EXPORT_NAME ---------------------------------------------------------------------------


def test_export_name_reply_with_no_zeroes_both_ways() -> None:
    conn = negotiating(3)
    assert one(conn, wire.option_request(Opt.EXPORT_NAME, b"disk")) == ExportNameOption(
        Opt.EXPORT_NAME, "disk"
    )
    out = conn.export_name_reply("disk", MiB, 0x0003)
    assert out == h("00 00 00 00 00 10 00 00 00 03")
    assert conn.phase is Phase.TRANSMISSION
    assert conn.export_size == MiB


def test_export_name_reply_pads_124_zeroes_without_client_no_zeroes() -> None:
    conn = negotiating(1)
    one(conn, wire.option_request(Opt.EXPORT_NAME, b""))
    out = conn.export_name_reply("", MiB, 0x0001)
    assert out == h("00 00 00 00 00 10 00 00 00 01") + bytes(124)
    assert len(out) == 134


def test_export_name_reply_pads_when_server_did_not_offer_no_zeroes() -> None:
    conn = negotiating(1, handshake_flags=HandshakeFlag.FIXED_NEWSTYLE)
    one(conn, wire.option_request(Opt.EXPORT_NAME, b"x"))
    assert len(conn.export_name_reply("x", 0, 0)) == 134


def test_export_name_reply_always_sets_has_flags() -> None:
    conn = negotiating()
    one(conn, wire.option_request(Opt.EXPORT_NAME, b""))
    assert conn.export_name_reply("", 512, 0)[8:10] == b"\x00\x01"


def test_export_name_of_4096_bytes_is_accepted() -> None:
    conn = negotiating()
    name = "n" * MAX_STRING
    assert one(conn, wire.option_request(Opt.EXPORT_NAME, name.encode())) == ExportNameOption(
        Opt.EXPORT_NAME, name
    )


def test_export_name_too_long_closes() -> None:
    conn = negotiating()
    conn.receive_data(wire.option_request(Opt.EXPORT_NAME, b"n" * (MAX_STRING + 1)))
    with pytest.raises(RemoteProtocolError, match="4097 bytes long; the limit is 4096"):
        conn.next_event()
    assert conn.phase is Phase.CLOSED


def test_huge_export_name_closes_without_waiting_for_the_payload() -> None:
    conn = negotiating()
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 1 << 20))
    with pytest.raises(RemoteProtocolError, match="export name of 1048576 bytes"):
        conn.next_event()


def test_export_name_with_nul_closes() -> None:
    conn = negotiating()
    conn.receive_data(wire.option_request(Opt.EXPORT_NAME, b"a\0b"))
    with pytest.raises(RemoteProtocolError, match="NUL"):
        conn.next_event()


def test_export_name_not_utf8_closes() -> None:
    conn = negotiating()
    conn.receive_data(wire.option_request(Opt.EXPORT_NAME, b"\xff\xfe"))
    with pytest.raises(RemoteProtocolError, match="not valid UTF-8"):
        conn.next_event()


# --- ABORT, LIST, STRUCTURED_REPLY, STARTTLS ------------------------------------------------

ACK_ABORT = h("00 03 e8 89 04 55 65 a9 | 00 00 00 02 | 00 00 00 01 | 00 00 00 00")


def test_abort_is_acked_and_closes() -> None:
    conn = negotiating()
    assert one(conn, wire.option_request(Opt.ABORT)) == AbortOption(Opt.ABORT)
    assert conn.abort(Opt.ABORT) == ACK_ABORT
    assert conn.phase is Phase.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_abort_payload_is_ignored() -> None:
    conn = negotiating()
    assert one(conn, wire.option_request(Opt.ABORT, b"bye")) == AbortOption(Opt.ABORT)


def test_list_replies_match_the_documented_bytes() -> None:
    conn = negotiating()
    assert one(conn, wire.option_request(Opt.LIST)) == ListOption(Opt.LIST)
    assert conn.reply_server(Opt.LIST, "disk", "My disk") == h(
        "00 03 e8 89 04 55 65 a9 | 00 00 00 03 | 00 00 00 02 | 00 00 00 0f | "
        "00 00 00 04 64 69 73 6b 4d 79 20 64 69 73 6b"
    )
    assert conn.reply(Opt.LIST) == h("00 03 e8 89 04 55 65 a9 00 00 00 03 00 00 00 01 00 00 00 00")


def test_list_with_a_payload_is_invalid() -> None:
    conn = negotiating()
    event = one(conn, wire.option_request(Opt.LIST, b"xyz"))
    assert event == InvalidOption(Opt.LIST, Rep.ERR_INVALID, "LIST takes no payload, got 3 bytes")


def test_list_refuses_to_send_a_name_longer_than_4096_bytes() -> None:
    conn = negotiating()
    with pytest.raises(LocalProtocolError, match="longer than 4096"):
        conn.reply_server(Opt.LIST, "x" * 4097)
    assert len(conn.reply_server(Opt.LIST, "x" * 4096)) == 20 + 4 + 4096


def test_long_descriptions_and_error_messages_are_clipped_to_4096_bytes() -> None:
    conn = negotiating()
    entry = conn.reply_server(Opt.LIST, "d", "é" * 5000)
    assert len(entry) - 20 - 4 - 1 <= MAX_STRING
    entry[25:].decode("utf-8")  # not cut inside a character
    err = conn.reply_error(Opt.GO, Rep.ERR_UNKNOWN, "x" * 10000)
    (length,) = struct.unpack(">I", err[16:20])
    assert length == MAX_STRING and err.endswith(b"...")


def test_structured_reply_ack() -> None:
    conn = negotiating()
    assert one(conn, wire.option_request(Opt.STRUCTURED_REPLY)) == StructuredReplyOption(
        Opt.STRUCTURED_REPLY
    )
    assert not conn.structured
    assert conn.accept_structured_replies(Opt.STRUCTURED_REPLY) == h(
        "00 03 e8 89 04 55 65 a9 00 00 00 08 00 00 00 01 00 00 00 00"
    )
    assert conn.structured


def test_structured_reply_with_a_payload_is_invalid() -> None:
    conn = negotiating()
    event = one(conn, wire.option_request(Opt.STRUCTURED_REPLY, b"\0"))
    assert isinstance(event, InvalidOption) and event.reply == Rep.ERR_INVALID
    assert "STRUCTURED_REPLY takes no payload" in event.message


def test_starttls_ack_forgets_what_was_negotiated() -> None:
    conn = negotiating()
    one(conn, wire.option_request(Opt.STRUCTURED_REPLY))
    conn.accept_structured_replies(Opt.STRUCTURED_REPLY)
    meta = one(
        conn,
        wire.option_request(Opt.SET_META_CONTEXT, wire.name_and_queries("", [BASE_ALLOCATION])),
    )
    assert isinstance(meta, MetaContextOption)
    conn.reply_meta_contexts(meta, {1: BASE_ALLOCATION})
    assert one(conn, wire.option_request(Opt.STARTTLS)) == StartTLSOption(Opt.STARTTLS)
    assert conn.start_tls(Opt.STARTTLS) == h(
        "00 03 e8 89 04 55 65 a9 | 00 00 00 05 | 00 00 00 01 | 00 00 00 00"
    )
    assert conn.tls_active
    assert not conn.structured
    assert conn.meta_contexts == {} and conn.meta_export is None


def test_starttls_refuses_bytes_sent_ahead_of_the_tls_handshake() -> None:
    conn = negotiating()
    event = one(conn, wire.option_request(Opt.STARTTLS) + b"\x16\x03\x01")
    assert event == StartTLSOption(Opt.STARTTLS)
    with pytest.raises(RemoteProtocolError, match="3 bytes after STARTTLS"):
        conn.start_tls(Opt.STARTTLS)


def test_starttls_with_a_payload_is_invalid() -> None:
    conn = negotiating()
    event = one(conn, wire.option_request(Opt.STARTTLS, b"x"))
    assert isinstance(event, InvalidOption) and event.reply == Rep.ERR_INVALID


# --- INFO and GO --------------------------------------------------------------------------

GO_DISK = h(
    "49 48 41 56 45 4f 50 54 | 00 00 00 07 | 00 00 00 10 | 00 00 00 04 64 69 73 6b | 00 03 | "
    "00 03 00 01 00 02"
)
INFO_EXPORT_1M = h(
    "00 03 e8 89 04 55 65 a9 00 00 00 07 00 00 00 03 00 00 00 0c  "
    "00 00 00 00 00 00 00 10 00 00 0d ed"
)
INFO_BLOCK_SIZE = h(
    "00 03 e8 89 04 55 65 a9 00 00 00 07 00 00 00 03 00 00 00 0e  "
    "00 03 00 00 00 01 00 00 10 00 02 00 00 00"
)
ACK_GO = h("00 03 e8 89 04 55 65 a9 00 00 00 07 00 00 00 01 00 00 00 00")
BLOCK_SIZE = (1, 4096, 32 * MiB)


def test_go_payload_of_libnbd_is_parsed() -> None:
    conn = negotiating()
    assert one(conn, GO_DISK) == InfoOption(
        Opt.GO, "disk", (Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION)
    )
    assert wire.option_request(Opt.GO, wire.name_and_infos("disk", [3, 1, 2])) == GO_DISK


def test_go_replies_match_the_documented_bytes() -> None:
    conn = negotiating()
    one(conn, wire.option_request(Opt.STRUCTURED_REPLY))
    conn.accept_structured_replies(Opt.STRUCTURED_REPLY)
    one(conn, wire.option_request(Opt.GO, wire.name_and_infos("disk", [Info.BLOCK_SIZE])))
    infos = conn.reply_info(
        Opt.GO,
        (Info.BLOCK_SIZE,),
        name="disk",
        description=None,
        size=MiB,
        flags=FULL,
        block_size=BLOCK_SIZE,
    )
    assert infos == INFO_EXPORT_1M + INFO_BLOCK_SIZE
    assert conn.go(Opt.GO, "disk", MiB, FULL) == ACK_GO
    assert conn.phase is Phase.TRANSMISSION
    assert conn.export_flags == FULL
    assert conn.buffered == 0


def test_go_ack_is_never_padded_even_without_no_zeroes() -> None:
    conn = negotiating(1)
    one(conn, wire.option_request(Opt.GO, wire.name_and_infos("", [])))
    assert conn.go(Opt.GO, "", MiB, 1) == ACK_GO


def test_info_export_is_sent_first_even_if_not_requested() -> None:
    conn = negotiating()
    out = conn.reply_info(
        Opt.INFO, (), name="disk", description="d", size=MiB, flags=FULL, block_size=BLOCK_SIZE
    )
    assert out == INFO_EXPORT_1M.replace(b"\x00\x00\x00\x07", b"\x00\x00\x00\x06", 1)


def test_info_name_description_and_block_size_in_requested_order() -> None:
    conn = negotiating()
    out = conn.reply_info(
        Opt.INFO,
        (Info.DESCRIPTION, Info.NAME, 77, Info.NAME, Info.BLOCK_SIZE),
        name="real",
        description="My disk",
        size=5,
        flags=1,
        block_size=BLOCK_SIZE,
    )
    replies = _split_option_replies(out)
    assert [(opt, rep) for opt, rep, _ in replies] == [(Opt.INFO, Rep.INFO)] * 4
    assert [payload for _, _, payload in replies] == [
        struct.pack(">HQH", Info.EXPORT, 5, 1),
        b"\x00\x02My disk",
        b"\x00\x01real",
        struct.pack(">HIII", Info.BLOCK_SIZE, *BLOCK_SIZE),
    ]


def test_info_description_omitted_when_there_is_none() -> None:
    conn = negotiating()
    out = conn.reply_info(
        Opt.GO,
        (Info.DESCRIPTION,),
        name="",
        description=None,
        size=0,
        flags=1,
        block_size=BLOCK_SIZE,
    )
    assert len(_split_option_replies(out)) == 1


def test_info_does_not_enter_transmission() -> None:
    conn = negotiating()
    assert one(conn, wire.option_request(Opt.INFO, wire.name_and_infos("", []))) == InfoOption(
        Opt.INFO, "", ()
    )
    conn.reply_info(Opt.INFO, (), name="", description=None, size=1, flags=1, block_size=BLOCK_SIZE)
    conn.reply(Opt.INFO)
    assert conn.phase is Phase.OPTIONS


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "GO payload of 0 bytes; at least 6 expected"),
        (b"\0\0\0\0\0", "GO payload of 5 bytes; at least 6 expected"),
        (struct.pack(">I", 5) + b"ab\0\0", "export name length 5 runs past the 8-byte payload"),
        (struct.pack(">I", 0xFFFFFFFF) + b"\0\0", "export name length 4294967295 runs past"),
        (
            struct.pack(">I2sH", 2, b"ab", 2) + b"\0\3",
            "GO payload is 10 bytes; 12 expected for a 2-byte name and 2 info requests",
        ),
        (struct.pack(">I2sH", 2, b"ab", 0) + b"\0", "GO payload is 9 bytes; 8 expected"),
        (struct.pack(">I3sH", 3, b"a\0b", 0), "export name contains a NUL byte"),
        (struct.pack(">I2sH", 2, b"\xc3\x28", 0), "export name is not valid UTF-8"),
        (
            struct.pack(">I", 4097) + b"n" * 4097 + b"\0\0",
            "export name is 4097 bytes long; the limit is 4096 bytes",
        ),
    ],
)
def test_malformed_go_payloads_are_invalid_with_a_clear_message(
    payload: bytes, message: str
) -> None:
    conn = negotiating()
    event = one(conn, wire.option_request(Opt.GO, payload))
    assert isinstance(event, InvalidOption)
    assert event.option == Opt.GO and event.reply == Rep.ERR_INVALID
    assert message in event.message
    # The connection is still negotiating: the next option parses.
    assert one(conn, wire.option_request(Opt.LIST)) == ListOption(Opt.LIST)


def test_malformed_info_names_the_option() -> None:
    conn = negotiating()
    event = one(conn, wire.option_request(Opt.INFO, b"\0\0"))
    assert isinstance(event, InvalidOption) and event.message.startswith("INFO payload")


def test_go_with_4096_byte_name_is_accepted() -> None:
    conn = negotiating()
    name = "é" * 2048
    event = one(conn, wire.option_request(Opt.GO, wire.name_and_infos(name, [1])))
    assert event == InfoOption(Opt.GO, name, (1,))


def test_go_after_failed_go_still_works() -> None:
    conn = negotiating()
    one(conn, wire.option_request(Opt.GO, wire.name_and_infos("nope", [])))
    assert conn.reply_error(Opt.GO, Rep.ERR_UNKNOWN, "no such export") == (
        h("00 03 e8 89 04 55 65 a9 00 00 00 07 80 00 00 06 00 00 00 0e") + b"no such export"
    )
    one(conn, wire.option_request(Opt.GO, wire.name_and_infos("disk", [])))
    conn.go(Opt.GO, "disk", 1, 1)
    assert conn.phase is Phase.TRANSMISSION


def test_reply_error_refuses_non_error_types() -> None:
    conn = negotiating()
    with pytest.raises(LocalProtocolError, match="ACK is not an error"):
        conn.reply_error(Opt.GO, Rep.ACK, "oops")


def test_go_refuses_df_without_structured_replies() -> None:
    conn = negotiating()
    one(conn, wire.option_request(Opt.GO, wire.name_and_infos("", [])))
    with pytest.raises(LocalProtocolError, match="SEND_DF"):
        conn.go(Opt.GO, "", 1, TF.HAS_FLAGS | TF.SEND_DF)


def test_go_refuses_fast_zero_without_write_zeroes() -> None:
    conn = negotiating()
    one(conn, wire.option_request(Opt.GO, wire.name_and_infos("", [])))
    with pytest.raises(LocalProtocolError, match="SEND_FAST_ZERO"):
        conn.go(Opt.GO, "", 1, TF.HAS_FLAGS | TF.SEND_FAST_ZERO)


def test_option_replies_are_refused_in_transmission() -> None:
    conn = transmitting()
    with pytest.raises(LocalProtocolError, match="cannot send an option reply in transmission"):
        conn.reply(Opt.GO)


# --- meta contexts ------------------------------------------------------------------------

SET_BASE = h(
    "49 48 41 56 45 4f 50 54 00 00 00 0a 00 00 00 1b  00 00 00 00  00 00 00 01  "
    "00 00 00 0f 62 61 73 65 3a 61 6c 6c 6f 63 61 74 69 6f 6e"
)


def test_set_meta_context_matches_the_documented_bytes() -> None:
    conn = negotiating()
    event = one(conn, SET_BASE)
    assert event == MetaContextOption(Opt.SET_META_CONTEXT, "", (BASE_ALLOCATION,))
    assert isinstance(event, MetaContextOption)
    assert conn.reply_meta_contexts(event, {1: BASE_ALLOCATION}) == h(
        "00 03 e8 89 04 55 65 a9 00 00 00 0a 00 00 00 04 00 00 00 13  "
        "00 00 00 01 62 61 73 65 3a 61 6c 6c 6f 63 61 74 69 6f 6e "
        "00 03 e8 89 04 55 65 a9 00 00 00 0a 00 00 00 01 00 00 00 00"
    )
    assert conn.meta_export == "" and conn.meta_contexts == {1: BASE_ALLOCATION}
    assert (
        wire.option_request(Opt.SET_META_CONTEXT, wire.name_and_queries("", [BASE_ALLOCATION]))
        == SET_BASE
    )


def test_list_meta_context_replies_with_id_0_and_selects_nothing() -> None:
    conn = negotiating()
    event = one(conn, wire.option_request(Opt.LIST_META_CONTEXT, wire.name_and_queries("disk", [])))
    assert event == MetaContextOption(Opt.LIST_META_CONTEXT, "disk", ())
    assert isinstance(event, MetaContextOption)
    out = conn.reply_meta_contexts(event, {1: BASE_ALLOCATION})
    assert _split_option_replies(out) == [
        (Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\0" + BASE_ALLOCATION.encode()),
        (Opt.LIST_META_CONTEXT, Rep.ACK, b""),
    ]
    assert conn.meta_contexts == {}


def test_meta_context_with_several_queries() -> None:
    conn = negotiating()
    queries = ["base:allocation", "qemu:dirty-bitmap:x", "base:", "é"]
    event = one(
        conn, wire.option_request(Opt.LIST_META_CONTEXT, wire.name_and_queries("disk", queries))
    )
    assert event == MetaContextOption(Opt.LIST_META_CONTEXT, "disk", tuple(queries))


def test_set_meta_context_replaces_and_clear_forgets() -> None:
    conn = negotiating()
    event = one(conn, SET_BASE)
    assert isinstance(event, MetaContextOption)
    conn.reply_meta_contexts(event, {1: BASE_ALLOCATION})
    conn.reply_meta_contexts(event, {})
    assert conn.meta_contexts == {}
    conn.reply_meta_contexts(event, {1: BASE_ALLOCATION})
    conn.clear_meta_contexts()
    assert conn.meta_contexts == {} and conn.meta_export is None


def _meta(name: bytes, *queries: bytes, count: int | None = None) -> bytes:
    parts = [
        struct.pack(">I", len(name)),
        name,
        struct.pack(">I", len(queries) if count is None else count),
    ]
    for q in queries:
        parts += [struct.pack(">I", len(q)), q]
    return b"".join(parts)


@pytest.mark.parametrize(
    ("payload", "reply", "message"),
    [
        (b"\0" * 7, Rep.ERR_INVALID, "payload of 7 bytes; at least 8 expected"),
        (struct.pack(">II", 1, 0), Rep.ERR_INVALID, "export name length 1 runs past"),
        (_meta(b"", count=1), Rep.ERR_INVALID, "query 0 runs past the 8-byte payload"),
        (_meta(b"", b"base:allocation")[:-1], Rep.ERR_INVALID, "query 0 of 15 bytes runs past"),
        (_meta(b"", b"a:b") + b"zz", Rep.ERR_INVALID, "2 stray bytes after the last query"),
        (_meta(b"", b"a:\0"), Rep.ERR_INVALID, "query 0 contains a NUL byte"),
        (_meta(b"x\0"), Rep.ERR_INVALID, "export name contains a NUL byte"),
        (_meta(b"", b"q" * 4097), Rep.ERR_INVALID, "query 0 is 4097 bytes long"),
        (_meta(b"", count=129), Rep.ERR_TOO_BIG, "129 meta context queries; the limit is 128"),
    ],
)
@pytest.mark.parametrize("option", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_malformed_meta_context_payloads(
    option: Opt, payload: bytes, reply: Rep, message: str
) -> None:
    conn = negotiating()
    event = one(conn, wire.option_request(option, payload))
    assert isinstance(event, InvalidOption)
    assert (event.option, event.reply) == (option, reply)
    assert message in event.message


# --- unknown options, oversized options, the option budget ---------------------------------


def test_unknown_option_is_reported_and_its_payload_discarded() -> None:
    conn = negotiating()
    data = wire.option_request(99, b"\xaa" * 100) + wire.option_request(Opt.LIST)
    assert events(conn, data) == [UnknownOption(99), ListOption(Opt.LIST)]


@pytest.mark.parametrize("option", [Opt.PEEK_EXPORT, 12, 0, 0xFFFFFFFF])
def test_options_not_implemented_are_unknown(option: int) -> None:
    conn = negotiating()
    assert one(conn, wire.option_request(option, b"")) == UnknownOption(option)


def test_huge_unknown_option_is_discarded_without_being_buffered() -> None:
    conn = negotiating()
    length = MAX_OPTION_LENGTH  # the largest accepted: 64 MiB
    conn.receive_data(struct.pack(">QII", IHAVEOPT, 1234, length) + b"\xbb" * 1000)
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 0
    chunk = b"\xcc" * MiB
    sent = 1000
    while sent + len(chunk) < length:
        conn.receive_data(chunk)
        sent += len(chunk)
        assert conn.buffered == 0
        assert conn.next_event() is NEED_DATA
    rest = length - sent
    conn.receive_data(b"\xdd" * rest + wire.option_request(Opt.LIST))
    assert events(conn) == [UnknownOption(1234), ListOption(Opt.LIST)]


def test_option_longer_than_64_mib_closes() -> None:
    conn = negotiating()
    conn.receive_data(struct.pack(">QII", IHAVEOPT, 1234, MAX_OPTION_LENGTH + 1))
    with pytest.raises(RemoteProtocolError, match="the limit is 67108864 bytes"):
        conn.next_event()


def test_known_option_with_an_oversized_payload_is_too_big() -> None:
    conn = negotiating()
    length = MAX_OPTION_PAYLOAD_KEPT + 1
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Opt.GO, length) + b"\0" * 10)
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 0
    conn.receive_data(b"\0" * (length - 10))
    event = conn.next_event()
    assert isinstance(event, InvalidOption) and event.reply == Rep.ERR_TOO_BIG
    assert "65537 bytes exceeds the limit of 65536" in event.message


def test_eof_inside_a_discarded_payload_is_an_error() -> None:
    conn = negotiating()
    conn.receive_data(wire.option_request(99, b"x" * 100)[:50])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_option_budget() -> None:
    conn = negotiating()
    for _ in range(MAX_OPTIONS):
        assert one(conn, wire.option_request(Opt.STRUCTURED_REPLY)) == StructuredReplyOption(
            Opt.STRUCTURED_REPLY
        )
    conn.receive_data(wire.option_request(Opt.STRUCTURED_REPLY))
    with pytest.raises(RemoteProtocolError, match="too many options"):
        conn.next_event()


def test_option_budget_counts_unknown_and_invalid_options() -> None:
    conn = negotiating()
    for i in range(MAX_OPTIONS):
        one(conn, wire.option_request(99 if i % 2 else Opt.LIST, b"x"))
    conn.receive_data(wire.option_request(Opt.LIST))
    with pytest.raises(RemoteProtocolError, match="too many options"):
        conn.next_event()


def test_option_budget_grows_with_grants() -> None:
    conn = negotiating()
    conn.grant_options(10)
    for _ in range(MAX_OPTIONS + 10):
        one(conn, wire.option_request(Opt.LIST))
    conn.receive_data(wire.option_request(Opt.LIST))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


# --- transmission: parsing each request ---------------------------------------------------

READ_4K = h("25 60 95 13 00 00 00 00 11 22 33 44 55 66 77 88 00 00 00 00 00 00 00 00 00 00 10 00")


def test_read_request_matches_the_documented_bytes() -> None:
    conn = transmitting()
    assert one(conn, READ_4K) == Request(COOKIE, Cmd.READ, 0, 0, 4096)
    assert wire.request(COOKIE, Cmd.READ, 0, 0, 4096) == READ_4K


def test_write_request_carries_its_payload() -> None:
    conn = transmitting()
    data = bytes(range(256)) * 16
    header = req(Cmd.WRITE, 512, len(data), CmdFlag.FUA)
    assert events(conn, header + data[:100]) == []
    assert events(conn, data[100:]) == [Request(7, Cmd.WRITE, CmdFlag.FUA, 512, len(data), data)]


def test_many_requests_in_one_receive_and_a_header_split_in_two() -> None:
    conn = transmitting()
    stream = req(Cmd.READ, 0, 1, cookie=1) + req(Cmd.WRITE, 0, 2, cookie=2) + b"hi"
    stream += req(Cmd.FLUSH, cookie=3)
    assert events(conn, stream + req(Cmd.TRIM, 0, 8, cookie=4)[:13]) == [
        Request(1, Cmd.READ, 0, 0, 1),
        Request(2, Cmd.WRITE, 0, 0, 2, b"hi"),
        Request(3, Cmd.FLUSH, 0, 0, 0),
    ]
    assert events(conn, req(Cmd.TRIM, 0, 8, cookie=4)[13:]) == [Request(4, Cmd.TRIM, 0, 0, 8)]


@pytest.mark.parametrize(
    ("command", "flags", "offset", "length"),
    [
        (Cmd.READ, 0, MiB - 1, 1),
        (Cmd.READ, CmdFlag.FUA, 0, 0),
        (Cmd.READ, CmdFlag.DF, 0, 4096),
        (Cmd.FLUSH, 0, 0, 0),
        (Cmd.FLUSH, CmdFlag.FUA, 0, 0),
        (Cmd.TRIM, CmdFlag.FUA, 4096, 4096),
        (Cmd.CACHE, 0, 0, MiB),
        (Cmd.WRITE_ZEROES, 0, 0, MiB),
        (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO | CmdFlag.FUA, 0, 1),
        (Cmd.BLOCK_STATUS, 0, 0, MiB),
        (Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 512, 512),
    ],
)
def test_valid_requests(command: int, flags: int, offset: int, length: int) -> None:
    conn = transmitting()
    assert one(conn, req(command, offset, length, flags)) == Request(
        7, command, flags, offset, length
    )


def test_disc_ends_the_stream() -> None:
    conn = transmitting()
    assert events(conn, req(Cmd.DISC) + b"ignored") == [Disconnect()]
    assert conn.phase is Phase.CLOSED


def test_disc_with_offset_and_length_is_still_a_disconnect() -> None:
    conn = transmitting()
    assert one(conn, req(Cmd.DISC, 5, 5)) == Disconnect()


def bad(conn: ServerConnection, data: bytes) -> BadRequest:
    event = one(conn, data)
    assert isinstance(event, BadRequest), event
    return event


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        (Cmd.READ, 0x8000, "flags 0x8000 not valid for read requests"),
        (Cmd.READ, 0x0020, "flags 0x0020 not valid for read"),
        (Cmd.READ, CmdFlag.NO_HOLE, "not valid for read"),
        (Cmd.READ, CmdFlag.REQ_ONE, "not valid for read"),
        (Cmd.READ, CmdFlag.FAST_ZERO, "not valid for read"),
        (Cmd.TRIM, CmdFlag.DF, "not valid for trim"),
        (Cmd.TRIM, CmdFlag.NO_HOLE, "not valid for trim"),
        (Cmd.CACHE, CmdFlag.REQ_ONE, "not valid for cache"),
        (Cmd.WRITE_ZEROES, CmdFlag.DF, "not valid for write zeroes"),
        (Cmd.WRITE_ZEROES, CmdFlag.REQ_ONE, "not valid for write zeroes"),
        (Cmd.BLOCK_STATUS, CmdFlag.DF, "not valid for block status"),
        (Cmd.BLOCK_STATUS, CmdFlag.NO_HOLE, "not valid for block status"),
        (Cmd.FLUSH, CmdFlag.NO_HOLE, "not valid for flush"),
    ],
)
def test_flags_not_valid_for_the_command(command: int, flags: int, message: str) -> None:
    event = bad(transmitting(), req(command, 0, 512 if command != Cmd.FLUSH else 0, flags))
    assert (event.error, event.cookie, event.command) == (Err.EINVAL, 7, command)
    assert message in event.message


def test_write_with_bad_flags_is_refused_and_its_payload_skipped() -> None:
    conn = transmitting()
    assert events(conn, req(Cmd.WRITE, 0, 4, CmdFlag.NO_HOLE) + b"data" + READ_4K) == [
        BadRequest(
            7,
            Cmd.WRITE,
            CmdFlag.NO_HOLE,
            0,
            4,
            Err.EINVAL,
            "flags 0x0002 not valid for write requests",
        ),
        Request(COOKIE, Cmd.READ, 0, 0, 4096),
    ]


@pytest.mark.parametrize(
    ("flag", "advertised", "command", "message"),
    [
        (CmdFlag.FUA, TF.SEND_FUA, Cmd.WRITE_ZEROES, "FUA flag used but not advertised"),
        (CmdFlag.DF, TF.SEND_DF, Cmd.READ, "DF flag used without structured replies"),
        (CmdFlag.FAST_ZERO, TF.SEND_FAST_ZERO, Cmd.WRITE_ZEROES, "FAST_ZERO flag used but not"),
    ],
)
def test_flags_need_their_transmission_flag(
    flag: int, advertised: int, command: int, message: str
) -> None:
    conn = transmitting(flags=FULL & ~advertised)
    event = bad(conn, req(command, 0, 1, flag))
    assert event.error == Err.EINVAL and message in event.message


def test_df_is_refused_when_structured_replies_were_not_negotiated() -> None:
    conn = transmitting(structured=False, meta=False)
    assert not conn.export_flags & TF.SEND_DF
    assert bad(conn, req(Cmd.READ, 0, 1, CmdFlag.DF)).error == Err.EINVAL


@pytest.mark.parametrize("command", [Cmd.RESIZE, 9, 100, 0xFFFF])
def test_unknown_commands_are_einval(command: int) -> None:
    event = bad(transmitting(), req(command, 0, 0))
    assert event.error == Err.EINVAL and f"unknown command {command}" in event.message


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (Cmd.READ, Err.EINVAL),
        (Cmd.TRIM, Err.EINVAL),
        (Cmd.CACHE, Err.EINVAL),
        (Cmd.BLOCK_STATUS, Err.EINVAL),
        (Cmd.WRITE_ZEROES, Err.ENOSPC),
        (Cmd.WRITE, Err.ENOSPC),
    ],
)
@pytest.mark.parametrize(
    ("offset", "length"),
    [(MiB, 1), (MiB - 1, 2), (2 * MiB, 0), (0, MiB + 1), ((1 << 64) - 1, 4096)],
)
def test_range_checks(command: int, error: int, offset: int, length: int) -> None:
    conn = transmitting()
    payload = b"w" * length if command == Cmd.WRITE else b""
    event = bad(conn, req(command, offset, length) + payload)
    assert event.error == error
    assert "beyond the end of the export (size 1048576)" in event.message
    assert one(conn, READ_4K) == Request(COOKIE, Cmd.READ, 0, 0, 4096)


def test_requests_ending_exactly_at_the_end_are_fine() -> None:
    conn = transmitting()
    assert isinstance(one(conn, req(Cmd.READ, MiB - 4096, 4096)), Request)
    assert isinstance(one(conn, req(Cmd.READ, MiB, 0)), Request)
    assert isinstance(one(conn, req(Cmd.WRITE, MiB - 1, 1) + b"x"), Request)


def test_flush_with_offset_or_length_is_einval() -> None:
    conn = transmitting()
    event = bad(conn, req(Cmd.FLUSH, 1, 0))
    assert event.error == Err.EINVAL and "both must be 0" in event.message
    assert bad(conn, req(Cmd.FLUSH, 0, 1)).error == Err.EINVAL


@pytest.mark.parametrize("command", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_writes_to_a_read_only_export_are_eperm(command: int) -> None:
    conn = transmitting(flags=TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH | TF.SEND_DF)
    payload = b"abcd" if command == Cmd.WRITE else b""
    event = bad(conn, req(command, 0, 4) + payload)
    assert event.error == Err.EPERM and "read-only" in event.message
    assert one(conn, req(Cmd.READ, 0, 4)) == Request(7, Cmd.READ, 0, 0, 4)


def test_read_only_wins_over_range_checks() -> None:
    conn = transmitting(flags=TF.HAS_FLAGS | TF.READ_ONLY)
    assert bad(conn, req(Cmd.WRITE, 2 * MiB, 1) + b"x").error == Err.EPERM


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        (Cmd.FLUSH, TF.SEND_FLUSH),
        (Cmd.TRIM, TF.SEND_TRIM),
        (Cmd.WRITE_ZEROES, TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO),
    ],
)
def test_commands_not_advertised_are_einval(command: int, missing: int) -> None:
    conn = transmitting(flags=FULL & ~missing)
    event = bad(conn, req(command, 0, 0 if command == Cmd.FLUSH else 512))
    assert event.error == Err.EINVAL and "not supported by this export" in event.message


def test_cache_is_accepted_even_when_not_advertised() -> None:
    conn = transmitting(flags=FULL & ~TF.SEND_CACHE)
    assert one(conn, req(Cmd.CACHE, 0, 512)) == Request(7, Cmd.CACHE, 0, 0, 512)


def test_block_status_needs_structured_replies_and_a_context() -> None:
    conn = transmitting(meta=False)
    event = bad(conn, req(Cmd.BLOCK_STATUS, 0, 512))
    assert event.error == Err.EINVAL and "meta context selected" in event.message
    conn = transmitting(structured=False, meta=False)
    assert bad(conn, req(Cmd.BLOCK_STATUS, 0, 512)).error == Err.EINVAL


def test_meta_context_for_another_export_is_not_used() -> None:
    conn = negotiating()
    one(conn, wire.option_request(Opt.STRUCTURED_REPLY))
    conn.accept_structured_replies(Opt.STRUCTURED_REPLY)
    event = one(
        conn,
        wire.option_request(Opt.SET_META_CONTEXT, wire.name_and_queries("a", [BASE_ALLOCATION])),
    )
    assert isinstance(event, MetaContextOption)
    conn.reply_meta_contexts(event, {1: BASE_ALLOCATION})
    one(conn, wire.option_request(Opt.GO, wire.name_and_infos("b", [])))
    conn.go(Opt.GO, "b", MiB, FULL)
    assert not conn.block_status_ok
    assert bad(conn, req(Cmd.BLOCK_STATUS, 0, 512)).error == Err.EINVAL


def test_block_status_may_ask_for_4_gib() -> None:
    conn = transmitting(size=1 << 40)
    length = 0xFFFFFFFF
    assert one(conn, req(Cmd.BLOCK_STATUS, 0, length)) == Request(7, Cmd.BLOCK_STATUS, 0, 0, length)
    assert one(conn, req(Cmd.TRIM, 0, length)) == Request(7, Cmd.TRIM, 0, 0, length)


# --- oversized requests, bad magic, EOF -----------------------------------------------------


def test_read_over_64_mib_is_einval() -> None:
    conn = transmitting(size=1 << 40)
    assert isinstance(one(conn, req(Cmd.READ, 0, MAX_REQUEST)), Request)
    event = bad(conn, req(Cmd.READ, 0, MAX_REQUEST + 1))
    assert event.error == Err.EINVAL and "exceeds the limit of 67108864 bytes" in event.message


def test_write_over_64_mib_is_einval_and_discarded_without_buffering() -> None:
    conn = transmitting(size=1 << 40)
    length = MAX_REQUEST + 1
    conn.receive_data(req(Cmd.WRITE, 0, length, cookie=9))
    chunk = b"\xee" * (4 * MiB)
    sent = 0
    while sent + len(chunk) <= length:
        assert conn.next_event() is NEED_DATA
        conn.receive_data(chunk)
        sent += len(chunk)
        assert conn.buffered == 0
    conn.receive_data(b"\xee" * (length - sent) + READ_4K)
    got = events(conn)
    assert len(got) == 2
    assert isinstance(got[0], BadRequest)
    assert (got[0].cookie, got[0].error) == (9, Err.EINVAL)
    assert got[1] == Request(COOKIE, Cmd.READ, 0, 0, 4096)


def test_refused_write_payload_may_be_skipped_up_to_128_mib() -> None:
    conn = transmitting()
    conn.receive_data(req(Cmd.WRITE, 0, MAX_DISCARDED_WRITE))  # ENOSPC, still skippable
    assert conn.next_event() is NEED_DATA


def test_write_over_128_mib_closes() -> None:
    conn = transmitting(size=1 << 40)
    conn.receive_data(req(Cmd.WRITE, 0, MAX_DISCARDED_WRITE + 1))
    with pytest.raises(RemoteProtocolError, match="too large to skip"):
        conn.next_event()
    assert conn.phase is Phase.CLOSED


def test_bad_request_magic_closes() -> None:
    conn = transmitting()
    conn.receive_data(b"\x25\x60\x95\x14" + READ_4K[4:])
    with pytest.raises(
        RemoteProtocolError, match="bad request magic: expected 0x25609513, got 0x25609514"
    ):
        conn.next_event()
    assert conn.phase is Phase.CLOSED


def test_eof_between_requests_is_a_clean_close() -> None:
    conn = transmitting()
    one(conn, READ_4K)
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()


@pytest.mark.parametrize("cut", [1, 27, 28, 30])
def test_eof_inside_a_request_is_an_error(cut: int) -> None:
    conn = transmitting()
    conn.receive_data((req(Cmd.WRITE, 0, 4) + b"data")[:cut])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="client closed the connection in transmission"):
        conn.next_event()


def test_eof_inside_a_skipped_write_payload_is_an_error() -> None:
    conn = transmitting()
    conn.receive_data(req(Cmd.WRITE, 2 * MiB, 100) + b"x" * 10)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_export_of_size_zero() -> None:
    conn = transmitting(size=0)
    assert one(conn, req(Cmd.READ, 0, 0)) == Request(7, Cmd.READ, 0, 0, 0)
    assert bad(conn, req(Cmd.READ, 0, 1)).error == Err.EINVAL


def test_no_events_after_close() -> None:
    conn = transmitting()
    events(conn, req(Cmd.DISC))
    with pytest.raises(LocalProtocolError, match="closed"):
        conn.next_event()


# --- reply encoders -------------------------------------------------------------------------


def test_simple_reply_bytes() -> None:
    assert wire.simple_reply(COOKIE, Err.EINVAL) == h(
        "67 44 66 98 00 00 00 16 11 22 33 44 55 66 77 88"
    )


def test_structured_read_chunk_matches_the_documented_bytes() -> None:
    assert wire.data_chunk_header(COOKIE, 0, 4096) == h(
        "66 8e 33 ef 00 01 00 01 11 22 33 44 55 66 77 88 00 00 10 08 | 00 00 00 00 00 00 00 00"
    )
    assert wire.data_chunk_header(COOKIE, 512, 1, done=False)[4:6] == b"\0\0"


def test_error_chunk_matches_the_documented_bytes() -> None:
    assert wire.error_chunk(COOKIE, Err.EINVAL, "") == h(
        "66 8e 33 ef 00 01 80 01 11 22 33 44 55 66 77 88 00 00 00 06 | 00 00 00 16 00 00"
    )
    assert wire.error_chunk(1, Err.EIO, "bad", offset=4096) == h(
        "66 8e 33 ef 00 01 80 02 00 00 00 00 00 00 00 01 00 00 00 1100 00 00 05 00 03"
    ) + b"bad" + h("00 00 00 00 00 00 10 00")


def test_block_status_chunk_matches_the_documented_bytes() -> None:
    assert wire.block_status_chunk(1, 1, [(0x10000, 0), (0xF0000, 3)]) == h(
        "66 8e 33 ef 00 01 00 05 00 00 00 00 00 00 00 01 00 00 00 14 | 00 00 00 01 | "
        "00 01 00 00 00 00 00 00 | 00 0f 00 00 00 00 00 03"
    )


def test_hole_and_none_chunks() -> None:
    assert wire.hole_chunk(2, 4096, 512) == h(
        "66 8e 33 ef 00 00 00 02 00 00 00 00 00 00 00 02 00 00 00 0c"
        "00 00 00 00 00 00 10 00 00 00 02 00"
    )
    assert wire.none_chunk(3) == h("66 8e 33 ef 00 01 00 00 00 00 00 00 00 00 00 03 00 00 00 00")


def _split_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, option, reply, length = struct.unpack_from(">QIII", data, pos)
        assert magic == REPLY_MAGIC
        out.append((option, reply, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


def test_list_refuses_a_name_that_is_not_utf8() -> None:
    conn = negotiating()
    name = b"\xff.img".decode("utf-8", "surrogateescape")  # as os.scandir gives it
    with pytest.raises(LocalProtocolError, match="not valid UTF-8"):
        conn.reply_server(Opt.LIST, name)


def test_validation_order_read_only_then_range_then_flags() -> None:
    """nbdkit's order (docs/nbd-protocol.md 4.8): the first failure wins."""
    conn = transmitting(flags=TF.HAS_FLAGS | TF.READ_ONLY)
    assert bad(conn, req(Cmd.WRITE, 0, 1, CmdFlag.FUA) + b"x").error == Err.EPERM
    assert bad(conn, req(Cmd.WRITE_ZEROES, 0, 1, CmdFlag.FAST_ZERO)).error == Err.EPERM
    conn = transmitting()
    assert bad(conn, req(Cmd.WRITE, MiB, 1, 0x8000) + b"x").error == Err.ENOSPC
    assert bad(conn, req(Cmd.READ, MiB, 1, CmdFlag.NO_HOLE)).error == Err.EINVAL
    event = bad(conn, req(Cmd.READ, MiB, 1, CmdFlag.NO_HOLE))
    assert "beyond the end" in event.message


def test_meta_context_queries_select_by_name_and_list_by_namespace() -> None:
    offered = [BASE_ALLOCATION, "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b", "qemu:other"]

    def match(option: Opt, *queries: str) -> dict[int, str]:
        return match_meta_contexts(MetaContextOption(option, "", queries), offered)

    assert match(Opt.LIST_META_CONTEXT) == dict(enumerate(offered, 1))
    assert match(Opt.LIST_META_CONTEXT, "qemu:dirty-bitmap:") == {
        2: "qemu:dirty-bitmap:a", 3: "qemu:dirty-bitmap:b"
    }  # fmt: skip
    assert match(Opt.LIST_META_CONTEXT, "base:", "nope:") == {1: BASE_ALLOCATION}
    assert match(Opt.SET_META_CONTEXT) == {}
    assert match(Opt.SET_META_CONTEXT, "qemu:") == {}  # namespaces only list
    assert match(Opt.SET_META_CONTEXT, "qemu:dirty-bitmap:b", BASE_ALLOCATION) == {
        1: BASE_ALLOCATION, 3: "qemu:dirty-bitmap:b"
    }  # fmt: skip
