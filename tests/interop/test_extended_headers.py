"""Extended headers against the real ``trionbd`` command: the byte layouts on a raw
socket (packed here with struct, independent of trionbd.protocol), qemu 10 negotiating
and using them (64-bit zeroes and block status in one request), and the clients that
do not know them (qemu 7.2, libnbd 1.14) working as before.

8 GiB memory disk: data in the MiB before 1 GiB and in the first MiB at 7 GiB; between
them a 6 GiB hole.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Iterator

import pytest

from tests.interop.test_raw_socket import (
    CMD_DISC,
    CMD_READ,
    CMD_WRITE,
    ERR_INVALID,
    ERR_UNSUP,
    OPT_EXPORT_NAME,
    OPT_SR,
    REP_ACK,
    REP_INFO,
    Raw,
)
from tests.support import Running, nbdsh, qemu10, run, trionbd_process

GiB = 1 << 30
MiB = 1 << 20
DISK = 8 * GiB
HOLE = (GiB, 6 * GiB)
OPT_EH, OPT_SET_META = 11, 10
ERR_EXT_HEADER_REQD = (1 << 31) | 10
EXT_REQUEST_MAGIC, EXT_REPLY_MAGIC = 0x21E41C71, 0x6E8A278C
CMD_TRIM, CMD_ZERO, CMD_BLOCK_STATUS = 4, 6, 7
FLAG_FUA, FLAG_REQ_ONE, FLAG_PAYLOAD_LEN = 1, 8, 0x20
NONE, OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS_EXT, ERROR = 0, 1, 2, 6, (1 << 15) | 1
BLOCK_STATUS_PAYLOAD = 1 << 12


class Extended(Raw):
    """A raw connection that negotiates extended headers."""

    def negotiate(self, contexts: tuple[str, ...] = ("base:allocation",)) -> int:
        """Greeting, EXTENDED_HEADERS, SET_META_CONTEXT, GO; the transmission flags."""
        self.greeting()
        self.option(OPT_EH)
        assert self.replies(OPT_EH) == [(REP_ACK, b"")]
        if contexts:
            queries = b"".join(struct.pack(">I", len(q)) + q.encode() for q in contexts)
            self.option(OPT_SET_META, struct.pack(">II", 0, len(contexts)) + queries)
            replies = self.replies(OPT_SET_META)
            assert replies[-1] == (REP_ACK, b"") and len(replies) == len(contexts) + 1
        [info, ack] = self.go()
        assert info[0] == REP_INFO and ack == (REP_ACK, b"")
        kind, size, flags = struct.unpack(">HQH", info[1])
        assert (kind, size) == (0, DISK)
        return int(flags)

    def request(  # type: ignore[override]
        self, command: int, offset: int, length: int, cookie: int = 1, flags: int = 0
    ) -> None:
        self.send(struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, flags, command, cookie, offset, length))

    def chunk(self, cookie: int = 1, offset: int = 0) -> tuple[int, int, bytes]:
        """One reply chunk, checked for the magic, cookie and echoed request offset:
        (flags, type, payload)."""
        magic, flags, kind, echoed, echoed_offset, length = struct.unpack(">IHHQQQ", self.recv(32))
        assert (magic, echoed, echoed_offset) == (EXT_REPLY_MAGIC, cookie, offset)
        return flags, kind, self.recv(length)

    def done(self, cookie: int = 1, offset: int = 0) -> None:
        """The reply is a lone NONE chunk with DONE (success, nothing to say)."""
        assert self.chunk(cookie, offset) == (1, NONE, b"")

    def read(self, offset: int, length: int, cookie: int = 1) -> bytes:
        """READ with DF-less chunks reassembled (holes as zeroes)."""
        self.request(CMD_READ, offset, length, cookie)
        out = bytearray(length)
        while True:
            flags, kind, payload = self.chunk(cookie, offset)
            if kind == OFFSET_DATA:
                (at,) = struct.unpack(">Q", payload[:8])
                out[at - offset : at - offset + len(payload) - 8] = payload[8:]
            elif kind == OFFSET_HOLE:
                at, n = struct.unpack(">QI", payload)
                out[at - offset : at - offset + n] = bytes(n)
            else:
                assert kind == NONE, (kind, payload)
            if flags & 1:
                return bytes(out)

    def block_status(
        self, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> list[tuple[int, list[tuple[int, int]]]]:
        """BLOCK_STATUS: per chunk, the context id and its 64-bit extents."""
        if payload:
            self.request(CMD_BLOCK_STATUS, offset, len(payload), flags=flags | FLAG_PAYLOAD_LEN)
            self.send(payload)
        else:
            self.request(CMD_BLOCK_STATUS, offset, length, flags=flags)
        out = []
        while True:
            chunk_flags, kind, body = self.chunk(1, offset)
            assert kind == BLOCK_STATUS_EXT, (kind, body)
            context, count = struct.unpack(">II", body[:8])
            assert len(body) == 8 + 16 * count
            out.append((context, list(struct.iter_unpack(">QQ", body[8:]))))
            if chunk_flags & 1:
                return out


@pytest.fixture(scope="module")
def disk() -> Iterator[Running]:
    """An 8 GiB memory disk with data around a 6 GiB hole (written once, read only)."""
    with trionbd_process("--handshake-timeout", "5", "memory", str(DISK)) as server:
        r = Extended(server.socket)
        r.negotiate(contexts=())
        for offset in (GiB - MiB, 7 * GiB):
            r.request(CMD_WRITE, offset, MiB, flags=FLAG_PAYLOAD_LEN)
            r.send(pattern(offset, MiB))
            r.done(offset=offset)
        r.close()
        yield server


def pattern(offset: int, length: int) -> bytes:
    """Bytes that tell where they belong: each 8-byte word holds its own offset."""
    return b"".join(struct.pack(">Q", offset + i) for i in range(0, length, 8))


# --- raw bytes ----------------------------------------------------------------------------


def test_negotiation_and_flags(disk: Running) -> None:
    r = Extended(disk.socket)
    flags = r.negotiate()
    assert flags & BLOCK_STATUS_PAYLOAD  # with extended headers and a context selected
    assert flags & (1 << 7)  # SEND_DF: extended headers include structured replies
    r.request(CMD_DISC, 0, 0)
    assert r.closed()
    r.close()
    r = Extended(disk.socket)
    assert not r.negotiate(contexts=()) & BLOCK_STATUS_PAYLOAD
    r.close()


def test_option_order_rules(disk: Running) -> None:
    r = Extended(disk.socket)
    r.greeting()
    r.option(OPT_SR)
    assert r.replies(OPT_SR) == [(REP_ACK, b"")]
    r.option(OPT_SR)
    assert r.replies(OPT_SR) == [(ERR_INVALID, b"structured replies are negotiated already")]
    r.option(OPT_EH, b"x")
    assert r.replies(OPT_EH) == [(ERR_INVALID, b"EXTENDED_HEADERS takes no payload, got 1 bytes")]
    r.option(OPT_EH)
    assert r.replies(OPT_EH) == [(REP_ACK, b"")]
    r.option(OPT_EH)
    assert r.replies(OPT_EH) == [(ERR_INVALID, b"extended headers are negotiated already")]
    r.option(OPT_SR)
    [(kind, _)] = r.replies(OPT_SR)
    assert kind == ERR_EXT_HEADER_REQD
    r.option(OPT_EXPORT_NAME, b"")
    assert r.closed()  # EXPORT_NAME cannot follow extended headers
    r.close()


def test_no_eh_refuses_them_and_compact_headers_go_on() -> None:
    with trionbd_process("--no-eh", "memory", "1M") as server:
        r = Raw(server.socket)
        r.greeting()
        r.option(OPT_EH)
        assert r.replies(OPT_EH) == [(ERR_UNSUP, b"extended headers are off")]
        assert r.go()[-1][0] == REP_ACK
        r.request(CMD_READ, 0, 4)
        assert r.simple_reply() == 0 and r.recv(4) == bytes(4)
        r.close()


def test_reads_and_writes_echo_the_request_offset(disk: Running) -> None:
    r = Extended(disk.socket)
    r.negotiate(contexts=())
    # A read of data and hole: chunks in order, each header echoing the request's offset.
    start = GiB - 4096
    r.request(CMD_READ, start, 8192, cookie=5)
    flags, kind, payload = r.chunk(5, start)
    assert (flags, kind) == (0, OFFSET_DATA)
    assert payload == struct.pack(">Q", start) + pattern(start, 4096)
    assert r.chunk(5, start) == (1, OFFSET_HOLE, struct.pack(">QI", GiB, 4096))
    # A write, with and without PAYLOAD_LEN (qemu 10 leaves it off), then a failed write.
    scratch = 7 * GiB + 2 * MiB
    r.request(CMD_WRITE, scratch, 3, cookie=6, flags=FLAG_PAYLOAD_LEN | FLAG_FUA)
    r.send(b"abc")
    r.done(6, scratch)
    r.request(CMD_WRITE, scratch + 3, 3, cookie=7)
    r.send(b"def")
    r.done(7, scratch + 3)
    assert r.read(scratch, 6, cookie=8) == b"abcdef"
    r.request(CMD_WRITE, DISK - 1, 2, cookie=9, flags=FLAG_PAYLOAD_LEN)
    r.send(b"xy")
    flags, kind, payload = r.chunk(9, DISK - 1)
    assert (flags, kind) == (1, ERROR)
    error, length = struct.unpack(">IH", payload[:6])
    assert error == 28 and b"beyond the end" in payload[6 : 6 + length]  # ENOSPC
    r.request(CMD_ZERO, scratch, 6, cookie=10)
    r.done(10, scratch)
    assert r.read(scratch, 6, cookie=11) == bytes(6)
    r.request(CMD_TRIM, scratch, 32768, cookie=12)  # the whole page: the disk is as it was
    r.done(12, scratch)
    r.close()


def test_block_status_of_a_6_gib_hole_is_one_extent(disk: Running) -> None:
    r = Extended(disk.socket)
    r.negotiate()
    assert r.block_status(*HOLE, FLAG_REQ_ONE) == [(1, [(6 * GiB, 3)])]
    assert r.block_status(0, DISK) == [
        (1, [(GiB - MiB, 3), (MiB, 0), (6 * GiB, 3), (MiB, 0), (GiB - MiB, 3)])
    ]
    # The payload form: effect length and the context ids wanted.
    payload = struct.pack(">QI", 6 * GiB, 1)
    assert r.block_status(GiB, 0, payload=payload) == [(1, [(6 * GiB, 3)])]
    r.request(CMD_BLOCK_STATUS, 0, 12, flags=FLAG_PAYLOAD_LEN)
    r.send(struct.pack(">QI", 4096, 2))  # id 2 was not selected: read, then refused
    flags, kind, body = r.chunk()
    assert (flags, kind) == (1, ERROR) and b"context id 2, not selected" in body
    r.close()


def test_a_5_gib_zero_is_one_request() -> None:
    with trionbd_process("memory", str(DISK)) as server:
        r = Extended(server.socket)
        r.negotiate()
        for offset in (GiB - 4096, 6 * GiB):  # data on both sides of the zeroed range
            r.request(CMD_WRITE, offset, 8192, flags=FLAG_PAYLOAD_LEN)
            r.send(b"\xff" * 8192)
            r.done(offset=offset)
        r.request(CMD_ZERO, GiB, 5 * GiB)
        r.done(offset=GiB)
        assert r.read(GiB - 4096, 8192) == b"\xff" * 4096 + bytes(4096)
        assert r.read(6 * GiB - 4096, 8192) == bytes(4096) + b"\xff" * 4096
        assert r.block_status(GiB, 5 * GiB, FLAG_REQ_ONE) == [(1, [(5 * GiB, 3)])]
        r.request(CMD_TRIM, 0, DISK)  # the whole disk, in one request too
        r.done()
        assert r.block_status(0, DISK) == [(1, [(DISK, 3)])]
        r.close()


# --- qemu 10, qemu 7.2, libnbd 1.14 -----------------------------------------------------------


def qemu10_run(tool: str, args: list[str], *events: str) -> tuple[str, list[str]]:
    """Run qemu 10's ``tool`` with the trace ``events`` on: its output, and its trace
    lines (qemu writes them to stderr as ``EVENT message``)."""
    cmd = [qemu10(tool)]
    for event in events:
        cmd += ["--trace", event]
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr.splitlines()


def traced(lines: list[str], event: str) -> list[str]:
    return [line for line in lines if line.startswith(f"{event} ")]


def test_qemu_10_negotiates_extended_headers_and_maps_the_hole_at_once(disk: Running) -> None:
    out, lines = qemu10_run(
        "qemu-img", ["map", "--output=json", "-f", "raw", disk.uri],
        "nbd_receive_option_reply", "nbd_send_request", "nbd_receive_reply_chunk_header",
    )  # fmt: skip
    assert traced(lines, "nbd_receive_option_reply")[0].endswith(
        "Received option reply 11 (extended headers), type 1 (ack), len 0"
    )
    assert json.loads(out)[2] == {
        "start": GiB, "length": 6 * GiB, "depth": 0, "present": True, "zero": True,
        "data": False, "compressed": False, "offset": GiB,
    }  # fmt: skip
    # One block status request covering the hole and more, answered in 64-bit chunks.
    requests = traced(lines, "nbd_send_request")
    assert any(f".from = {GiB}, .len = {7 * GiB}," in line for line in requests), requests
    chunks = traced(lines, "nbd_receive_reply_chunk_header")
    assert chunks and all("type = 6 (block status (64-bit))" in line for line in chunks)


def test_qemu_10_writes_zeroes_5_gib_in_one_request() -> None:
    with trionbd_process("memory", str(DISK)) as server:
        _, lines = qemu10_run(
            "qemu-io",
            ["-f", "raw", "-c", "write -P 0x55 0 1M", "-c", "write -P 0x66 6G 1M",
             "-c", "write -z -n 1G 5G", "-c", "read -P 0x55 0 1M", "-c", "read -P 0 1G 4M",
             "-c", "read -P 0 6143M 1M", "-c", "read -P 0x66 6G 1M", server.uri],
            "nbd_send_request",
        )  # fmt: skip
        zeroes = [line for line in traced(lines, "nbd_send_request") if "write zeroes" in line]
        assert len(zeroes) == 1 and f".from = {GiB}, .len = {5 * GiB}," in zeroes[0], zeroes
        # qemu 7.2 sees the same disk through compact headers.
        out = run(["qemu-img", "map", "--output=json", "-f", "raw", server.uri])
        assert [(e["start"], e["length"], e["data"]) for e in json.loads(out)] == [
            (0, MiB, True), (MiB, 6 * GiB - MiB, False), (6 * GiB, MiB, True),
            (6 * GiB + MiB, 2 * GiB - MiB, False),
        ]  # fmt: skip


def test_qemu_10_without_extended_headers_falls_back() -> None:
    with trionbd_process("--no-eh", "memory", str(DISK)) as server:
        _, lines = qemu10_run(
            "qemu-io",
            ["-f", "raw", "-c", "write -P 0x55 0 64k", "-c", "read -P 0x55 0 64k", server.uri],
            "nbd_receive_option_reply",
        )  # fmt: skip
    replies = traced(lines, "nbd_receive_option_reply")
    assert "option reply 11 (extended headers), type 2147483649 (unsupported)" in replies[0]
    assert "option reply 8 (structured reply), type 1 (ack)" in replies[1]


def test_old_clients_keep_compact_headers(disk: Running) -> None:
    """libnbd 1.14 and qemu 7.2 never ask for extended headers; the server offers them
    and serves these clients as before."""
    out = nbdsh(
        disk.uri,
        "got = []\n"
        "print(h.get_structured_replies_negotiated())\n"
        f"print(h.pread(8, {7 * GiB}).hex())\n"
        f"h.block_status({GiB}, {4 * GiB - 4096}, lambda ctx, off, e, err: got.extend(e))\n"
        "print(got)\n",
        "--base-allocation",
    )
    # The hole, answered within the 32-bit request.
    assert out.split("\n")[:3] == ["True", struct.pack(">Q", 7 * GiB).hex(), f"[{GiB}, 3]"]
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", disk.uri]))
    assert info["virtual-size"] == DISK


def test_block_status_payload_picks_among_the_contexts() -> None:
    """With the dirty-bitmap filter two contexts are selected; the payload form of block
    status answers only the ids it names."""
    bitmap = "qemu:dirty-bitmap:default"
    with trionbd_process("--filter=dirty-bitmap", "memory", str(DISK)) as server:
        r = Extended(server.socket)
        assert r.negotiate(contexts=("base:allocation", bitmap)) & BLOCK_STATUS_PAYLOAD
        r.request(CMD_WRITE, 5 * GiB, 4096, flags=FLAG_PAYLOAD_LEN)
        r.send(b"\x01" * 4096)
        r.done(offset=5 * GiB)
        both = r.block_status(4 * GiB, 2 * GiB)
        assert both == [
            (1, [(GiB, 3), (32768, 0), (GiB - 32768, 3)]),  # memory: 32 KiB pages
            (2, [(GiB, 0), (65536, 1), (GiB - 65536, 0)]),  # the bitmap: 64 KiB blocks
        ]
        assert r.block_status(4 * GiB, 0, payload=struct.pack(">QI", 2 * GiB, 2)) == both[1:]
        # In the order asked (any order is allowed); DONE on the last.
        again = r.block_status(4 * GiB, 0, payload=struct.pack(">QII", 2 * GiB, 2, 1))
        assert again == both[::-1]
        r.close()
