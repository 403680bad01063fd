"""Timeouts and limits, in process (``autojump_clock`` stands in for waiting):

- the handshake timeout applies per option: a client that keeps completing options may
  negotiate as long as it likes, one that stalls or trickles bytes is closed;
- the idle timeout closes a silent connection only when nothing is in flight;
- clients over ``max_connections`` are greeted and refused with ERR_POLICY, and the
  refusals themselves are bounded;
- a connection's requests in flight hold at most ``max_buffered`` bytes of payload: the
  reader stops (backpressure) instead of buffering;
- inline replies that cannot drain stop the reader too, whatever their frames look like.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio
import trio.testing

from tests.chain.shape_filters import ManyNames
from tests.server.nbdclient import Client, connect
from tests.support import serving
from trionbd.chain import Chain, ConfigError, Export, Plugin
from trionbd.cli import Options, parse_args
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol import Cmd, DataChunk, Info, Opt, Rep, wire
from trionbd.server import Server, ServerConfig, serve

MiB = 1 << 20


async def closed(c: Client) -> bool:
    """Read (and drop) whatever the server sends until it closes ``c``."""
    try:
        while await c.stream.receive_some(1 << 16):
            pass
    except trio.BrokenResourceError:
        pass  # a reset: the server closed while we were still sending
    return True


async def eof_at(c: Client) -> float:
    """Wait until the server closes ``c``; the time then."""
    assert await closed(c)
    return trio.current_time()


# --- the command line --------------------------------------------------------------------


def config_of(*args: str) -> ServerConfig:
    opts = parse_args([*args, "memory", "1M"])
    assert isinstance(opts, Options)
    return opts.config


def test_command_line_limits() -> None:
    default = config_of()
    assert (default.handshake_timeout, default.idle_timeout, default.max_connections) == (
        10.0, None, None,
    )  # fmt: skip
    assert default.max_buffered == 256 * MiB
    config = config_of("--handshake-timeout=2.5", "--idle-timeout=60", "--max-connections=3")
    assert (config.handshake_timeout, config.idle_timeout, config.max_connections) == (
        2.5, 60.0, 3,
    )  # fmt: skip
    assert config_of("--handshake-timeout=0", "--idle-timeout=0").idle_timeout is None
    for bad, message in [
        ("--idle-timeout=-1", "--idle-timeout: '-1' is not a number of seconds"),
        ("--handshake-timeout=-5", "--handshake-timeout: '-5' is not a number of seconds"),
        ("--handshake-timeout=inf", "--handshake-timeout: 'inf' is not a number of seconds"),
        ("--max-connections=0", "--max-connections: '0' is less than 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_of(bad)


# --- the handshake timeout ---------------------------------------------------------------


async def test_a_client_completing_options_negotiates_past_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(MemoryPlugin(MiB), ServerConfig(handshake_timeout=10)) as server:
        c = await connect(server)
        await c.handshake()
        start = trio.current_time()
        for _ in range(6):  # 54 s in all, each option 9 s after the one before
            await trio.sleep(9)
            replies = await c.option(Opt.INFO, wire.name_and_infos("", []))
            assert replies[-1].reply == Rep.ACK
        assert trio.current_time() - start >= 54
        last = trio.current_time()
        assert 10 <= await eof_at(c) - last < 11  # then it stalls: closed 10 s later


async def test_a_client_trickling_an_option_is_closed_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(MemoryPlugin(MiB), ServerConfig(handshake_timeout=10)) as server:
        c = await connect(server)
        await c.handshake()
        start = trio.current_time()
        option = wire.option_request(Opt.GO, wire.name_and_infos("", []))

        async def trickle() -> None:
            for byte in option[:-1]:
                await trio.sleep(1)
                try:
                    await c.stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            assert 10 <= await eof_at(c) - start < 11


async def test_a_silent_client_is_closed_at_the_timeout_and_others_are_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(MemoryPlugin(MiB), ServerConfig(handshake_timeout=10)) as server:
        silent = [await connect(server) for _ in range(20)]
        start = trio.current_time()
        good = await connect(server)
        await good.go()
        await good.write(0, b"served")
        assert trio.current_time() - start < 1
        for c in silent:
            assert await closed(c)
        assert 10 <= trio.current_time() - start < 11


async def test_a_client_that_does_not_read_its_answers_is_closed_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A LIST of 100 000 names (about 3 MB) to a client that never reads: the server's
    send waits for it no longer than the handshake timeout, then closes."""
    names = 100_000
    chain = Chain(MemoryPlugin(MiB), [ManyNames(names)])
    async with serving(chain, ServerConfig(handshake_timeout=10)) as server:
        c = await connect(server)
        await c.handshake()
        await c.stream.send_all(wire.option_request(Opt.LIST, b""))
        await trio.sleep(30)  # the server stalls in its send meanwhile
        received = 0
        while data := await c.stream.receive_some(1 << 16):
            received += len(data)
        assert trio.current_time() < 31  # closed already: only what it had sent is left
        reply = len(wire.option_reply(Opt.LIST, Rep.SERVER, bytes(4 + len("name-000000"))))
        assert 0 < received < names * reply


