"""The connection task in process: options answered from the chain, requests served,
errors mapped, concurrency, disconnects and graceful shutdown."""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
from typing import Any

import pytest
import trio

from tests.server.nbdclient import assemble, connect, error_of, memory_client
from tests.support import serving
from trionbd.chain import Chain, Export, NBDError, Plugin
from trionbd.chain.next import Caps
from trionbd.chain.types import BlockSize, CacheMode, Concurrency, FuaMode, ZeroMode
from trionbd.filters.dirty_bitmap import DirtyBitmapFilter
from trionbd.plugins.memory import MemoryPlugin
from trionbd.plugins.pattern import PatternPlugin, pattern_bytes
from trionbd.protocol import (
    Cmd,
    CmdFlag,
    DataChunk,
    Err,
    HoleChunk,
    Info,
    NoneChunk,
    Opt,
    OptionReply,
    Rep,
    SimpleReply,
    TransmissionFlag,
    wire,
)
from trionbd.protocol.constants import BASE_ALLOCATION, MAX_OPTIONS, HandshakeFlag
from trionbd.server import ServerConfig
from trionbd.server.handshake import transmission_flags

MiB = 1 << 20
TF = TransmissionFlag


class Disks(Plugin):
    """Two named exports, plus names whose open fails in telling ways."""

    name = "disks"
    EXPORTS = {"a": (4096, "the first disk"), "b": (8192, "")}
    FAILURES = {
        "denied": errno.EACCES,
        "invalid": errno.EINVAL,
        "closing": errno.ESHUTDOWN,
        "broken": errno.EIO,
    }
    nonblocking = True

    async def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        return [Export(n, d) for n, (_, d) in self.EXPORTS.items()]

    async def default_export(self, readonly: bool, is_tls: bool) -> str:
        return "a"

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> str:
        if export_name in self.FAILURES:
            raise NBDError(self.FAILURES[export_name], f"cannot open {export_name}")
        if export_name not in self.EXPORTS:
            raise NBDError(errno.ENOENT, f"no export named {export_name!r}")
        return export_name

    async def get_size(self, h: str) -> int:
        return self.EXPORTS[h][0]

    async def export_description(self, h: str) -> str | None:
        return self.EXPORTS[h][1] or None

    async def pread(self, h: str, count: int, offset: int, flags: int) -> bytes:
        return pattern_bytes(count, offset)


def replies(options: list[OptionReply]) -> list[tuple[int, bytes]]:
    return [(r.reply, r.payload) for r in options]


# --- options answered from the chain ----------------------------------------------------------


async def test_list_names_every_export_with_its_description() -> None:
    async with serving(Disks()) as server:
        c = await connect(server)
        await c.handshake()
        got = await c.option(Opt.LIST)
        assert replies(got) == [
            (Rep.SERVER, b"\0\0\0\x01a" + b"the first disk"),
            (Rep.SERVER, b"\0\0\0\x01b"),
            (Rep.ACK, b""),
        ]


async def test_info_and_go_answer_identically_and_resolve_the_default_name() -> None:
    async with serving(Disks()) as server:
        c = await connect(server)
        await c.handshake()
        infos = [Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION]
        info = await c.option(Opt.INFO, wire.name_and_infos("", infos))
        go = await c.option(Opt.GO, wire.name_and_infos("", infos))
        assert replies(info) == replies(go)
        flags = TF.HAS_FLAGS | TF.READ_ONLY
        assert replies(go) == [
            (Rep.INFO, struct.pack(">HQH", Info.EXPORT, 4096, flags)),
            (Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, 32 * MiB)),
            (Rep.INFO, b"\0\x01a"),
            (Rep.INFO, b"\0\x02the first disk"),
            (Rep.ACK, b""),
        ]
        assert await c.read(8, 16) == pattern_bytes(16, 8)


