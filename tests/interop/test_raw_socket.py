"""Hand-written bytes on a plain socket against the real ``trionbd`` command: the
handshake corners, limits and garbage that polite clients never send.

Deliberately independent of trionbd.protocol: every message is packed here with struct.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Running, trionbd_process

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO, OPT_SR = 1, 2, 3, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR = 1 << 31
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG = ERR | 1, ERR | 3, ERR | 6, ERR | 9
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
MiB = 1 << 20
MEMORY_SIZE = 1 << 30


class Raw:
    """A socket with exact reads; fails the test instead of hanging."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            assert k, f"server closed the connection after {got} of {n} bytes"
            got += k
        return bytes(buf)

    def closed(self) -> bool:
        """True if the server closes without sending anything more."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def greeting(self, client_flags: int = 3) -> None:
        assert self.recv(18) == NBDMAGIC + IHAVEOPT + b"\x00\x03"
        self.send(struct.pack(">I", client_flags))

    def option(self, option: int, payload: bytes = b"") -> None:
        self.send(IHAVEOPT + struct.pack(">II", option, len(payload)) + payload)

    def reply(self, option: int) -> tuple[int, bytes]:
        magic, echoed, kind, length = struct.unpack(">QIII", self.recv(20))
        assert (magic, echoed) == (REPLY_MAGIC, option)
        return kind, self.recv(length)

    def replies(self, option: int) -> list[tuple[int, bytes]]:
        out = []
        while True:
            kind, payload = self.reply(option)
            out.append((kind, payload))
            if kind == REP_ACK or kind & ERR:
                return out

    def go(self, name: bytes = b"") -> list[tuple[int, bytes]]:
        self.option(OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        return self.replies(OPT_GO)

    def request(self, command: int, offset: int, length: int, cookie: int = 1) -> None:
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, cookie, offset, length))

    def simple_reply(self, cookie: int = 1) -> int:
        magic, error, echoed = struct.unpack(">IIQ", self.recv(16))
        assert (magic, echoed) == (SIMPLE_MAGIC, cookie)
        return int(error)


@pytest.fixture(scope="module")
def memory() -> Iterator[Running]:
    with trionbd_process("--handshake-timeout", "1", "memory", str(MEMORY_SIZE)) as server:
        yield server


@pytest.fixture
def raw(memory: Running) -> Iterator[Raw]:
    r = Raw(memory.socket)
    yield r
    r.close()


def usable(r: Raw) -> None:
    """The negotiating connection still works: GO, then :func:`usable_after_go`."""
    assert r.go()[-1][0] == REP_ACK
    usable_after_go(r)


def usable_after_go(r: Raw) -> None:
    """The connection in transmission still works: write, read back, disconnect."""
    r.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 2, 8192, 3) + b"abc")
    assert r.simple_reply(2) == 0
    r.request(CMD_READ, 8192, 3, cookie=3)
    assert r.simple_reply(3) == 0 and r.recv(3) == b"abc"
    r.request(CMD_DISC, 0, 0)
    assert r.closed()


# --- the client's flags -------------------------------------------------------------------------


def test_non_fixed_newstyle_client_is_closed(raw: Raw) -> None:
    raw.greeting(client_flags=0)
    assert raw.closed()


def test_unknown_client_flags_are_closed(raw: Raw) -> None:
    raw.greeting(client_flags=0x3 | 0x100)
    assert raw.closed()


def test_oldstyle_client_gets_the_newstyle_greeting_and_is_dropped(raw: Raw) -> None:
    """An oldstyle client waits for 152 bytes that never come; the server drops it at the
    handshake timeout (--handshake-timeout 1) and never sends the oldstyle greeting."""
    assert raw.recv(16) == NBDMAGIC + IHAVEOPT  # not the cliserv magic 0x00420281861253
    assert raw.recv(2) == b"\x00\x03"
    assert raw.closed()


# --- export names at the limit ----------------------------------------------------------------


def test_export_name_of_4096_bytes_is_accepted(raw: Raw) -> None:
    """The memory plugin serves whatever name is asked for."""
    raw.greeting()
    [info, ack] = raw.go(b"n" * 4096)
    assert info[0] == REP_INFO and ack == (REP_ACK, b"")
    assert struct.unpack(">HQH", info[1])[:2] == (0, MEMORY_SIZE)


def test_export_name_of_4097_bytes_is_invalid_and_the_connection_goes_on(raw: Raw) -> None:
    raw.greeting()
    [(kind, message)] = raw.go(b"n" * 4097)
    assert kind == ERR_INVALID
    assert message == b"export name is 4097 bytes long; the limit is 4096 bytes"
    usable(raw)


def test_export_name_option_at_and_over_the_limit(memory: Running) -> None:
    ok = Raw(memory.socket)
    ok.greeting()
    ok.option(OPT_EXPORT_NAME, b"e" * 4096)
    # HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES MULTI_CONN CACHE FAST_ZERO; no DF without SR.
    assert struct.unpack(">QH", ok.recv(10)) == (MEMORY_SIZE, 0x0D6D)
    ok.request(CMD_READ, 0, 4)
    assert ok.simple_reply() == 0 and ok.recv(4) == bytes(4)
    ok.close()
    too_long = Raw(memory.socket)
    too_long.greeting()
    too_long.option(OPT_EXPORT_NAME, b"e" * 4097)
    assert too_long.closed()  # EXPORT_NAME cannot carry an error: the server just closes
    too_long.close()


def test_unknown_vs_invalid_names_on_a_directory(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"d" * 4096)
    with trionbd_process("file", f"dir={tmp_path}") as server:
        r = Raw(server.socket)
        r.greeting()
        assert r.go(b"x" * 4096)[0][0] == ERR_UNKNOWN  # well-formed, no such file
        assert r.go(b"x" * 4097)[0][0] == ERR_INVALID  # malformed
        assert r.go(b"a\0b")[0][0] == ERR_INVALID
        assert r.go(b"disk.img")[-1][0] == REP_ACK
        r.request(CMD_READ, 4092, 4)
        assert r.simple_reply() == 0 and r.recv(4) == b"dddd"
        r.close()


# --- options --------------------------------------------------------------------------------------


def test_unknown_option_is_unsupported_and_the_session_goes_on(raw: Raw) -> None:
    raw.greeting()
    raw.option(0x4242, b"payload of an option nobody knows")
    kind, message = raw.reply(0x4242)
    assert kind == ERR_UNSUP and b"not supported" in message
    raw.option(OPT_LIST)
    assert raw.replies(OPT_LIST) == [(REP_SERVER, b"\0\0\0\0"), (REP_ACK, b"")]
    usable(raw)


def test_huge_unknown_option_is_read_and_refused(raw: Raw) -> None:
    raw.greeting()
    size = 60 * MiB
    raw.send(IHAVEOPT + struct.pack(">II", 0x4243, size))
    block = bytes(MiB)
    for _ in range(size // MiB):
        raw.send(block)
    assert raw.reply(0x4243)[0] == ERR_UNSUP
    usable(raw)


def test_known_option_with_a_big_payload_is_too_big(raw: Raw) -> None:
    raw.greeting()
    raw.option(OPT_GO, bytes(100_000))
    assert raw.reply(OPT_GO)[0] == ERR_TOO_BIG
    usable(raw)


def test_option_over_64_mib_closes(raw: Raw) -> None:
    raw.greeting()
    raw.send(IHAVEOPT + struct.pack(">II", 0x4244, 64 * MiB + 1))
    assert raw.closed()


def test_too_many_options_close(raw: Raw) -> None:
    raw.greeting()
    for _ in range(32):
        raw.option(0x4242)  # an option refused by the server (ERR_UNSUP) still counts
        assert raw.reply(0x4242)[0] == ERR_UNSUP
    raw.option(0x4242)
    assert raw.closed()


def test_bad_option_magic_closes(raw: Raw) -> None:
    raw.greeting()
    raw.send(b"IHAVEOPX" + struct.pack(">II", OPT_LIST, 0))
    assert raw.closed()


def test_abort(raw: Raw) -> None:
    raw.greeting()
    raw.option(OPT_ABORT)
    assert raw.reply(OPT_ABORT) == (REP_ACK, b"")
    assert raw.closed()


# --- transmission ---------------------------------------------------------------------------------


def test_garbage_request_magic_closes(raw: Raw) -> None:
    raw.greeting()
    raw.go()
    raw.send(b"GARBAGE!" * 4)
    assert raw.closed()


def test_oversized_read_is_einval_and_the_connection_goes_on(raw: Raw) -> None:
    raw.greeting()
    raw.go()
    raw.request(CMD_READ, 0, 64 * MiB + 1, cookie=7)
    assert raw.simple_reply(7) == 22  # EINVAL, and no data follows
    raw.request(CMD_READ, 256 * MiB, 64 * MiB, cookie=8)  # the limit itself is fine
    assert raw.simple_reply(8) == 0 and raw.recv(64 * MiB) == bytes(64 * MiB)
    usable_after_go(raw)


def test_oversized_write_is_einval_and_its_payload_skipped(raw: Raw) -> None:
    raw.greeting()
    raw.go()
    size = 64 * MiB + 1
    raw.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 9, 0, size))
    block = b"\xee" * MiB
    for _ in range(size // MiB):
        raw.send(block)
    raw.send(b"\xee")
    assert raw.simple_reply(9) == 22
    raw.request(CMD_READ, 0, 16, cookie=10)  # nothing was written, the stream is in sync
    assert raw.simple_reply(10) == 0 and raw.recv(16) == bytes(16)
    usable_after_go(raw)


def test_write_too_large_to_skip_closes(raw: Raw) -> None:
    raw.greeting()
    raw.go()
    raw.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 9, 0, 128 * MiB + 1))
    assert raw.closed()


def test_eof_inside_a_request_does_not_disturb_other_clients(memory: Running) -> None:
    broken = Raw(memory.socket)
    broken.greeting()
    broken.go()
    broken.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 100) + b"partial")
    broken.close()
    other = Raw(memory.socket)
    other.greeting()
    usable(other)
    other.close()
