"""ExportTable: exports added, replaced and removed while clients are connected, seen
through the project's client and nbdinfo; each backend's lifecycle."""

from __future__ import annotations

import errno
import json
import logging
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import trionbd
from tests.embedding.disks import Disk
from tests.server.nbdclient import connect
from tests.support import HANG_GUARD, short_tmpdir
from trionbd.filters.dirty_bitmap import DirtyBitmapFilter
from trionbd.filters.offset import OffsetFilter
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol import Opt, wire
from trionbd.protocol.constants import Rep

KiB = 1024
MiB = 1024 * KiB


@asynccontextmanager
async def serving(
    target: trionbd.Plugin | trionbd.Chain, **config: Any
) -> AsyncIterator[tuple[trionbd.Server, str, trio.Nursery]]:
    """Serve ``target`` on a Unix socket; yields the server, the socket path and a
    nursery for the test's own tasks."""
    with short_tmpdir() as tmp, trio.fail_after(HANG_GUARD):
        sock = str(tmp / "sock")
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trionbd.serve, target, f"unix:{sock}", trionbd.ServerConfig(**config)
            )
            yield server, sock, nursery
            nursery.cancel_scope.cancel()


def in_background(
    tasks: trio.Nursery, fn: Callable[..., Awaitable[object]], *args: object
) -> trio.Event:
    """Start ``fn(*args)`` in ``tasks``; the event is set once it has returned."""
    returned = trio.Event()

    async def call() -> None:
        await fn(*args)
        returned.set()

    tasks.start_soon(call)
    return returned


async def list_exports(sock: str) -> list[str]:
    async with await trionbd.handshake(await trionbd.open_stream(trionbd.Address(sock))) as h:
        return [e.name for e in await h.list_exports()]


async def nbdinfo_list(sock: str) -> dict[str, Any]:
    result = await trio.run_process(
        ["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}"], capture_stdout=True
    )
    return {e["export-name"]: e for e in json.loads(result.stdout)["exports"]}


async def test_exports_come_and_go_for_new_clients_of_both_clients() -> None:
    a, b = Disk(1), Disk(2, size=2 * MiB)
    table = trionbd.ExportTable({"a": a})
    async with serving(table) as (_server, sock, _):
        assert await list_exports(sock) == ["a"]
        await table.add("b", b, description="the second disk")
        assert table.names() == ["a", "b"]
        assert await list_exports(sock) == ["a", "b"]
        listed = await nbdinfo_list(sock)
        assert sorted(listed) == ["a", "b"]
        assert listed["b"]["export-size"] == 2 * MiB
        assert listed["b"]["description"] == "the second disk"
        async with await trionbd.connect_unix(sock, "b") as client:
            assert await client.pread(4096, 8192) == b.data[8192 : 8192 + 4096]
        await table.remove("a")
        assert await list_exports(sock) == ["b"]
        assert sorted(await nbdinfo_list(sock)) == ["b"]
        with pytest.raises(trionbd.OptionError) as caught:
            await trionbd.connect_unix(sock, "a")
        assert caught.value.reply == Rep.ERR_UNKNOWN and caught.value.errno == errno.ENOENT
        gone = await trio.run_process(
            ["nbdinfo", f"nbd+unix:///a?socket={sock}"], capture_stderr=True, check=False
        )
        assert gone.returncode != 0 and b"a" in gone.stderr
        with pytest.raises(KeyError, match="no export named 'a'"):
            await table.remove("a")
    assert a.events == ["get_ready", "after_fork", "cleanup", "unload"]
    assert b.events == ["get_ready", "after_fork", "cleanup", "unload"]
    assert (a.opens, b.opens) == (a.closes, b.closes)


async def test_removing_an_export_lets_in_flight_requests_finish_then_refuses_new_ones() -> None:
    disk = Disk(3, gated=64 * KiB)
    other = Disk(4)
    table = trionbd.ExportTable({"disk": disk, "other": other})
    async with serving(table) as (server, sock, tasks):
        client = await trionbd.connect_unix(sock, "disk")
        await tasks.start(client.run)
        bystander = await trionbd.connect_unix(sock, "other")
        await tasks.start(bystander.run)
        await client.pwrite(b"before", 0)
        got: list[bytes] = []

        async def read_gated() -> None:
            got.append(await client.pread(4096, 64 * KiB))

        tasks.start_soon(read_gated)
        await disk.reading.wait()
        removed = in_background(tasks, table.remove, "disk")
        await trio.testing.wait_all_tasks_blocked()
        assert "disk" not in await list_exports(sock)
        # A request sent after the removal is refused while the one in flight still runs.
        with pytest.raises(trionbd.RequestError) as caught:
            await client.pread(512, 0)
        assert caught.value.errno == errno.ESHUTDOWN
        assert "'disk' is gone" in caught.value.message
        with pytest.raises(trionbd.RequestError):
            await client.pwrite(b"after", 0)
        assert not got and not removed.is_set()
        disk.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert got == [bytes(disk.data[64 * KiB : 68 * KiB])]
        assert not removed.is_set()  # the client has not disconnected yet
        await client.aclose()  # NBD_CMD_DISC: a clean end
        await removed.wait()
        assert disk.data[:6] == b"before"  # the refused write did not reach the disk
        assert "flush" in disk.events  # a writable context is flushed before closing
        assert disk.events[-2:] == ["cleanup", "unload"]
        assert disk.opens == disk.closes
        # The other export's client never noticed.
        assert await bystander.pread(4, 0) == bytes(other.data[:4])
        assert server.stats()["disk"] == trionbd.ExportStats(4, 4096, 6, 2, 0)
        await bystander.aclose()