async def test_go_for_an_unknown_export_is_err_unknown_and_the_client_may_retry() -> None:
    async with serving(Disks()) as server:
        c = await connect(server)
        await c.handshake()
        [err] = await c.option(Opt.GO, wire.name_and_infos("nope", []))
        assert (err.reply, err.payload) == (Rep.ERR_UNKNOWN, b"no export named 'nope'")
        [err] = await c.option(Opt.INFO, wire.name_and_infos("nope", []))
        assert err.reply == Rep.ERR_UNKNOWN
        got = await c.option(Opt.GO, wire.name_and_infos("b", []))
        assert got[-1].reply == Rep.ACK
        assert await c.read(8000, 192) == pattern_bytes(192, 8000)


@pytest.mark.parametrize(
    ("name", "reply"),
    [
        ("denied", Rep.ERR_POLICY),
        ("invalid", Rep.ERR_INVALID),
        ("closing", Rep.ERR_SHUTDOWN),
        ("broken", Rep.ERR_UNKNOWN),
    ],
)
async def test_open_errors_become_option_errors(name: str, reply: Rep) -> None:
    async with serving(Disks()) as server:
        c = await connect(server)
        await c.handshake()
        [err] = await c.option(Opt.GO, wire.name_and_infos(name, []))
        assert (err.reply, err.payload) == (reply, f"cannot open {name}".encode())


class Undescribable(Disks):
    async def export_description(self, h: str) -> str | None:
        if h == "b":
            raise NBDError(errno.EIO, "no description of b")
        return await super().export_description(h)


async def test_a_go_that_failed_leaves_no_context_behind() -> None:
    """The context GO opened is closed when the description fails, and the client,
    still negotiating, uses no export: closing the connections of every export
    leaves it alone."""
    async with serving(Undescribable()) as server:
        c = await connect(server)
        await c.handshake()
        [err] = await c.option(Opt.GO, wire.name_and_infos("b", []))
        assert (err.reply, err.payload) == (Rep.ERR_UNKNOWN, b"no description of b")
        assert await server.close_connections(server.chain.top, lambda ctx: True, 1) == 0
        got = await c.option(Opt.GO, wire.name_and_infos("a", []))
        assert got[-1].reply == Rep.ACK
        assert await c.read(0, 8) == pattern_bytes(8, 0)


async def test_export_name_enters_transmission() -> None:
    async with serving(Disks()) as server:
        c = await connect(server)
        await c.handshake()
        await c.stream.send_all(c.proto.option(Opt.EXPORT_NAME, b"b"))
        reply = await c.event()
        assert (reply.size, reply.flags) == (8192, TF.HAS_FLAGS | TF.READ_ONLY)  # type: ignore[union-attr]
        assert await c.read(0, 8) == pattern_bytes(8, 0)


async def test_export_name_of_an_unknown_export_closes_silently() -> None:
    async with serving(Disks()) as server:
        c = await connect(server)
        await c.handshake()
        await c.stream.send_all(wire.option_request(Opt.EXPORT_NAME, b"nope"))
        assert await c.eof()


async def test_list_grants_options_per_export() -> None:
    """nbdinfo --list asks INFO and LIST_META_CONTEXT about each export on one connection."""
    many = {f"d{i}": (512, "") for i in range(4)}

    class Many(Disks):
        EXPORTS = many

    async with serving(Many()) as server:
        c = await connect(server)
        await c.handshake()
        await c.option(Opt.LIST)
        for i in range(MAX_OPTIONS * 4):
            got = await c.option(Opt.INFO, wire.name_and_infos(f"d{i % 4}", []))
            assert got[-1].reply == Rep.ACK
        # 1 + 128 options used out of 32 + 4 * 32: the 32nd-from-last still answers.
        for _ in range(MAX_OPTIONS - 2):
            await c.option(Opt.PEEK_EXPORT)
        # The last option of the budget is answered; the one after it closes.
        await c.stream.send_all(
            c.proto.option(Opt.PEEK_EXPORT) + wire.option_request(Opt.PEEK_EXPORT)
        )
        answer = await c.event()
        assert isinstance(answer, OptionReply) and answer.reply == Rep.ERR_UNSUP
        assert await c.eof()