class SlowBackend(MemoryPlugin):
    """Lists, resolves, opens and describes its exports 15 s late: longer than the
    handshake timeout of the tests above."""

    async def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        await trio.sleep(15)
        return [Export("disk")]

    async def default_export(self, readonly: bool, is_tls: bool) -> str:
        await trio.sleep(15)
        return "disk"

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        await trio.sleep(15)
        return await super().open(readonly, export_name, is_tls)

    async def export_description(self, h: Any) -> str | None:
        await trio.sleep(15)
        return "slow"


async def test_time_the_backend_takes_is_not_the_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The handshake timeout is the client's: a backend that takes longer than it to
    answer an option neither cuts the client off nor is cancelled itself."""
    async with serving(SlowBackend(MiB), ServerConfig(handshake_timeout=10)) as server:
        c = await connect(server)
        await c.handshake()
        replies = await c.option(Opt.LIST)
        assert [r.reply for r in replies] == [Rep.SERVER, Rep.ACK]
        replies = await c.option(Opt.INFO, wire.name_and_infos("", [Info.DESCRIPTION]))
        assert replies[-1].reply == Rep.ACK and replies[1].payload == b"\0\x02slow"
        await trio.sleep(9)  # the client's own time still runs from the answer
        await c.option(Opt.GO, wire.name_and_infos("disk", []))
        await c.write(0, b"served")
        assert await c.read(0, 6) == b"served"


async def test_no_handshake_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(MemoryPlugin(MiB), ServerConfig(handshake_timeout=None)) as server:
        c = await connect(server)
        await c.handshake()
        await trio.sleep(86400)
        await c.option(Opt.GO, wire.name_and_infos("", []))
        assert await c.read(0, 1) == b"\0"


# --- the idle timeout --------------------------------------------------------------------


class Gate(Plugin):
    """Reads wait until the test opens the gate (a request the test holds in flight)."""

    name = "gate"

    def __init__(self, size: int = MiB) -> None:
        self.size = size
        self.gate = trio.Event()
        self.started = 0
        self.writes = 0

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> str:
        return export_name

    async def get_size(self, h: Any) -> int:
        return self.size

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        self.started += 1
        await self.gate.wait()
        return bytes(count)

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.writes += 1
        await self.gate.wait()


async def test_idle_timeout_closes_a_silent_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(MemoryPlugin(MiB), ServerConfig(idle_timeout=30)) as server:
        c = await connect(server)
        await c.go()
        for _ in range(5):  # activity keeps it open
            await trio.sleep(20)
            await c.write(0, b"busy")
        last = trio.current_time()
        assert 30 <= await eof_at(c) - last < 31


async def test_idle_timeout_waits_for_requests_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plugin = Gate()
    async with serving(plugin, ServerConfig(idle_timeout=30)) as server:
        c = await connect(server)
        await c.go()
        cookie = await c.send(Cmd.READ, 0, 8)

        async def open_gate_later() -> None:
            await trio.sleep(100)
            plugin.gate.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_gate_later)
            assert await c.reply() == [DataChunk(cookie, 0, bytes(8), True)]
        answered = trio.current_time()
        assert answered >= 100  # the client was kept while its request was in flight
        assert 30 <= await eof_at(c) - answered < 31


async def test_no_idle_timeout_by_default(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(MemoryPlugin(MiB)) as server:
        c = await connect(server)
        await c.go()
        await trio.sleep(86400)
        await c.write(0, b"still here")


# --- the connection limit ----------------------------------------------------------------


async def test_clients_over_the_limit_are_greeted_and_refused() -> None:
    async with serving(MemoryPlugin(MiB), ServerConfig(max_connections=2)) as server:
        served = [await connect(server) for _ in range(2)]
        for c in served:
            await c.go()
        over = await connect(server)
        await over.handshake()
        for option, payload in [
            (Opt.GO, wire.name_and_infos("", [])),
            (Opt.INFO, wire.name_and_infos("", [])),
            (Opt.LIST, b""),
            (Opt.STRUCTURED_REPLY, b""),
            (99, b"unknown"),
        ]:
            [reply] = await over.option(option, payload)
            assert reply.reply == Rep.ERR_POLICY, (option, reply)
            assert reply.payload == b"too many clients: the limit is 2 (--max-connections)"
        [ack] = await over.option(Opt.ABORT)
        assert ack.reply == Rep.ACK
        assert await over.eof()
        # EXPORT_NAME cannot carry an error: the refused client is closed.
        over = await connect(server)
        await over.handshake()
        await over.stream.send_all(over.proto.option(Opt.EXPORT_NAME, b""))
        assert await over.eof()
        # A place frees up: the next client is served.
        await served[0].disconnect()
        assert await served[0].eof()
        await trio.testing.wait_all_tasks_blocked()
        again = await connect(server)
        await again.go()
        await again.write(0, b"my turn")
        await served[1].write(512, b"unharmed")


async def test_refusals_are_bounded_beyond_that_clients_are_closed_at_once() -> None:
    async with serving(MemoryPlugin(MiB), ServerConfig(max_connections=1)) as server:
        served = await connect(server)
        await served.go()
        refused = await connect(server)
        await refused.handshake()  # greeted: a refusal under way
        await trio.testing.wait_all_tasks_blocked()
        dropped = await connect(server)
        assert await dropped.stream.receive_some(100) == b""  # no greeting, closed
        [reply] = await refused.option(Opt.GO, wire.name_and_infos("", []))
        assert reply.reply == Rep.ERR_POLICY
        await served.write(0, b"still served")


# --- the payload budget of requests in flight --------------------------------------------


async def test_reads_in_flight_hold_at_most_the_budget() -> None:
    plugin = Gate(64 * MiB)
    config = ServerConfig(max_buffered=4 * MiB)
    async with serving(plugin, config) as server:
        c = await connect(server)
        await c.go(structured=False)
        cookies = [await c.send(Cmd.READ, i * MiB, MiB) for i in range(20)]
        await trio.testing.wait_all_tasks_blocked()
        # 4 MiB may be held; the request that crossed the line is served too.
        assert plugin.started == 5
        plugin.gate.set()
        answered = set()
        for _ in cookies:
            [reply] = await c.reply()
            assert reply.error == 0 and len(reply.data) == MiB  # type: ignore[union-attr]
            answered.add(reply.cookie)  # type: ignore[union-attr]
        assert answered == set(cookies)


async def test_writes_in_flight_hold_at_most_the_budget() -> None:
    plugin = Gate(64 * MiB)
    config = ServerConfig(max_buffered=4 * MiB)
    async with serving(plugin, config) as server:
        c = await connect(server)
        await c.go()
        block = b"w" * MiB

        async def send_writes() -> None:
            for i in range(20):
                await c.send(Cmd.WRITE, i * MiB, MiB, data=block)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_writes)
            await trio.testing.wait_all_tasks_blocked()
            assert plugin.writes == 5
            plugin.gate.set()
            for _ in range(20):
                [reply] = await c.reply()
                assert reply.error == 0  # type: ignore[union-attr]
        assert plugin.writes == 20


class CountedMemory(MemoryPlugin):
    reads = 0
    flushes = 0

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        self.reads += 1
        return await super().pread(h, count, offset, flags)

    async def flush(self, h: Any, flags: int) -> None:
        self.flushes += 1


class CountedTasks(CountedMemory):
    nonblocking = False  # every request is served by a task


async def test_replies_the_client_does_not_read_hold_their_budget() -> None:
    """A reply counts against the budget until it has been sent, not merely until its
    request's task has finished (task replies are queued and sent together)."""
    plugin = CountedTasks(64 * MiB)
    async with serving(plugin, ServerConfig(max_buffered=4 * MiB)) as server:
        assert not server.inline
        c = await connect(server)
        await c.go()
        await c.write(0, b"x" * MiB)
        plugin.reads = 0
        requests = b"".join(wire.request(i, Cmd.READ, 0, 0, MiB) for i in range(1, 401))
        await c.stream.send_all(requests)
        await trio.testing.wait_all_tasks_blocked()
        assert plugin.reads <= 6, plugin.reads  # 4 MiB, the one over, and the socket's
        for _ in range(400):
            [chunk] = await c.reply()
            assert chunk.data == b"x" * MiB  # type: ignore[union-attr]


