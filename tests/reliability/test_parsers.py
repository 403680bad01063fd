"""Structure-aware property tests of the sans-IO parsers (tests/protocol/test_fuzz.py
feeds random and mutated byte streams; these build frames with valid magic and random
fields, so that the parsers' field checks, not the magic checks, are exercised).

Any input gives events or a ``RemoteProtocolError``, never another exception, and:

- every ``Request`` the server hands out is one the export can serve (the validation
  is complete: known and advertised command, allowed and advertised flags, in range,
  within the size limit), every ``BadRequest`` carries an NBD error and a message;
- option events carry valid names (UTF-8, no NUL, at most 4096 bytes), and the server
  never buffers more than it was given, whatever length a header claims;
- the client side turns random replies and option reply payloads into events, values
  or a protocol error.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trionbd.protocol import (
    NEED_DATA,
    AbortOption,
    BadRequest,
    ClientConnection,
    Cmd,
    CmdFlag,
    ConnectionClosed,
    Disconnect,
    Err,
    ExportNameOption,
    InfoOption,
    MetaContextOption,
    Opt,
    Phase,
    RemoteProtocolError,
    Request,
    ServerConnection,
    TransmissionFlag,
    wire,
)
from trionbd.protocol.client import (
    parse_info_replies,
    parse_meta_context_reply,
    parse_server_reply,
)
from trionbd.protocol.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_REQUEST,
    MAX_STRING,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)

TF = TransmissionFlag
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u16 = st.one_of(st.sampled_from([0, 1, 0x8000, 0xFFFF]), st.integers(0, 0xFFFF))
u32 = st.one_of(
    st.sampled_from([0, 1, 512, 4096, MAX_REQUEST, MAX_REQUEST + 1, 0x7FFFFFFF, 0xFFFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
)
u64 = st.one_of(
    st.sampled_from([0, 1, 1 << 20, (1 << 20) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 512]),
    st.integers(0, (1 << 64) - 1),
)
COMMANDS = st.one_of(st.sampled_from([int(c) for c in Cmd]), u16)
FLAG_BITS = st.integers(0, 0xFFFF).map(lambda f: f & 0x801F if f & 1 else f)

# --- the server: requests --------------------------------------------------------------

SIZE = 1 << 20
EXPORT_FLAGS = st.builds(
    lambda extra, ro: int(TF.HAS_FLAGS | extra | (TF.READ_ONLY if ro else 0)),
    st.sampled_from(
        [
            0,
            TF.SEND_FLUSH | TF.SEND_FUA,
            TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO,
            TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_CACHE,
        ]
    ),
    st.booleans(),
)
# The flags each command may carry, and what each flag or command needs advertised.
ALLOWED = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
NEEDS = {Cmd.FLUSH: TF.SEND_FLUSH, Cmd.TRIM: TF.SEND_TRIM, Cmd.WRITE_ZEROES: TF.SEND_WRITE_ZEROES}
FLAG_NEEDS = {
    CmdFlag.FUA: TF.SEND_FUA,
    CmdFlag.DF: TF.SEND_DF,
    CmdFlag.FAST_ZERO: TF.SEND_FAST_ZERO,
}


def in_transmission(structured: bool, meta: bool, flags: int) -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(b"\x00\x00\x00\x03")
    assert conn.next_event() is NEED_DATA
    if structured:
        conn.accept_structured_replies(Opt.STRUCTURED_REPLY)
        flags |= TF.SEND_DF
    if meta:
        event = MetaContextOption(Opt.SET_META_CONTEXT, "", (BASE_ALLOCATION,))
        conn.reply_meta_contexts(event, {1: BASE_ALLOCATION})
    conn.go(Opt.GO, "", SIZE, flags)
    return conn


def check_servable(conn: ServerConnection, req: Request) -> None:
    """The export can serve ``req`` as it stands: the server validated it fully."""
    tflags = int(conn.export_flags)
    cmd = Cmd(req.command)
    assert cmd in ALLOWED, req
    assert not req.flags & ~int(ALLOWED[cmd]), req
    for flag, needed in FLAG_NEEDS.items():
        assert not (req.flags & flag and not tflags & needed), req
    if cmd in NEEDS:
        assert tflags & NEEDS[cmd], req
    if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
        assert not tflags & TF.READ_ONLY, req
    if cmd is Cmd.FLUSH:
        assert req.offset == req.length == 0, req
    else:
        assert req.offset + req.length <= SIZE, req
    if cmd in (Cmd.READ, Cmd.WRITE):
        assert req.length <= MAX_REQUEST, req
    if cmd is Cmd.WRITE:
        assert len(req.data) == req.length, req
    if cmd is Cmd.BLOCK_STATUS:
        assert conn.block_status_ok, req


request_header = st.tuples(FLAG_BITS, COMMANDS, u64, u64, u32)


@FUZZ
@given(
    st.booleans(),
    st.booleans(),
    EXPORT_FLAGS,
    st.lists(st.tuples(request_header, st.integers(0, 600)), min_size=1, max_size=12),
)
def test_every_request_handed_out_is_servable(
    structured: bool,
    meta: bool,
    flags: int,
    requests: list[tuple[tuple[int, int, int, int, int], int]],
) -> None:
    conn = in_transmission(structured, meta and structured, flags)
    stream = b"".join(
        struct.pack(">IHHQQI", REQUEST_MAGIC, f, c, cookie, off, n) + bytes(min(n, payload))
        for (f, c, cookie, off, n), payload in requests
    )
    conn.receive_data(stream)
    conn.receive_data(b"")
    try:
        for _ in range(100):
            event = conn.next_event()
            if isinstance(event, Request):
                check_servable(conn, event)
            elif isinstance(event, BadRequest):
                assert event.error in (Err.EINVAL, Err.EPERM, Err.ENOSPC), event
                assert event.message
            else:
                assert isinstance(event, Disconnect | ConnectionClosed), event
                return
    except RemoteProtocolError as e:
        assert conn.phase is Phase.CLOSED, e


# --- the server: options ---------------------------------------------------------------

OPTIONS = st.one_of(st.sampled_from([int(o) for o in Opt]), st.integers(0, 0xFFFFFFFF))
names = st.one_of(
    st.text(max_size=20).map(str.encode),
    st.binary(max_size=20),
    st.sampled_from([b"x" * MAX_STRING, b"x" * (MAX_STRING + 1), b"a\0b", b"\xff\xfe"]),
)


@st.composite
def option_payloads(draw: st.DrawFn) -> bytes:
    """A payload shaped like INFO/GO or *_META_CONTEXT, with lying length fields."""
    name = draw(names)
    name_length = draw(st.one_of(st.just(len(name)), u32))
    if draw(st.booleans()):
        infos = draw(st.lists(u16, max_size=5))
        count = draw(st.one_of(st.just(len(infos)), u16))
        return (
            struct.pack(">I", name_length) + name + struct.pack(f">H{len(infos)}H", count, *infos)
        )
    queries = draw(st.lists(names, max_size=4))
    count = draw(st.one_of(st.just(len(queries)), u32))
    out = struct.pack(">I", name_length) + name + struct.pack(">I", count)
    for q in queries:
        out += struct.pack(">I", draw(st.one_of(st.just(len(q)), u32))) + q
    return out


@FUZZ
@given(
    st.lists(
        st.tuples(
            OPTIONS,
            st.one_of(option_payloads(), st.binary(max_size=40)),
            st.one_of(st.none(), u32),
        ),
        min_size=1,
        max_size=8,
    ),
    st.booleans(),
)
def test_options_with_lying_fields_give_events_or_a_protocol_error(
    options: list[tuple[int, bytes, int | None]], eof: bool
) -> None:
    """``length`` (when drawn) replaces the true payload length in the header: the
    server must neither trust it with memory nor fail on it."""
    stream = b"\x00\x00\x00\x03" + b"".join(
        struct.pack(">QII", IHAVEOPT, option, len(payload) if length is None else length) + payload
        for option, payload, length in options
    )
    conn = ServerConnection()
    conn.receive_data(stream)
    if eof:
        conn.receive_data(b"")
    assert conn.buffered <= len(stream)
    try:
        for _ in range(50):
            event = conn.next_event()
            assert conn.buffered <= len(stream)
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
            if isinstance(event, InfoOption | MetaContextOption):
                raw = event.name.encode()
                assert len(raw) <= MAX_STRING and b"\0" not in raw
                if isinstance(event, MetaContextOption):
                    assert all(len(q.encode()) <= MAX_STRING for q in event.queries)
            if isinstance(event, AbortOption | ExportNameOption):
                return  # the connection ends (or enters transmission) here
    except RemoteProtocolError as e:
        assert conn.phase is Phase.CLOSED, e


# --- the client: replies and option replies --------------------------------------------

REPLY_TYPES = st.one_of(st.sampled_from([0, 1, 2, 5, 32767, 32768, 32769, 65535]), u16)


@st.composite
def reply_frames(draw: st.DrawFn) -> bytes:
    cookie = draw(st.sampled_from([1, 2, 3, 99]))
    if draw(st.booleans()):
        return wire.simple_reply(cookie, draw(st.sampled_from([0, 5, 22])))
    payload = draw(st.binary(max_size=48))
    length = draw(st.one_of(st.just(len(payload)), u32))
    return (
        struct.pack(
            ">IHHQI",
            STRUCTURED_REPLY_MAGIC,
            draw(u16),
            draw(REPLY_TYPES),
            cookie,
            length,
        )
        + payload
    )


@FUZZ
@given(st.lists(reply_frames(), min_size=1, max_size=10), st.booleans())
def test_client_takes_random_replies_as_events_or_a_protocol_error(
    frames: list[bytes], eof: bool
) -> None:
    conn = ClientConnection()
    conn.receive_data(wire.greeting(3))
    conn.next_event()
    conn.client_flags()
    conn.option(Opt.STRUCTURED_REPLY)
    conn.receive_data(wire.option_reply(Opt.STRUCTURED_REPLY, 1))
    conn.next_event()
    conn.option(Opt.GO, wire.name_and_infos("", []))
    conn.receive_data(wire.option_reply(Opt.GO, 1))
    conn.next_event()
    for cookie in (1, 2, 3):
        conn.request(cookie, Cmd.READ, 0, 0, 64)
    stream = b"".join(frames)
    conn.receive_data(stream)
    if eof:
        conn.receive_data(b"")
    try:
        for _ in range(50):
            event = conn.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
    except RemoteProtocolError:
        pass


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from([1, 2, 3, 4, 1 << 31, (1 << 31) + 1]), u32),
            st.binary(max_size=40),
        ),
        max_size=6,
    ),
    st.booleans(),
)
def test_client_takes_random_option_replies_as_events_or_a_protocol_error(
    replies: list[tuple[int, bytes]], eof: bool
) -> None:
    conn = ClientConnection()
    conn.receive_data(wire.greeting(3))
    conn.next_event()
    conn.client_flags()
    conn.option(Opt.GO, wire.name_and_infos("", []))
    stream = b"".join(
        struct.pack(">QIII", REPLY_MAGIC, Opt.GO, reply, len(payload)) + payload
        for reply, payload in replies
    )
    conn.receive_data(stream)
    if eof:
        conn.receive_data(b"")
    try:
        for _ in range(20):
            event = conn.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
            if conn.phase.name != "OPTIONS":
                return
    except RemoteProtocolError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=30), max_size=5), st.binary(max_size=30))
def test_option_reply_payload_parsers_give_values_or_a_protocol_error(
    payloads: list[bytes], payload: bytes
) -> None:
    for parse in (
        lambda: parse_info_replies("disk", payloads),
        lambda: parse_server_reply(payload),
        lambda: parse_meta_context_reply(payload),
    ):
        try:
            parse()
        except RemoteProtocolError:
            pass