async def test_unknown_and_invalid_options_are_refused_and_negotiation_goes_on() -> None:
    async with serving(MemoryPlugin(MiB)) as server:
        c = await connect(server)
        await c.handshake()
        [err] = await c.option(4242, b"x" * 1000)
        assert (err.reply, err.payload) == (Rep.ERR_UNSUP, b"option 4242 is not supported")
        [err] = await c.option(Opt.PEEK_EXPORT)
        assert err.reply == Rep.ERR_UNSUP
        [err] = await c.option(Opt.GO, b"\0\0\0\x09ab\0\0")
        assert err.reply == Rep.ERR_INVALID
        assert err.payload == b"export name length 9 runs past the 8-byte payload"
        [err] = await c.option(Opt.STARTTLS)
        assert (err.reply, err.payload) == (Rep.ERR_POLICY, b"TLS is off on this server")
        got = await c.option(Opt.GO, wire.name_and_infos("", []))
        assert got[-1].reply == Rep.ACK


async def test_abort_is_acked_then_the_server_closes() -> None:
    async with serving(MemoryPlugin(MiB)) as server:
        c = await connect(server)
        await c.handshake()
        [ack] = await c.option(Opt.ABORT)
        assert (ack.reply, ack.payload) == (Rep.ACK, b"")
        assert await c.eof()


async def test_meta_contexts() -> None:
    async with serving(MemoryPlugin(MiB)) as server:
        c = await connect(server)
        await c.handshake()
        base = BASE_ALLOCATION.encode()
        # LIST works before structured replies (nbdinfo sends it anyway).
        got = await c.option(Opt.LIST_META_CONTEXT, wire.name_and_queries("", []))
        assert replies(got) == [(Rep.META_CONTEXT, b"\0\0\0\0" + base), (Rep.ACK, b"")]
        [err] = await c.option(Opt.SET_META_CONTEXT, wire.name_and_queries("", [BASE_ALLOCATION]))
        assert err.reply == Rep.ERR_INVALID and b"structured replies" in err.payload
        await c.option(Opt.STRUCTURED_REPLY)
        got = await c.option(Opt.LIST_META_CONTEXT, wire.name_and_queries("", ["base:"]))
        assert replies(got) == [(Rep.META_CONTEXT, b"\0\0\0\0" + base), (Rep.ACK, b"")]
        for queries in (["base:"], ["qemu:dirty-bitmap:x"], []):
            got = await c.option(Opt.SET_META_CONTEXT, wire.name_and_queries("", queries))
            assert replies(got) == [(Rep.ACK, b"")], queries
        got = await c.option(
            Opt.SET_META_CONTEXT, wire.name_and_queries("", ["x:y", BASE_ALLOCATION])
        )
        assert replies(got) == [(Rep.META_CONTEXT, b"\0\0\0\x01" + base), (Rep.ACK, b"")]


BITMAP = "qemu:dirty-bitmap:default"


def context_reply(cid: int, name: str) -> tuple[int, bytes]:
    return Rep.META_CONTEXT, struct.pack(">I", cid) + name.encode()


