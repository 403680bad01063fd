"""Fault isolation: a bug in a plugin or filter (an exception that is not an
``NBDError``) costs only the request or option it happened in. The client gets EIO (or
ERR_UNKNOWN for an option), the error is logged once with the connection's id and its
traceback, the same connection goes on, and other clients never notice.

``KeyboardInterrupt`` and ``SystemExit`` are different: they are how Python stops a
program (in a library server, Ctrl-C raises ``KeyboardInterrupt`` inside whatever code
runs, plugin code included), so they are not turned into an error reply. They stop the
server; every open context is still closed on the way out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pytest
import trio

from tests.server.nbdclient import Client, connect
from tests.support import serving
from trionbd.chain import Chain, Export, Extent, Filter, Layer, Next
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol import Cmd, Err, ErrorChunk, Opt, Rep, wire

MiB = 1 << 20


class Bug(RuntimeError):
    pass


class Bomb(Filter):
    """Passes everything through, except that the callbacks named in ``armed`` raise a
    plain bug. ``nonblocking`` picks the server's inline path or its task path."""

    name = "bomb"

    def __init__(self, nonblocking: bool = True) -> None:
        self.nonblocking = nonblocking  # type: ignore[misc]
        self.armed: set[str] = set()
        self.opened = 0
        self.closed = 0

    def fire(self, callback: str) -> None:
        if callback in self.armed:
            raise Bug(f"bug in {callback}")

    async def list_exports(self, below: Layer, readonly: bool, is_tls: bool) -> Iterable[Export]:
        self.fire("list_exports")
        return await below.list_exports(readonly, is_tls)

    async def default_export(self, below: Layer, readonly: bool, is_tls: bool) -> str:
        self.fire("default_export")
        return await below.default_export(readonly, is_tls)

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        self.fire("open")
        self.opened += 1
        return await below.open(readonly, export_name, is_tls), None

    async def close(self, next: Next, h: Any) -> None:
        self.closed += 1
        self.fire("close")

    async def export_description(self, next: Next, h: Any) -> str | None:
        self.fire("export_description")
        return "a disk"

    async def get_size(self, next: Next, h: Any) -> int:
        self.fire("get_size")
        return await next.get_size()

    async def pread(self, next: Next, h: Any, count: int, offset: int, flags: int) -> bytes:
        self.fire("pread")
        return await next.pread(count, offset, flags)

    async def pwrite(self, next: Next, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.fire("pwrite")
        await next.pwrite(buf, offset, flags)

    async def flush(self, next: Next, h: Any, flags: int) -> None:
        self.fire("flush")
        await next.flush(flags)

    async def trim(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        self.fire("trim")
        await next.trim(count, offset, flags)

    async def zero(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        self.fire("zero")
        await next.zero(count, offset, flags)

    async def extents(
        self, next: Next, h: Any, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        self.fire("extents")
        return await next.extents(count, offset, flags)


def bug_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], Bug)]


REQUESTS = {
    "pread": (Cmd.READ, 0, 4096, b""),
    "pwrite": (Cmd.WRITE, 0, 5, b"hello"),
    "flush": (Cmd.FLUSH, 0, 0, b""),
    "trim": (Cmd.TRIM, 0, 4096, b""),
    "zero": (Cmd.WRITE_ZEROES, 0, 4096, b""),
    "extents": (Cmd.BLOCK_STATUS, 0, 4096, b""),
}


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "tasks"])
@pytest.mark.parametrize("callback", list(REQUESTS))
async def test_a_bug_in_a_request_fails_only_that_request(
    callback: str, inline: bool, caplog: pytest.LogCaptureFixture
) -> None:
    bomb = Bomb(inline)
    async with serving(Chain(MemoryPlugin(MiB), [bomb])) as server:
        assert server.inline is inline
        bystander = await connect(server)
        await bystander.go()
        await bystander.write(8192, b"bystander")
        victim = await connect(server)
        await victim.go(meta=True)
        command, offset, length, data = REQUESTS[callback]
        bomb.armed.add(callback)
        with caplog.at_level(logging.ERROR, "trionbd.server"):
            [error] = await victim.request(command, offset, length, data=data)
        bomb.armed.clear()
        assert isinstance(error, ErrorChunk), error
        assert (error.error, error.message) == (Err.EIO, "internal server error")
        [record] = bug_records(caplog)  # logged once, with the connection and traceback
        assert record.getMessage().startswith("conn 2: request ")
        # The same connection goes on, and the other never noticed.
        assert await victim.error(command, offset, length, data=data) == 0
        assert await bystander.read(8192, 9) == b"bystander"