async def test_a_client_that_stays_is_closed_after_the_grace_period() -> None:
    disk = Disk(5)
    table = trionbd.ExportTable()
    async with serving(table) as (_server, sock, tasks):
        await table.add("disk", disk, grace=0.2)
        client = await trionbd.connect_unix(sock, "disk")
        await tasks.start(client.run)
        await table.remove("disk")  # returns once the client is gone
        with pytest.raises(trionbd.ConnectionFailed):
            await client.pread(512, 0)
        await client.aclose()
    assert disk.opens == disk.closes == 1


async def test_a_request_outlasting_the_grace_period_is_cancelled() -> None:
    disk = Disk(6, gated=0)
    table = trionbd.ExportTable()
    async with serving(table) as (_server, sock, tasks):
        await table.add("disk", disk, grace=0.2)
        client = await trionbd.connect_unix(sock, "disk")
        await tasks.start(client.run)
        failed: list[BaseException] = []

        async def read_gated() -> None:
            try:
                await client.pread(512, 0)
            except trionbd.ConnectionFailed as e:
                failed.append(e)

        tasks.start_soon(read_gated)
        await disk.reading.wait()
        await table.remove("disk")  # the gate never opens
        await trio.testing.wait_all_tasks_blocked()
        assert len(failed) == 1
        await client.aclose()
    assert disk.opens == disk.closes == 1
    assert disk.events[-2:] == ["cleanup", "unload"]


async def test_replacing_an_export_moves_new_clients_and_retires_old_ones() -> None:
    old, new = Disk(7), Disk(8)
    table = trionbd.ExportTable({"disk": old})
    async with serving(table) as (_server, sock, tasks):
        veteran = await trionbd.connect_unix(sock, "disk")
        await tasks.start(veteran.run)
        replaced = in_background(tasks, table.add, "disk", new)
        await trio.testing.wait_all_tasks_blocked()
        assert new.events == ["get_ready", "after_fork"]
        # A client arriving now gets the new backend and is not retired with the old one.
        async with await trionbd.connect_unix(sock, "disk") as newcomer:
            assert await newcomer.pread(64, 0) == bytes(new.data[:64])
            with pytest.raises(trionbd.RequestError) as caught:
                await veteran.pread(64, 0)
            assert caught.value.errno == errno.ESHUTDOWN
            await veteran.aclose()
            await replaced.wait()
            assert await newcomer.pread(64, 64) == bytes(new.data[64:128])
        assert table.names() == ["disk"]
    assert old.events == ["get_ready", "after_fork", "flush", "cleanup", "unload"]
    assert new.events == ["get_ready", "after_fork", "cleanup", "unload"]


async def test_a_backend_that_fails_to_start_leaves_the_table_as_it_was() -> None:
    good, bad = Disk(9), Disk(10)
    bad.fail_after_fork = True
    table = trionbd.ExportTable({"disk": good})
    async with serving(table) as (_server, sock, _):
        with pytest.raises(trionbd.StartupError, match=r"export 'disk': disk: .*refused"):
            await table.add("disk", bad)
        async with await trionbd.connect_unix(sock, "disk") as client:
            assert await client.pread(16, 0) == bytes(good.data[:16])
        assert bad.events == ["get_ready", "cleanup", "unload"]
        with pytest.raises(ValueError, match="no NUL"):
            await table.add("a\0b", Disk(11))
    assert good.events == ["get_ready", "after_fork", "cleanup", "unload"]


async def test_an_open_racing_with_the_removal_fails_with_err_shutdown() -> None:
    disk = Disk(12)
    disk.open_gate = trio.Event()
    table = trionbd.ExportTable({"disk": disk})
    async with serving(table) as (_server, sock, tasks):
        outcome: list[BaseException] = []

        async def connect() -> None:
            try:
                await trionbd.connect_unix(sock, "disk")
            except trionbd.OptionError as e:
                outcome.append(e)

        tasks.start_soon(connect)
        await disk.opening.wait()
        removed = in_background(tasks, table.remove, "disk")
        await trio.testing.wait_all_tasks_blocked()
        # The backend stays alive while its open runs.
        assert not removed.is_set() and "cleanup" not in disk.events
        disk.open_gate.set()
        await removed.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert len(outcome) == 1
        assert isinstance(outcome[0], trionbd.OptionError)
        assert outcome[0].reply == Rep.ERR_SHUTDOWN
    assert disk.opens == disk.closes == 1
    assert disk.events == ["get_ready", "after_fork", "cleanup", "unload"]