async def test_meta_contexts_of_the_chain_are_negotiated_and_answered() -> None:
    """A layer offering contexts (the dirty-bitmap filter): LIST with and without
    namespaces, SET of one or both, block status answering each selected one."""
    chain = Chain(MemoryPlugin(MiB), [DirtyBitmapFilter()])
    async with serving(chain) as server:
        c = await connect(server)
        await c.handshake()
        await c.option(Opt.STRUCTURED_REPLY)
        for queries, names in [
            ([], [BASE_ALLOCATION, BITMAP]),
            (["qemu:"], [BITMAP]),
            (["qemu:dirty-bitmap:"], [BITMAP]),
            (["base:", "x-other:"], [BASE_ALLOCATION]),
            ([BITMAP], [BITMAP]),
        ]:
            got = await c.option(Opt.LIST_META_CONTEXT, wire.name_and_queries("", queries))
            assert replies(got) == [*(context_reply(0, n) for n in names), (Rep.ACK, b"")]
        # SET takes exact names only; ids follow the order offered.
        got = await c.option(Opt.SET_META_CONTEXT, wire.name_and_queries("", ["qemu:"]))
        assert replies(got) == [(Rep.ACK, b"")]
        got = await c.option(
            Opt.SET_META_CONTEXT, wire.name_and_queries("", [BITMAP, BASE_ALLOCATION])
        )
        assert replies(got) == [
            context_reply(1, BASE_ALLOCATION), context_reply(2, BITMAP), (Rep.ACK, b"")
        ]  # fmt: skip
        await c.option(Opt.GO, wire.name_and_infos("", []))
        await c.write(65536 + 100, b"x" * 4096)
        events = await c.request(Cmd.BLOCK_STATUS, 0, 4 * 65536)
        assert [(e.context_id, e.extents, e.done) for e in events] == [  # type: ignore[union-attr]
            (1, ((65536, 3), (32768, 0), (5 * 32768, 3)), False),  # memory: 32K pages
            (2, ((65536, 0), (65536, 1), (2 * 65536, 0)), True),
        ]
        events = await c.request(Cmd.BLOCK_STATUS, 0, 4 * 65536, CmdFlag.REQ_ONE)
        assert [e.extents for e in events] == [((65536, 3),), ((65536, 0),)]  # type: ignore[union-attr]


async def test_no_structured_replies_and_no_meta_contexts_when_configured_off() -> None:
    config = ServerConfig(structured_replies=False, meta_contexts=False)
    async with serving(MemoryPlugin(MiB), config) as server:
        c = await connect(server)
        await c.handshake()
        [err] = await c.option(Opt.STRUCTURED_REPLY)
        assert err.reply == Rep.ERR_UNSUP
        [err] = await c.option(Opt.LIST_META_CONTEXT, wire.name_and_queries("", []))
        assert err.reply == Rep.ERR_UNSUP
        await c.option(Opt.GO, wire.name_and_infos("", []))
        await c.write(0, b"abc")
        events = await c.request(Cmd.READ, 0, 3)
        assert events == [SimpleReply(events[0].cookie, 0, b"abc")]  # type: ignore[union-attr]


async def test_mask_handshake_without_no_zeroes_pads_export_name() -> None:
    config = ServerConfig(handshake_flags=HandshakeFlag.FIXED_NEWSTYLE)
    async with serving(MemoryPlugin(MiB), config) as server:
        c = await connect(server)
        greeting = await c.event()
        assert greeting.handshake_flags == 1  # type: ignore[union-attr]
        await c.stream.send_all(c.proto.client_flags())
        await c.stream.send_all(c.proto.option(Opt.EXPORT_NAME, b""))
        reply = await c.event()
        assert reply.size == MiB  # type: ignore[union-attr]
        await c.write(0, b"x")  # the 124 zero bytes were consumed: the stream is in sync


async def test_handshake_timeout(autojump_clock: trio.testing.MockClock) -> None:
    config = ServerConfig(handshake_timeout=10)
    async with serving(MemoryPlugin(MiB), config) as server:
        c = await connect(server)
        await c.handshake()
        start = trio.current_time()
        assert await c.eof()
        assert 10 <= trio.current_time() - start < 11


async def test_protocol_error_closes_only_that_connection() -> None:
    async with serving(MemoryPlugin(MiB)) as server:
        good = await connect(server)
        await good.go()
        bad = await connect(server)
        await bad.go()
        await bad.stream.send_all(b"\xde\xad\xbe\xef" + bytes(24))
        assert await bad.eof()
        await good.write(0, b"still here")
        assert await good.read(0, 10) == b"still here"


# --- transmission ----------------------------------------------------------------------------


