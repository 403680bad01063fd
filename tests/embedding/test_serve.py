"""Embedding the server in a Trio application: ``await nursery.start(trionbd.serve, ...)``,
address strings, the project's client and nbdinfo against it, statistics, and what
leaving the caller's cancel scope does (a graceful shutdown that leaves no task or
context behind)."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import trionbd
from tests.embedding.disks import Disk
from tests.support import HANG_GUARD, all_tasks, short_tmpdir
from trionbd.plugins.memory import MemoryPlugin

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def sock() -> Any:
    with short_tmpdir() as tmp:
        yield str(tmp / "sock")


def exists(path: str) -> bool:
    return os.path.exists(path)


async def start_fails(target: trionbd.Plugin, spec: str) -> BaseException:
    """The error that ``nursery.start(serve, target, spec)`` fails with."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trionbd.serve, target, spec)
    except BaseExceptionGroup as group:
        assert len(group.exceptions) == 1, group
        return group.exceptions[0]
    raise AssertionError(f"serving on {spec!r} did not fail")


GATED = 1 * MiB


def gated() -> Disk:
    """A 2 MiB disk whose reads at ``GATED`` wait for its gate."""
    return Disk(7, size=2 * MiB, gated=GATED)


# --- serving and connecting ----------------------------------------------------------------


async def test_serve_in_a_nursery_with_the_projects_client_and_nbdinfo(sock: str) -> None:
    plugin = MemoryPlugin(size=4 * MiB)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trionbd.serve, plugin, f"unix:{sock}")
            assert isinstance(server, trionbd.Server)
            # started() came after listening: connecting needs no retry.
            assert server.uris == [f"nbd+unix:///?socket={sock}"]
            payload = random.Random(1).randbytes(64 * KiB)
            async with await trionbd.connect_uri(server.uris[0]) as client:
                assert client.size == 4 * MiB
                await client.pwrite(payload, 3 * MiB)
                assert await client.pread(len(payload), 3 * MiB) == payload
            result = await trio.run_process(
                ["nbdinfo", "--json", server.uris[0]], capture_stdout=True, capture_stderr=True
            )
            info = json.loads(result.stdout)
            assert info["exports"][0]["export-size"] == 4 * MiB
            assert info["exports"][0]["is_read_only"] is False
            # nbdcopy reads back what the project's client wrote, byte for byte.
            with short_tmpdir() as tmp:
                out = tmp / "copy"
                await trio.run_process(["nbdcopy", server.uris[0], str(out)])
                copied = out.read_bytes()
            assert copied[3 * MiB : 3 * MiB + len(payload)] == payload
            assert copied[: 3 * MiB] == bytes(3 * MiB)
            nursery.cancel_scope.cancel()
    assert not exists(sock)  # serve removes the socket file it made


async def test_address_strings_tcp_and_several_listeners(sock: str) -> None:
    plugin = MemoryPlugin(size=1 * MiB)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trionbd.serve, plugin, ["tcp:127.0.0.1:0", f"unix:{sock}"])
            tcp, unix = server.addresses
            assert tcp.host == "127.0.0.1" and tcp.port != 0 and unix.unix_path == sock
            async with await trionbd.connect_tcp("127.0.0.1", tcp.port) as a:
                await a.pwrite(b"via tcp", 0)
            async with await trionbd.connect_unix(sock) as b:
                assert await b.pread(7, 0) == b"via tcp"
            nursery.cancel_scope.cancel()


async def test_a_trio_listener_object_is_used_as_is_and_left_to_the_caller(sock: str) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trionbd.serve, MemoryPlugin(size=MiB), listeners)
            assert server.addresses[0].port == port
            async with await trionbd.connect_tcp("127.0.0.1", port) as client:
                assert client.size == MiB
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "spec", ["sock", "unix:", "tcp:", "tcp:host:", "tcp:host:port", "tcp:1:2:3", "tcp:99999"]
)
async def test_a_malformed_address_string_is_refused_with_the_forms_it_takes(spec: str) -> None:
    error = await start_fails(MemoryPlugin(size=MiB), spec)
    assert isinstance(error, ValueError)
    assert str(error) == (
        f"{spec!r} is not a listening address (unix:PATH, tcp:HOST:PORT or tcp:PORT)"
    )


async def test_stats_per_export_from_the_servers_connections(sock: str) -> None:
    table = trionbd.ExportTable({"a": MemoryPlugin(size=MiB), "b": MemoryPlugin(size=MiB)})
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trionbd.serve, table, f"unix:{sock}")
            assert server.stats() == {}
            async with await trionbd.connect_unix(sock, "a") as a:
                await a.pwrite(b"x" * 1000, 0)
                await a.pread(512, 0)
                await a.pread(100, 10)
                with pytest.raises(trionbd.RequestError):
                    await a.pread(512, MiB)  # beyond the end
                stats = server.stats()
                assert stats == {"a": trionbd.ExportStats(4, 612, 1000, 1, 1)}
                async with await trionbd.connect_unix(sock, "b") as b:
                    await b.pwrite(b"y" * 4096, 0)
                    async with await trionbd.connect_unix(sock, "a") as a2:
                        await a2.pread(1, 0)
                        assert server.stats()["a"].connections == 2
            # Counters outlive the connections; nobody is connected any more.
            assert server.stats() == {
                "a": trionbd.ExportStats(5, 613, 1000, 1, 0),
                "b": trionbd.ExportStats(1, 0, 4096, 0, 0),
            }
            nursery.cancel_scope.cancel()