async def test_the_export_named_empty_is_the_default_export() -> None:
    table = trionbd.ExportTable({"named": Disk(13)})
    async with serving(table) as (_server, sock, _):
        with pytest.raises(trionbd.OptionError) as caught:
            await trionbd.connect_unix(sock)
        assert caught.value.reply == Rep.ERR_UNKNOWN
        default = Disk(14, size=3 * MiB)
        await table.add("", default)
        async with await trionbd.connect_unix(sock) as client:
            assert client.size == 3 * MiB
            assert client.export_name == ""


async def test_filters_above_and_below_the_table() -> None:
    """Filters stacked on a backend work; a filter above the table does not stop the
    removal from finding its connections."""
    disk = Disk(15)
    backend = trionbd.Chain(disk, [OffsetFilter(offset=4096)])
    table = trionbd.ExportTable({"disk": backend})
    chain = trionbd.Chain(table, [OffsetFilter(offset=512)])
    async with serving(chain) as (_server, sock, tasks):
        client = await trionbd.connect_unix(sock, "disk")
        await tasks.start(client.run)
        assert client.size == MiB - 4096 - 512
        assert await client.pread(100, 0) == bytes(disk.data[4608:4708])
        done = in_background(tasks, table.remove, "disk")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trionbd.RequestError) as caught:
            await client.pread(100, 0)
        assert caught.value.errno == errno.ESHUTDOWN
        await client.aclose()
        await done.wait()
    assert disk.opens == disk.closes == 1


async def test_memory_backends_with_real_clients_byte_for_byte() -> None:
    """nbdcopy writes into one export and reads it back; a second export is untouched."""
    table = trionbd.ExportTable(
        {"one": MemoryPlugin(size=8 * MiB), "two": MemoryPlugin(size=8 * MiB)}
    )
    async with serving(table) as (_server, sock, _):
        with short_tmpdir() as tmp:
            source = tmp / "source"
            data = random.Random(16).randbytes(8 * MiB)
            source.write_bytes(data)
            one = f"nbd+unix:///one?socket={sock}"
            two = f"nbd+unix:///two?socket={sock}"
            await trio.run_process(["nbdcopy", str(source), one])
            await trio.run_process(["nbdcopy", one, str(tmp / "back")])
            await trio.run_process(["nbdcopy", two, str(tmp / "two")])
            assert (tmp / "back").read_bytes() == data
            assert (tmp / "two").read_bytes() == bytes(8 * MiB)


async def test_report_reaches_every_backend_whatever_another_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGUSR1's report: a backend whose report fails is logged and stops no other; a
    plain ``def`` report runs in a worker thread."""

    class Fails(Disk):
        async def report(self) -> None:
            raise OSError(errno.EIO, "cannot write the report")

    threads: list[int] = []

    class Threaded(Disk):
        def report(self) -> None:  # type: ignore[override]
            threads.append(threading.get_ident())

    table = trionbd.ExportTable({"failing": Fails(18), "threaded": Threaded(19)})
    with caplog.at_level(logging.ERROR):
        await table.report()
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    assert "disk: report failed: [Errno 5] cannot write the report" in caplog.text


async def test_a_table_outside_a_server_adds_and_removes_without_starting_anything() -> None:
    disk = Disk(17)
    table = trionbd.ExportTable()
    await table.add("x", disk)
    assert table.names() == ["x"]
    await table.remove("x")
    assert table.names() == [] and disk.events == []


async def test_meta_contexts_come_from_each_exports_chain() -> None:
    """An export whose chain has the dirty-bitmap filter offers its bitmap; another
    offers base:allocation only; an unknown name is refused."""
    table = trionbd.ExportTable(
        {
            "tracked": trionbd.Chain(MemoryPlugin(1 << 20), [DirtyBitmapFilter()]),
            "plain": MemoryPlugin(1 << 20),
        }
    )
    async with serving(table) as (server, _, _):
        c = await connect(server)
        await c.handshake()
        for name, contexts in [
            ("tracked", [b"base:allocation", b"qemu:dirty-bitmap:default"]),
            ("plain", [b"base:allocation"]),
        ]:
            got = await c.option(Opt.LIST_META_CONTEXT, wire.name_and_queries(name, []))
            assert [r.payload[4:] for r in got[:-1]] == contexts
            assert got[-1].reply == Rep.ACK
        [err] = await c.option(Opt.LIST_META_CONTEXT, wire.name_and_queries("nope", []))
        assert err.reply == Rep.ERR_UNKNOWN and b"no export named 'nope'" in err.payload