def test_transmission_flags() -> None:
    caps = Caps(
        size=1,
        write=True,
        flush=True,
        trim=True,
        zero=ZeroMode.NATIVE,
        fast_zero=True,
        fua=FuaMode.NATIVE,
        multi_conn=True,
        extents=True,
        cache=CacheMode.NATIVE,
        rotational=False,
        block_size=BlockSize(),
    )
    assert transmission_flags(caps) == 0x0DED & ~TF.SEND_DF  # DF is the protocol's
    ro = Caps(
        size=1,
        write=False,
        flush=False,
        trim=False,
        zero=ZeroMode.NONE,
        fast_zero=True,
        fua=FuaMode.NATIVE,
        multi_conn=False,
        extents=False,
        cache=CacheMode.NONE,
        rotational=True,
        block_size=BlockSize(),
    )
    assert transmission_flags(ro) == TF.HAS_FLAGS | TF.READ_ONLY | TF.ROTATIONAL


async def test_memory_export_flags_and_every_command() -> None:
    async with serving(MemoryPlugin(4 * MiB)) as server:
        c = await connect(server)
        await c.go(meta=True)
        assert c.size == 4 * MiB
        assert c.flags == (
            TF.HAS_FLAGS
            | TF.SEND_FLUSH
            | TF.SEND_FUA
            | TF.SEND_TRIM
            | TF.SEND_WRITE_ZEROES
            | TF.SEND_DF
            | TF.CAN_MULTI_CONN
            | TF.SEND_CACHE
            | TF.SEND_FAST_ZERO
        )
        data = bytes(range(256)) * 256
        await c.write(MiB - 100, data, CmdFlag.FUA)
        assert await c.read(MiB - 100, len(data)) == data
        assert await c.error(Cmd.FLUSH) == 0
        assert await c.error(Cmd.WRITE_ZEROES, MiB, 512, CmdFlag.NO_HOLE) == 0
        assert await c.error(Cmd.WRITE_ZEROES, MiB + 512, 512, CmdFlag.FAST_ZERO) == 0
        assert await c.error(Cmd.TRIM, MiB + 1024, 1024) == 0
        expected = data[:100] + bytes(2048) + data[2148:]
        assert await c.read(MiB - 100, len(data)) == expected
        assert await c.error(Cmd.CACHE, 0, MiB) == 0
        [status] = await c.request(Cmd.BLOCK_STATUS, 0, 4 * MiB)
        assert status.extents == (  # type: ignore[union-attr]
            (MiB - 32 * 1024, 3),
            (96 * 1024, 0),
            (3 * MiB - 64 * 1024, 3),
        )
        [one] = await c.request(Cmd.BLOCK_STATUS, 0, 4 * MiB, CmdFlag.REQ_ONE)
        assert one.extents == ((MiB - 32 * 1024, 3),)  # type: ignore[union-attr]
        await c.disconnect()
        assert await c.eof()


async def test_sparse_reads_become_hole_chunks_unless_df() -> None:
    async with serving(MemoryPlugin(MiB)) as server:
        c = await connect(server)
        await c.go()
        await c.write(40000, b"data")
        events = await c.request(Cmd.READ, 0, 100000)
        kinds = [(type(e).__name__, getattr(e, "offset", None)) for e in events]
        assert kinds == [
            ("HoleChunk", 0),
            ("DataChunk", 32768),
            ("HoleChunk", 65536),
        ]
        assert [e.done for e in events] == [False, False, True]  # type: ignore[union-attr]
        assert assemble(events, 0, 100000) == bytes(40000) + b"data" + bytes(59996)
        [whole] = await c.request(Cmd.READ, 0, 100000, CmdFlag.DF)
        assert isinstance(whole, DataChunk) and whole.done
        assert whole.data == bytes(40000) + b"data" + bytes(59996)
        [hole] = await c.request(Cmd.READ, 200000, 512)
        assert hole == HoleChunk(hole.cookie, 200000, 512, True)  # type: ignore[union-attr]


