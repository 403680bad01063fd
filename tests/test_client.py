"""The async client (trionbd.client) against the real trionbd command, nbdkit, in-process
servers and a hand-driven old-style server."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import trionbd.client as nbd
from tests.support import HANG_GUARD, nbdkit_process, serving, trionbd_process
from trionbd.chain import Chain, NBDError, Plugin, Sparse
from trionbd.net import Address
from trionbd.net.transport import Transport
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol import ServerConnection, wire
from trionbd.protocol.client import (
    parse_info_replies,
    parse_meta_context_reply,
    parse_server_reply,
)
from trionbd.protocol.constants import Cmd, CmdFlag, Err, Info, Opt, Rep, State, TransmissionFlag
from trionbd.protocol.errors import RemoteProtocolError
from trionbd.protocol.events import (
    NEED_DATA,
    ConnectionClosed,
    Disconnect,
    ExportNameOption,
    OptionEvent,
    Request,
)
from trionbd.server import ServerConfig, open_tcp_listeners, serve

MiB = 1024 * 1024
GiB = 1024 * MiB
SIZE = 64 * MiB


@pytest.fixture(params=["trionbd", "nbdkit"])
def memory_server(request: pytest.FixtureRequest) -> Iterator[nbd.Address]:
    """A 64 MiB RAM disk served by the real trionbd command or by nbdkit."""
    if request.param == "trionbd":
        ctx = trionbd_process("memory", str(SIZE))
    else:
        ctx = nbdkit_process("memory", str(SIZE))
    with ctx as server:
        yield Address(unix_path=server.socket)


async def open_client(address: Address, export: str = "", **kw: Any) -> nbd.Client:
    assert address.unix_path is not None
    return await nbd.connect_unix(address.unix_path, export, **kw)


# --- against real servers ------------------------------------------------------------------


async def test_negotiates_structured_replies_block_status_and_flags(
    memory_server: Address,
) -> None:
    async with await open_client(memory_server) as c:
        assert c.size == SIZE
        assert c.export_name == ""
        assert c.structured and c.can_block_status
        assert c.flags & TransmissionFlag.HAS_FLAGS
        assert not c.is_read_only
        assert c.can_flush and c.can_fua and c.can_trim and c.can_zero and c.can_fast_zero
        assert c.can_multi_conn and c.can_df


async def test_every_command(memory_server: Address) -> None:
    rng = random.Random(7)
    data = rng.randbytes(MiB)
    async with await open_client(memory_server) as c:
        await c.pwrite(data, MiB, CmdFlag.FUA)
        assert await c.pread(MiB, MiB) == data
        await c.flush()
        await c.cache(MiB, MiB)

        await c.trim(64 * 1024, MiB)
        await c.zero(64 * 1024, MiB + 128 * 1024, CmdFlag.NO_HOLE)
        await c.zero(64 * 1024, MiB + 256 * 1024, CmdFlag.FAST_ZERO)
        expected = bytearray(data)
        for start in (0, 128 * 1024, 256 * 1024):
            expected[start : start + 64 * 1024] = bytes(64 * 1024)
        assert await c.pread(MiB, MiB) == expected

        # Block status: written data is not a hole; untouched space reads as a zero hole.
        [data_extent] = await c.block_status(4096, MiB + 512 * 1024, CmdFlag.REQ_ONE)
        assert data_extent.offset == MiB + 512 * 1024 and data_extent.flags & State.HOLE == 0
        [hole] = await c.block_status(MiB, 40 * MiB, CmdFlag.REQ_ONE)
        assert hole.offset == 40 * MiB and hole.flags == State.HOLE | State.ZERO
        extents = await c.block_status(8 * MiB, 0)
        pos = 0
        for e in extents:
            assert e.offset == pos and e.length > 0
            pos += e.length
        assert any(e.flags == 0 for e in extents)

        # Unwritten space reads as zeroes (trionbd sends it as hole chunks).
        unwritten = await c.pread(256 * 1024, 32 * MiB)
        assert unwritten == bytes(256 * 1024)
        if isinstance(unwritten, Sparse):
            assert unwritten.holes == ((0, 256 * 1024),)


@pytest.mark.parametrize("kind", ["trionbd", "nbdkit"])
async def test_extended_headers_with_trionbd_structured_replies_with_nbdkit(kind: str) -> None:
    """nbdkit 1.32 refuses NBD_OPT_EXTENDED_HEADERS; the client then asks for structured
    replies. Every command works either way (test_every_command)."""
    start = trionbd_process if kind == "trionbd" else nbdkit_process
    with start("memory", str(SIZE)) as server:
        async with await nbd.connect_unix(server.socket) as c:
            assert c.structured and c.extended == (kind == "trionbd")
        async with await nbd.connect_unix(server.socket, extended_headers=False) as c:
            assert c.structured and not c.extended


async def test_64_bit_lengths_with_extended_headers() -> None:
    """A 5 GiB zero and block status of a 6 GiB hole, each in one request; without
    extended headers such lengths are refused before anything is sent."""
    with trionbd_process("memory", str(8 * GiB)) as server:
        async with await nbd.connect_unix(server.socket) as c:
            assert c.extended
            for offset in (GiB - 4096, 7 * GiB):
                await c.pwrite(b"\xff" * 4096, offset)
            [hole] = await c.block_status(6 * GiB, GiB, CmdFlag.REQ_ONE)
            assert hole == (GiB, 6 * GiB, State.HOLE | State.ZERO)
            await c.pwrite(b"\xee" * 4096, 2 * GiB)
            await c.zero(5 * GiB, GiB)
            assert await c.pread(8192, 2 * GiB) == bytes(8192)
            assert await c.pread(8192, GiB - 4096) == b"\xff" * 4096 + bytes(4096)
            assert await c.block_status(6 * GiB, GiB) == [(GiB, 6 * GiB, State.HOLE | State.ZERO)]
        async with await nbd.connect_unix(server.socket, extended_headers=False) as c:
            with pytest.raises(NBDError, match="out of range") as e:
                await c.zero(5 * GiB, GiB)
            assert e.value.errno == errno.EINVAL
            [extent] = await c.block_status(GiB, GiB, CmdFlag.REQ_ONE)
            assert extent == (GiB, GiB, State.HOLE | State.ZERO)


async def test_hundreds_of_concurrent_requests_from_different_tasks(
    memory_server: Address,
) -> None:
    count = 500
    block = 4096
    data = random.Random(3).randbytes(count * block)
    async with await open_client(memory_server) as c:
        peak = 0

        async def write(i: int) -> None:
            nonlocal peak
            peak = max(peak, c.in_flight)  # requests issued by other tasks, not yet answered
            await c.pwrite(data[i * block : (i + 1) * block], i * block)

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(write, i)
        assert peak >= count // 2  # issued together, not one after another's reply

        got: list[bytes] = [b""] * count

        async def read(i: int) -> None:
            # Reverse order: replies come back in whatever order the server finishes.
            got[i] = await c.pread(block, i * block)

        async with trio.open_nursery() as nursery:
            for i in reversed(range(count)):
                nursery.start_soon(read, i)
        assert b"".join(got) == data
        assert c.in_flight == 0


async def test_errors_carry_the_server_code_and_message() -> None:
    with trionbd_process("memory", str(SIZE)) as server:
        async with await nbd.connect_unix(server.socket) as c:
            with pytest.raises(nbd.RequestError) as read_error:
                await c.pread(4096, SIZE - 1024)
            assert read_error.value.error == Err.EINVAL
            assert read_error.value.errno == errno.EINVAL
            assert "beyond the end of the export" in read_error.value.message

            with pytest.raises(nbd.RequestError) as write_error:
                await c.pwrite(b"x" * 4096, SIZE)
            assert write_error.value.error == Err.ENOSPC
            assert write_error.value.errno == errno.ENOSPC
            assert "beyond the end" in write_error.value.message

            # The connection is still fine after errors.
            await c.pwrite(b"ok", 0)
            assert await c.pread(2, 0) == b"ok"

    with trionbd_process("-r", "memory", str(SIZE)) as server:
        async with await nbd.connect_unix(server.socket) as c:
            assert c.is_read_only
            with pytest.raises(nbd.RequestError) as readonly_error:
                await c.pwrite(b"x", 0)
            assert readonly_error.value.error == Err.EPERM
            assert "read-only" in readonly_error.value.message


async def test_errors_without_a_message_are_named() -> None:
    with nbdkit_process("memory", str(SIZE)) as server:
        async with await nbd.connect_unix(server.socket) as c:
            with pytest.raises(nbd.RequestError) as e:
                await c.pread(4096, SIZE)
            assert e.value.error == Err.EINVAL and e.value.errno == errno.EINVAL
            assert e.value.message  # nbdkit sends no text: the error's name stands in


@pytest.mark.parametrize("server", ["trionbd", "nbdkit"])
async def test_simple_replies_when_structured_replies_are_refused(server: str) -> None:
    start = trionbd_process if server == "trionbd" else nbdkit_process
    with start("--no-sr", "memory", str(SIZE)) as running:
        async with await nbd.connect_unix(running.socket) as c:
            assert not c.structured and not c.can_block_status and not c.can_df
            payload = os.urandom(200_000)
            await c.pwrite(payload, 12345)
            assert await c.pread(len(payload), 12345) == payload
            with pytest.raises(nbd.RequestError) as e:
                await c.pread(10, SIZE)
            assert e.value.error == Err.EINVAL
            with pytest.raises(NBDError) as local:
                await c.block_status(4096, 0)
            assert local.value.errno == errno.EINVAL and "base:allocation" in local.value.message


async def test_list_and_info_in_the_handshake(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(b"A" * 5000)
    (tmp_path / "b.img").write_bytes(b"B" * 7000)
    with trionbd_process("file", f"dir={tmp_path}") as server:
        stream = await nbd.open_stream(Address(unix_path=server.socket))
        async with await nbd.handshake(stream) as h:
            assert h.structured
            exports = await h.list_exports()
            assert [e.name for e in exports] == ["a.img", "b.img"]
            default = await h.info("")
            assert (default.name, default.size) == ("a.img", 5000)
            assert default.block_size is not None
            b = await h.info("b.img")
            assert (b.name, b.size) == ("b.img", 7000)
            with pytest.raises(nbd.OptionError) as missing:
                await h.info("nope.img")
            assert missing.value.reply == Rep.ERR_UNKNOWN
            assert missing.value.errno == errno.ENOENT
            # The handshake goes on after a refusal: enter transmission with b.img.
            async with await h.go("b.img") as c:
                assert c.export_name == "b.img" and c.size == 7000
                assert await c.pread(7000, 0) == b"B" * 7000
        assert "Traceback" not in server.stderr

    with nbdkit_process("memory", "1M") as server:
        stream = await nbd.open_stream(Address(unix_path=server.socket))
        async with await nbd.handshake(stream) as h:
            assert [e.name for e in await h.list_exports()] == [""]
            assert (await h.info("")).size == MiB


async def test_go_refused_raises_option_error_with_the_servers_message(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(b"A" * 512)
    with trionbd_process("file", f"dir={tmp_path}") as server:
        with pytest.raises(nbd.OptionError) as e:
            await nbd.connect_unix(server.socket, "missing.img")
        assert e.value.option == Opt.GO and e.value.reply == Rep.ERR_UNKNOWN
        assert "missing.img" in e.value.message


async def test_connect_uri() -> None:
    with trionbd_process("memory", "1M") as server:
        async with await nbd.connect_uri(server.uri) as c:
            assert c.size == MiB


async def test_connect_tcp_to_an_in_process_server() -> None:
    listeners = await open_tcp_listeners(0, "127.0.0.1")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, MemoryPlugin(size=MiB), listeners)
        port = server.addresses[0].port
        async with await nbd.connect_tcp("127.0.0.1", port) as c:
            await c.pwrite(b"tcp", 100)
            assert await c.pread(3, 100) == b"tcp"
        async with await nbd.connect_uri(f"nbd://127.0.0.1:{port}/") as c:
            assert await c.pread(3, 100) == b"tcp"
        nursery.cancel_scope.cancel()


async def test_connect_failures_name_the_address(tmp_path: Path) -> None:
    with pytest.raises(nbd.ConnectionFailed) as e:
        await nbd.connect_unix(str(tmp_path / "no-such-socket"))
    assert "no-such-socket" in e.value.message and e.value.errno == errno.EIO


# --- server death, cancellation, disconnect -------------------------------------------------


async def test_server_death_fails_every_request_in_flight_promptly() -> None:
    with nbdkit_process("--filter=delay", "memory", str(SIZE), "rdelay=120") as server:
        c = await nbd.connect_unix(server.socket)
        failures: list[BaseException] = []

        async def read(i: int) -> None:
            try:
                await c.pread(4096, i * 4096)
            except nbd.ConnectionFailed as e:
                failures.append(e)

        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                await nursery.start(c.run)
                for i in range(50):
                    nursery.start_soon(read, i)
                await trio.testing.wait_all_tasks_blocked()
                assert c.in_flight == 50
                await trio.sleep(0.5)  # let nbdkit receive them (they then wait 120 s)
                server.proc.kill()
                server.proc.wait()
            # The nursery exited: every read failed and run() returned.
        assert len(failures) == 50
        assert all("connection lost" in str(e) for e in failures), failures[0]
        assert c.failure is not None and server.socket in c.failure
        with pytest.raises(nbd.ConnectionFailed):
            await c.pread(4096, 0)  # later requests fail at once
        await c.aclose()


class GatedPlugin(Plugin):
    """A RAM disk whose reads at offset 0 wait until the test opens the gate."""

    name = "gated"

    def __init__(self) -> None:
        self.data = bytearray(MiB)
        self.gate = trio.Event()
        self.waiting = 0

    async def get_size(self, h: Any) -> int:
        return len(self.data)

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        if offset == 0:
            self.waiting += 1
            await self.gate.wait()
        return bytes(self.data[offset : offset + count])

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.data[offset : offset + len(buf)] = buf


async def wait_until(predicate: Any) -> None:
    while not predicate():  # noqa: ASYNC110 (polls state of another task's plugin)
        await trio.sleep(0.01)


async def test_a_cancelled_request_leaves_the_connection_usable() -> None:
    plugin = GatedPlugin()
    plugin.data[4096:4100] = b"late"
    async with serving(Chain(plugin)) as server:
        path = server.addresses[0].unix_path
        assert path is not None
        async with await nbd.connect_unix(path) as c:
            with trio.move_on_after(HANG_GUARD):
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(c.pread, 100, 0)
                        await wait_until(lambda: plugin.waiting == 1)
                        scope.cancel()
            assert scope.cancelled_caught
            assert c.in_flight == 1  # its reply is still due
            await c.pwrite(b"more", 8192)
            assert await c.pread(4, 4096) == b"late"
            plugin.gate.set()
            await wait_until(lambda: c.in_flight == 0)  # the late reply was discarded
            assert await c.pread(4, 8192) == b"more"
            assert c.failure is None


async def test_disconnect_waits_for_requests_in_flight() -> None:
    plugin = GatedPlugin()
    plugin.data[:5] = b"first"
    async with serving(Chain(plugin)) as server:
        path = server.addresses[0].unix_path
        assert path is not None
        c = await nbd.connect_unix(path)
        results: list[bytes] = []

        async def read() -> None:
            results.append(await c.pread(5, 0))

        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                await nursery.start(c.run)
                nursery.start_soon(read)
                await wait_until(lambda: plugin.waiting == 1)
                nursery.start_soon(c.disconnect)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(nbd.ConnectionFailed):
                    await c.pread(5, 0)  # no new requests once disconnecting
                plugin.gate.set()
        assert results == [b"first"]
        assert c.failure is not None and "disconnected" in c.failure


async def test_clean_disconnect_is_seen_by_the_server() -> None:
    with trionbd_process("-v", "memory", "1M") as server:
        async with await nbd.connect_unix(server.socket) as c:
            await c.flush()
        with pytest.raises(nbd.ConnectionFailed):
            await c.flush()
        with trio.fail_after(HANG_GUARD):
            await wait_until(lambda: "client disconnected (Disconnect)" in server.stderr)


async def test_requests_need_a_running_client() -> None:
    with trionbd_process("memory", "1M") as server:
        c = await nbd.connect_unix(server.socket)
        with pytest.raises(RuntimeError, match="not running"):
            await c.pread(1, 0)
        await c.aclose()  # disconnects cleanly without a reader
        with pytest.raises(nbd.ConnectionFailed):
            await c.pread(1, 0)


async def test_block_status_with_a_request_beyond_the_end_is_an_error() -> None:
    with trionbd_process("memory", "1M") as server:
        async with await nbd.connect_unix(server.socket) as c:
            with pytest.raises(nbd.RequestError) as e:
                await c.block_status(4096, MiB)
            assert e.value.error == Err.EINVAL


# --- a server that only knows EXPORT_NAME ----------------------------------------------------


async def old_server(stream: trio.abc.Stream, data: bytearray, seen: list[object]) -> None:
    """Refuses every option but EXPORT_NAME (as pre-GO servers do) and serves reads and
    writes with simple replies."""
    proto = ServerConnection()
    await stream.send_all(proto.greeting())
    while True:
        event = proto.next_event()
        if event is NEED_DATA:
            proto.receive_data(await stream.receive_some(1 << 16))
            continue
        seen.append(event)
        if isinstance(event, ExportNameOption):
            flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
            await stream.send_all(proto.export_name_reply(event.name, len(data), flags))
        elif isinstance(event, Request):
            if event.command == Cmd.READ:
                chunk = bytes(data[event.offset : event.offset + event.length])
                await stream.send_all(wire.simple_reply(event.cookie, 0) + chunk)
            else:
                if event.command == Cmd.WRITE:
                    data[event.offset : event.offset + event.length] = event.data
                await stream.send_all(wire.simple_reply(event.cookie, 0))
        elif isinstance(event, Disconnect | ConnectionClosed):
            await stream.aclose()
            return
        else:
            assert isinstance(event, OptionEvent), event
            await stream.send_all(proto.reply_error(event.option, Rep.ERR_UNSUP, "old server"))


async def test_go_falls_back_to_export_name() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    data = bytearray(b"old!" * 1024)
    seen: list[object] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(old_server, server_end, data, seen)
        async with await nbd.connect(client_end, "legacy") as c:
            assert not c.structured
            assert (c.export_name, c.size) == ("legacy", 4096)
            assert c.can_flush and not c.can_trim
            await c.pwrite(b"new!", 4)
            await c.flush()
            assert await c.pread(12, 0) == b"old!new!old!"
    options = [e.option for e in seen if isinstance(e, OptionEvent)]
    assert Opt.GO in options and Opt.EXPORT_NAME in options
    assert isinstance(seen[-1], Disconnect)


# --- URIs and option reply payloads ----------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "address", "export"),
    [
        ("nbd://srv.test/disk", Address(host="srv.test", port=10809), "disk"),
        ("nbd://srv.test", Address(host="srv.test", port=10809), ""),
        ("nbd://srv.test:1234/hello%20world", Address(host="srv.test", port=1234), "hello world"),
        ("nbd://[::1]:99//x", Address(host="::1", port=99), "/x"),
        ("nbd+unix:///?socket=/tmp/s", Address(unix_path="/tmp/s"), ""),
        ("nbd+unix:///dir/f.img?socket=/tmp/s", Address(unix_path="/tmp/s"), "dir/f.img"),
    ],
)
def test_parse_uri(uri: str, address: Address, export: str) -> None:
    assert nbd.parse_uri(uri) == (address, export)


@pytest.mark.parametrize(
    ("uri", "complaint"),
    [
        ("nbds://srv.test/disk", "TLS"),
        ("nbd+unix:///disk", "socket=PATH"),
        ("nbd+unix://host/disk?socket=/s", "no host"),
        ("nbd:///disk", "needs a host"),
        ("http://srv.test/", "not an NBD URI"),
        ("nbd://srv.test:99999/", "bad port"),
    ],
)
def test_parse_uri_errors(uri: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        nbd.parse_uri(uri)


def test_parse_option_reply_payloads() -> None:
    info = parse_info_replies(
        "",
        [
            wire.info_export(4096, 0x0003),
            wire.info_text(Info.NAME, "real"),
            wire.info_text(Info.DESCRIPTION, "a disk"),
            wire.info_block_size(512, 4096, 1 << 25),
            b"\x00\x63unknown info type",
        ],
    )
    assert (info.name, info.size, info.flags) == ("real", 4096, 3)
    assert (info.description, info.block_size) == ("a disk", (512, 4096, 1 << 25))
    with pytest.raises(RemoteProtocolError, match="without NBD_INFO_EXPORT"):
        parse_info_replies("x", [wire.info_text(Info.NAME, "x")])
    with pytest.raises(RemoteProtocolError, match="12 expected"):
        parse_info_replies("x", [wire.info_export(1, 1)[:-1]])
    with pytest.raises(RemoteProtocolError, match="HAS_FLAGS"):
        parse_info_replies("x", [wire.info_export(1, 0)])

    assert parse_server_reply(b"\x00\x00\x00\x04diskMy disk") == ("disk", "My disk")
    with pytest.raises(RemoteProtocolError, match="names a 9-byte export"):
        parse_server_reply(b"\x00\x00\x00\x09disk")
    assert parse_meta_context_reply(b"\x00\x00\x00\x01base:allocation") == (1, "base:allocation")
    with pytest.raises(RemoteProtocolError):
        parse_meta_context_reply(b"\x00\x00\x00")


async def test_pipelining_reaches_the_server() -> None:
    """The server sees many requests of one connection in flight at the same time."""

    class Barrier(Plugin):
        name = "barrier"

        def __init__(self, parties: int):
            self.parties = parties
            self.inside = 0
            self.most = 0
            self.full = trio.Event()

        async def get_size(self, h: Any) -> int:
            return MiB

        async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
            self.inside += 1
            self.most = max(self.most, self.inside)
            if self.inside >= self.parties:
                self.full.set()
            await self.full.wait()
            self.inside -= 1
            return bytes(count)

    config = ServerConfig()
    plugin = Barrier(config.max_in_flight)
    async with serving(Chain(plugin), config) as server:
        path = server.addresses[0].unix_path
        assert path is not None
        async with await nbd.connect_unix(path) as c:
            with trio.fail_after(HANG_GUARD):
                async with trio.open_nursery() as nursery:
                    for i in range(200):
                        nursery.start_soon(c.pread, 512, i * 512)
    assert plugin.most == config.max_in_flight


async def test_a_closed_transport_never_touches_its_old_descriptor() -> None:
    """The client's reader and writer may run after another task closed the connection;
    the descriptor number may already belong to a new socket by then."""
    ours, peer = trio.socket.socketpair()
    transport = Transport(trio.SocketStream(ours))
    await transport.aclose()
    reused, other = trio.socket.socketpair()  # likely gets the freed descriptor number
    with reused, other, peer:
        with pytest.raises(trio.ClosedResourceError):
            await transport.send([b"NBD_CMD_DISC for someone else"])
        with pytest.raises(trio.ClosedResourceError):
            await transport.receive()
        with trio.move_on_after(0.2) as nothing:
            await other.recv(100)  # nothing arrived on the new socket
        assert nothing.cancelled_caught