@pytest.mark.parametrize(
    ("callback", "option", "name"),
    [
        ("open", Opt.GO, "disk"),
        ("open", Opt.INFO, "disk"),
        ("get_size", Opt.GO, "disk"),
        ("export_description", Opt.GO, "disk"),
        ("default_export", Opt.GO, ""),
        ("list_exports", Opt.LIST, ""),
    ],
)
async def test_a_bug_while_negotiating_fails_only_that_option(
    callback: str, option: Opt, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    bomb = Bomb()
    async with serving(Chain(MemoryPlugin(MiB), [bomb])) as server:
        bystander = await connect(server)
        await bystander.go()
        c = await connect(server)
        await c.handshake()
        payload = b"" if option == Opt.LIST else wire.name_and_infos(name, [])
        bomb.armed.add(callback)
        with caplog.at_level(logging.ERROR, "trionbd.server"):
            [refused] = await c.option(option, payload)
        bomb.armed.clear()
        assert refused.reply == Rep.ERR_UNKNOWN, refused
        assert refused.payload.endswith(b"internal server error")
        [record] = bug_records(caplog)
        assert record.getMessage().startswith("conn 2: ")
        assert bomb.opened == bomb.closed + 1  # only the bystander's context is open
        # The client may try again, and is served.
        replies = await c.option(option, payload)
        assert replies[-1].reply == Rep.ACK
        await bystander.write(0, b"unharmed")


async def test_a_bug_in_close_is_logged_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bomb = Bomb()
    async with serving(Chain(MemoryPlugin(MiB), [bomb])) as server:
        bystander = await connect(server)
        await bystander.go()
        c = await connect(server)
        await c.go()
        bomb.armed.add("close")
        with caplog.at_level(logging.ERROR, "trionbd.server"):
            await c.disconnect()
            assert await c.eof()
            await trio.testing.wait_all_tasks_blocked()
        bomb.armed.clear()
        [record] = bug_records(caplog)
        assert record.getMessage().startswith("conn 2: ")
        await bystander.write(0, b"unharmed")
        again = await connect(server)
        await again.go()
        assert await again.read(0, 8) == b"unharmed"


class Garbage(MemoryPlugin):
    """Answers reads with things that are not bytes."""

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        return None if offset == 0 else 42  # type: ignore[return-value]


async def test_a_plugin_returning_garbage_fails_only_that_request() -> None:
    async with serving(Garbage(MiB)) as server:
        c = await connect(server)
        await c.go()
        assert await c.error(Cmd.READ, 0, 16) == Err.EIO
        assert await c.error(Cmd.READ, 512, 16) == Err.EIO
        await c.write(0, b"still usable")


class Interrupting(MemoryPlugin):
    """Raises KeyboardInterrupt (as a Ctrl-C landing in plugin code would) or SystemExit."""

    def __init__(self, size: int, exception: type[BaseException]) -> None:
        super().__init__(size)
        self.exception = exception
        self.closed = 0

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        if offset == 4096:
            raise self.exception
        return await super().pread(h, count, offset, flags)

    async def close(self, h: Any) -> None:
        self.closed += 1


@pytest.mark.parametrize("exception", [KeyboardInterrupt, SystemExit])
async def test_keyboard_interrupt_and_system_exit_stop_the_server_and_close_contexts(
    exception: type[BaseException],
) -> None:
    plugin = Interrupting(MiB, exception)
    clients: list[Client] = []
    with pytest.RaisesGroup(exception, flatten_subgroups=True):
        async with serving(plugin) as server:
            for _ in range(3):
                clients.append(await connect(server))
                await clients[-1].go()
            await clients[0].send(Cmd.READ, 4096, 16)
            await trio.sleep_forever()  # the server stops: serving() raises
    assert plugin.closed == 3
    for c in clients[1:]:
        assert await c.eof()