async def test_zero_length_requests_succeed() -> None:
    async with serving(MemoryPlugin(MiB)) as server:
        c = await connect(server)
        await c.go(meta=True)
        [none] = await c.request(Cmd.READ, 100, 0)
        assert isinstance(none, NoneChunk) and none.done
        for command in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE):
            assert await c.error(command, 100, 0) == 0
        # A block status descriptor cannot be 0 bytes long.
        assert await c.error(Cmd.BLOCK_STATUS, 100, 0) == Err.EINVAL


async def test_bad_requests_get_error_replies_and_the_connection_goes_on() -> None:
    async with serving(MemoryPlugin(MiB)) as server:
        c = await connect(server)
        await c.go()
        assert await c.error(Cmd.READ, MiB, 1) == Err.EINVAL
        assert await c.error(Cmd.WRITE, MiB, 3, data=b"abc") == Err.ENOSPC
        assert await c.error(Cmd.READ, 0, 1, 0x8000) == Err.EINVAL
        assert await c.error(Cmd.BLOCK_STATUS, 0, 1) == Err.EINVAL  # no context selected
        assert await c.error(99) == Err.EINVAL
        await c.write(0, b"ok")
        assert await c.read(0, 2) == b"ok"


async def test_simple_replies_without_structured_replies() -> None:
    async with serving(MemoryPlugin(MiB)) as server:
        c = await connect(server)
        await c.go(structured=False)
        assert not c.flags & TF.SEND_DF
        [r] = await c.request(Cmd.READ, MiB, 1)
        assert isinstance(r, SimpleReply) and r.error == Err.EINVAL
        [r] = await c.request(Cmd.READ, 0, 0)
        assert isinstance(r, SimpleReply) and (r.error, r.data) == (0, b"")
        await c.write(5, b"simple")
        assert await c.read(0, 11) == b"\0" * 5 + b"simple"


async def test_read_only_config() -> None:
    async with serving(MemoryPlugin(MiB), ServerConfig(readonly=True)) as server:
        c = await connect(server)
        await c.go()
        assert c.flags & TF.READ_ONLY
        assert not c.flags & (TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FUA)
        assert await c.error(Cmd.WRITE, 0, 1, data=b"x") == Err.EPERM
        assert await c.error(Cmd.TRIM, 0, 1) == Err.EPERM
        assert await c.error(Cmd.WRITE_ZEROES, 0, 1) == Err.EPERM
        assert await c.read(0, 4) == bytes(4)


class Faulty(Plugin):
    """Each offset fails its own way."""

    name = "faulty"
    nonblocking = True

    async def get_size(self, h: Any) -> int:
        return MiB

    async def can_fast_zero(self, h: Any) -> bool:
        return True

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        if offset == 0:
            raise NBDError(errno.EIO, "disk on fire")
        if offset == 512:
            raise OSError(errno.ENOSPC, "no space")
        if offset == 1024:
            raise RuntimeError("a bug")
        if offset == 1536:
            return b"short"
        if offset == 2048:
            raise NBDError(errno.EOVERFLOW, "too big for DF")
        return bytes(count)

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        raise NBDError(errno.EDQUOT, "over quota")

    async def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        raise NBDError(errno.ENOTSUP, "cannot zero fast")