# --- lifecycle and shutdown ----------------------------------------------------------------


async def test_serve_runs_get_ready_and_unload_unless_the_caller_did(sock: str) -> None:
    plugin = gated()
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(trionbd.serve, plugin, f"unix:{sock}")
            assert plugin.events == ["get_ready", "after_fork"]
            nursery.cancel_scope.cancel()
    assert plugin.events == ["get_ready", "after_fork", "cleanup", "unload"]

    # A caller that made the chain ready itself unloads it too (the command line does).
    plugin.events.clear()
    chain = trionbd.Chain(plugin)
    chain.get_ready()
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(trionbd.serve, chain, f"unix:{sock}")
            nursery.cancel_scope.cancel()
    assert plugin.events == ["get_ready", "after_fork", "cleanup"]
    chain.unload()
    assert plugin.events[-1] == "unload"


async def test_a_failing_get_ready_stops_start_up_with_its_error(sock: str) -> None:
    class Picky(Disk):
        def get_ready(self) -> None:
            raise trionbd.ConfigError("picky: no")

    error = await start_fails(Picky(7), f"unix:{sock}")
    assert isinstance(error, trionbd.ConfigError) and str(error) == "picky: no"
    assert not exists(sock)


async def serve_in(
    scope: trio.CancelScope,
    target: trionbd.Plugin,
    spec: str,
    config: trionbd.ServerConfig,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[trionbd.Server],
) -> None:
    """The application's side: ``serve`` inside a cancel scope the test controls."""
    try:
        with scope:
            await trionbd.serve(target, spec, config, task_status=task_status)
    finally:
        done.set()


async def test_leaving_the_cancel_scope_mid_transfer_shuts_down_gracefully(sock: str) -> None:
    """In-flight requests get their replies, new ones are not served, and once ``serve``
    has returned no task and no context of the server is left."""
    plugin = gated()
    scope = trio.CancelScope()
    done = trio.Event()
    config = trionbd.ServerConfig(shutdown_timeout=30)
    before = all_tasks()
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as app:
            server = await app.start(serve_in, scope, plugin, f"unix:{sock}", config, done)
            client = await trionbd.connect_unix(sock)
            await app.start(client.run)
            idle = await trionbd.connect_unix(sock)
            await app.start(idle.run)
            await client.pwrite(b"w" * 4096, 0)  # a transfer in progress...
            got: list[bytes] = []
            failed: list[BaseException] = []

            async def read_gated() -> None:
                got.append(await client.pread(4096, GATED))

            async def read_late() -> None:
                try:
                    await client.pread(4096, 0)
                except trionbd.ConnectionFailed as e:
                    failed.append(e)

            app.start_soon(read_gated)
            await plugin.reading.wait()  # ...with a request in flight
            assert plugin.background_running and plugin.opens == 2
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert server.shutting_down and not done.is_set()
            # The idle client is disconnected at once; the busy one keeps its connection
            # for the request in flight, but the server reads no new requests.
            assert idle.failure is not None and client.failure is None
            app.start_soon(read_late)
            await trio.testing.wait_all_tasks_blocked()
            assert not failed and not got
            plugin.gate.set()
            await done.wait()
            assert got == [bytes(plugin.data[GATED : GATED + 4096])]
            await trio.testing.wait_all_tasks_blocked()
            assert len(failed) == 1  # the late request: the connection closed, no answer
            await client.aclose()
            await idle.aclose()
    assert plugin.opens == plugin.closes == 2
    assert not plugin.background_running
    # Both connections had writable contexts: each was flushed before closing.
    assert plugin.events == ["get_ready", "after_fork", "flush", "flush", "cleanup", "unload"]
    assert not exists(sock)
    leftover = all_tasks() - before
    assert not leftover, [t.name for t in leftover]


async def test_a_request_still_running_when_the_grace_period_ends_is_cancelled(
    sock: str,
) -> None:
    plugin = gated()
    scope = trio.CancelScope()
    done = trio.Event()
    config = trionbd.ServerConfig(shutdown_timeout=0.2)
    before = all_tasks()
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as app:
            await app.start(serve_in, scope, plugin, f"unix:{sock}", config, done)
            async with await trionbd.connect_unix(sock) as client:
                outcome: list[BaseException] = []

                async def read_gated() -> None:
                    try:
                        await client.pread(4096, GATED)
                    except trionbd.ConnectionFailed as e:
                        outcome.append(e)

                app.start_soon(read_gated)
                await plugin.reading.wait()
                scope.cancel()  # the gate never opens
                await done.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert len(outcome) == 1
    assert plugin.opens == plugin.closes == 1
    assert not plugin.background_running
    leftover = all_tasks() - before
    assert not leftover, [t.name for t in leftover]


async def test_server_shutdown_ends_serve_without_outside_cancellation(sock: str) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trionbd.serve, MemoryPlugin(size=MiB), f"unix:{sock}")
            server.shutdown()
        # the nursery exits: serve returned on its own
    assert not exists(sock)


async def test_os_errors_of_binding_reach_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "sock"
    error = await start_fails(MemoryPlugin(size=MiB), f"unix:{path}")
    assert isinstance(error, OSError) and error.errno == errno.ENOENT