async def test_small_replies_the_client_does_not_read_stop_the_reader() -> None:
    """Replies of a few bytes (FLUSH) hold no payload, but each keeps its in-flight
    slot until sent: once the socket is full the reader stops after max_in_flight."""
    plugin = CountedTasks(MiB)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, plugin, [], ServerConfig(max_in_flight=8))
        server_end, client_end = trio.socket.socketpair()
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        nursery.start_soon(server.handle_stream, trio.SocketStream(server_end))
        c = Client(trio.SocketStream(client_end))
        await c.go()
        flushes = b"".join(wire.request(i, Cmd.FLUSH, 0, 0, 0) for i in range(1, 20001))
        nursery.start_soon(c.stream.send_all, flushes)  # blocks once the server stops
        await trio.testing.wait_all_tasks_blocked()
        assert plugin.flushes < 2000, plugin.flushes  # not all 20 000 answered into memory
        for _ in range(20000):
            [reply] = await c.reply()
            assert reply.error == 0  # type: ignore[union-attr]
        assert plugin.flushes == 20000
        nursery.cancel_scope.cancel()


async def test_inline_replies_that_cannot_drain_stop_the_reader() -> None:
    """Sparse reads end in a 20-byte hole chunk after megabytes of data: the reader must
    still stop once its unsent replies pass BATCH_BYTES, not buffer every reply."""
    plugin = CountedMemory(64 * MiB)
    async with serving(plugin) as server:
        assert server.inline
        c = await connect(server)
        await c.go()
        await c.write(0, b"data")  # the first page holds data, the rest is a hole
        plugin.reads = 0
        requests = b"".join(wire.request(i, Cmd.READ, 0, 0, 8 * MiB) for i in range(1, 65))
        await c.stream.send_all(requests)  # 1.8 kB: the server has them all at once
        await trio.testing.wait_all_tasks_blocked()
        # Each reply is 32 KiB of data and a hole chunk on the wire, but holds 8 MiB in
        # memory until sent. The kernel takes some 200 kB of replies (about 7); then the
        # reader must wait, instead of reading all 64 and holding 512 MiB.
        assert plugin.reads < 16, plugin.reads
        for _ in range(64):
            events = await c.reply()
            assert events[-1].done  # type: ignore[union-attr]
        assert plugin.reads == 64