async def test_backend_errors_are_mapped_and_logged_not_sent_as_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(Faulty()) as server:
        c = await connect(server)
        await c.go()
        events = await c.request(Cmd.READ, 0, 16)
        assert [(e.error, e.message) for e in events] == [(Err.EIO, "disk on fire")]  # type: ignore[union-attr]
        assert await c.error(Cmd.READ, 512, 16) == Err.ENOSPC
        with caplog.at_level(logging.ERROR, "trionbd.server"):
            events = await c.request(Cmd.READ, 1024, 16)
        assert [(e.error, e.message) for e in events] == [(Err.EIO, "internal server error")]  # type: ignore[union-attr]
        assert "a bug" in caplog.text
        events = await c.request(Cmd.READ, 1536, 16)
        assert error_of(events) == Err.EIO and "returned 5" in events[0].message  # type: ignore[union-attr]
        assert await c.error(Cmd.READ, 2048, 16) == Err.EINVAL
        assert await c.error(Cmd.READ, 2048, 16, CmdFlag.DF) == Err.EOVERFLOW
        assert await c.error(Cmd.WRITE, 0, 1, data=b"x") == Err.ENOSPC
        assert await c.error(Cmd.WRITE_ZEROES, 0, 1) == Err.EINVAL
        assert await c.error(Cmd.WRITE_ZEROES, 0, 1, CmdFlag.FAST_ZERO) == Err.ENOTSUP
        assert await c.read(4096, 4) == bytes(4)


class Gate(Plugin):
    """Reads at offset 0 wait until a read elsewhere (or the test) opens the gate."""

    name = "gate"
    nonblocking = False

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.waiting = trio.Event()
        self.finished = 0

    async def get_size(self, h: Any) -> int:
        return MiB

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        if offset == 0:
            self.waiting.set()
            await self.gate.wait()
        else:
            self.gate.set()
        self.finished += 1
        return bytes([offset % 251]) * count


async def test_requests_of_one_connection_run_concurrently_and_reply_out_of_order() -> None:
    async with serving(Gate()) as server:
        c = await connect(server)
        await c.go()
        first = await c.send(Cmd.READ, 0, 8)
        second = await c.send(Cmd.READ, 7, 8)
        r2 = await c.reply()
        r1 = await c.reply()
        assert r2 == [DataChunk(second, 7, b"\x07" * 8, True)]
        assert r1 == [DataChunk(first, 0, b"\0" * 8, True)]


async def test_disconnect_waits_for_requests_in_flight() -> None:
    plugin = Gate()
    async with serving(plugin) as server:
        c = await connect(server)
        await c.go()
        cookie = await c.send(Cmd.READ, 0, 8)
        await plugin.waiting.wait()
        await c.disconnect()
        await trio.testing.wait_all_tasks_blocked()
        plugin.gate.set()
        assert await c.reply() == [DataChunk(cookie, 0, bytes(8), True)]
        assert await c.eof()


async def test_many_pipelined_requests_on_the_inline_path() -> None:
    async with serving(MemoryPlugin(8 * MiB)) as server:
        assert server.inline
        c = await connect(server)
        await c.go()
        blocks = {i: bytes([i]) * 4096 for i in range(1, 200)}
        async with trio.open_nursery() as nursery:

            async def send_all() -> None:
                for i, block in blocks.items():
                    await c.send(Cmd.WRITE, i * 8192, 4096, data=block)
                for i in blocks:
                    await c.send(Cmd.READ, i * 8192, 4096)

            nursery.start_soon(send_all)
            got: dict[int, bytes] = {}
            for _ in range(2 * len(blocks)):
                [event] = await c.reply()
                if isinstance(event, DataChunk):
                    got[event.offset // 8192] = event.data
                else:
                    assert isinstance(event, SimpleReply) and event.error == 0
        assert got == blocks


async def test_shutdown_lets_requests_in_flight_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plugin = Gate()
    async with serving(plugin, ServerConfig(shutdown_timeout=5)) as server:
        c = await connect(server)
        await c.go()
        cookie = await c.send(Cmd.READ, 0, 8)
        await plugin.waiting.wait()
        server.shutdown()

        async def open_gate_later() -> None:
            await trio.sleep(3)
            plugin.gate.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_gate_later)
            assert await c.reply() == [DataChunk(cookie, 0, bytes(8), True)]
            assert await c.eof()


async def test_shutdown_cancels_requests_after_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plugin = Gate()
    async with serving(plugin, ServerConfig(shutdown_timeout=5)) as server:
        c = await connect(server)
        await c.go()
        await c.send(Cmd.READ, 0, 8)
        await plugin.waiting.wait()
        start = trio.current_time()
        server.shutdown()
        assert await c.eof()
        assert 5 <= trio.current_time() - start < 6
        assert plugin.finished == 0


async def test_new_clients_are_refused_while_shutting_down() -> None:
    plugin = Gate()
    async with serving(plugin, ServerConfig(shutdown_timeout=5)) as server:
        c = await connect(server)
        await c.go()
        cookie = await c.send(Cmd.READ, 0, 8)
        await plugin.waiting.wait()
        server.shutdown()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(OSError):
            await connect(server)
        plugin.gate.set()
        assert await c.reply() == [DataChunk(cookie, 0, bytes(8), True)]


async def test_max_connections() -> None:
    async with serving(MemoryPlugin(MiB), ServerConfig(max_connections=1)) as server:
        first = await connect(server)
        await first.go()
        second = await connect(server)
        await second.handshake()
        [refused] = await second.option(Opt.GO, wire.name_and_infos("", []))
        assert refused.reply == Rep.ERR_POLICY and b"--max-connections" in refused.payload
        await first.write(0, b"x")


class OneAtATime(MemoryPlugin):
    concurrency = Concurrency.SERIALIZE_CONNECTIONS


async def test_serialize_connections_makes_the_second_client_wait() -> None:
    async with serving(OneAtATime(MiB)) as server:
        first = await connect(server)
        await first.go()
        second = await connect(server)
        await trio.testing.wait_all_tasks_blocked()
        # No greeting while the first client is connected.
        fd = second.stream.socket.fileno()  # type: ignore[attr-defined]
        assert select.select([fd], [], [], 0) == ([], [], [])
        await first.disconnect()
        assert await first.eof()
        await second.go()
        await second.write(0, b"my turn")


async def test_memory_stream_transport() -> None:
    """The connection also runs on a non-socket stream (as with -s / socket activation)."""
    async with serving(MemoryPlugin(MiB)) as server, memory_client(server) as c:
        await c.go()
        await c.write(1000, b"memory stream")
        assert await c.read(1000, 13) == b"memory stream"
        await c.disconnect()
        assert await c.eof()


async def test_chain_with_pattern_is_read_only() -> None:
    async with serving(Chain(PatternPlugin(MiB))) as server:
        c = await connect(server)
        await c.go()
        assert c.flags == TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_DF | TF.CAN_MULTI_CONN
        assert await c.read(MiB - 20, 20) == pattern_bytes(20, MiB - 20)


async def test_a_client_resetting_mid_pipeline_loses_only_itself() -> None:
    async with serving(MemoryPlugin(64 * MiB)) as server:
        good = await connect(server)
        await good.go()
        rude = await connect(server)
        await rude.go()
        for i in range(500):
            await rude.send(Cmd.READ, (i % 64) * MiB, 256 * 1024)
        sock = rude.stream.socket  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        await trio.testing.wait_all_tasks_blocked()
        await good.write(0, b"unharmed")
        assert await good.read(0, 8) == b"unharmed"


class BuggyOpen(MemoryPlugin):
    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> None:
        if export_name == "bug":
            raise RuntimeError("plugin bug in open")


async def test_an_unexpected_error_fails_only_that_option(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(BuggyOpen(MiB)) as server:
        good = await connect(server)
        await good.go()
        bad = await connect(server)
        await bad.handshake()
        with caplog.at_level(logging.ERROR, "trionbd.server"):
            [refused] = await bad.option(Opt.GO, wire.name_and_infos("bug", []))
        assert refused.reply == Rep.ERR_UNKNOWN
        assert b"internal server error" in refused.payload
        assert "plugin bug in open" in caplog.text
        replies = await bad.option(Opt.GO, wire.name_and_infos("", []))
        assert replies[-1].reply == Rep.ACK  # the client may go on negotiating
        await good.write(0, b"still serving")
        assert await good.read(0, 13) == b"still serving"
