"""--filter=shared: one context of the layer below per export, for every client."""

from __future__ import annotations

import errno
import subprocess
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

import trionbd.client as nbd
from tests.support import (
    HANG_GUARD,
    SYSTEM_PYTHON,
    Running,
    run,
    serving,
    trionbd_exit,
    trionbd_process,
    wait_until,
)
from trionbd.chain import Chain, Concurrency, NBDError, Plugin
from trionbd.filters.shared import SharedFilter
from trionbd.server import Server, ServerConfig

MiB = 1024 * 1024
CLIENTS = 20


# --- the real command: one upstream connection --------------------------------------------


def upstream_connections(up: Running) -> int:
    """Established connections on the upstream's Unix socket (its own ends, per ss)."""
    lines = run(["ss", "-xH"]).splitlines()
    return sum(1 for line in lines if f" {up.socket} " in line)


def transmissions(up: Running) -> int:
    """Connections that entered transmission on the upstream (from its -v log)."""
    return up.stderr.count("transmission on export")


IN_TURN = textwrap.dedent(
    """
    import nbd, sys
    uri, count = sys.argv[1], int(sys.argv[2])
    for i in range(count):
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"turn %02d" % i, i * 4096)
        assert h.pread(7, i * 4096) == b"turn %02d" % i
        h.shutdown()
        del h  # closes the socket
    print("done", flush=True)
    """
)

AT_ONCE = textwrap.dedent(
    """
    import nbd, sys
    uri, count = sys.argv[1], int(sys.argv[2])
    handles = []
    for i in range(count):
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"once %02d" % i, (64 + i) * 4096)
        handles.append(h)
    print("connected", flush=True)
    sys.stdin.readline()
    for h in handles:  # every client sees every other client's write
        for i in range(count):
            assert h.pread(7, (64 + i) * 4096) == b"once %02d" % i
        h.shutdown()
    print("done", flush=True)
    """
)


def clients_in_turn_then_at_once(px: Running, up: Running) -> tuple[int, int, int]:
    """Run the two client phases; return (upstream transmissions after the first phase,
    established upstream connections while all clients of the second are connected,
    upstream transmissions at the end)."""
    assert run([SYSTEM_PYTHON, "-c", IN_TURN, px.uri, str(CLIENTS)]).strip() == "done"
    after_turns = transmissions(up)
    together = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", AT_ONCE, px.uri, str(CLIENTS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert together.stdout is not None and together.stdin is not None
        assert together.stdout.readline().strip() == "connected"
        # Connections the proxy closed may take a moment to vanish from ss.
        deadline = time.monotonic() + 10
        while upstream_connections(up) > CLIENTS and time.monotonic() < deadline:
            time.sleep(0.05)
        connected = upstream_connections(up)
        together.stdin.write("go\n")
        together.stdin.flush()
        assert together.stdout.readline().strip() == "done"
        assert together.wait(60) == 0
    finally:
        if together.poll() is None:
            together.kill()
            together.wait()
    return after_turns, connected, transmissions(up)


def test_shared_keeps_exactly_one_upstream_connection() -> None:
    with trionbd_process("-v", "memory", "16M") as up:
        with trionbd_process("--filter=shared", "nbd", f"socket={up.socket}") as px:
            after_turns, connected, total = clients_in_turn_then_at_once(px, up)
            assert (after_turns, connected, total) == (1, 1, 1)
            assert upstream_connections(up) == 1  # kept while the proxy runs
        # The proxy closed it at exit.
        wait_until(lambda: upstream_connections(up) == 0, "the shared connection closes")
        assert "client disconnected (Disconnect)" in up.stderr


def test_the_default_exports_upstream_connection_opens_at_start_up() -> None:
    """Before any client comes, the proxy holds its one upstream connection (as nbdkit's
    ``nbd --shared``); a client's GO then sends nothing upstream."""
    with trionbd_process("-v", "memory", "16M") as up:
        with trionbd_process("--filter=shared", "nbd", f"socket={up.socket}") as px:
            wait_until(lambda: transmissions(up) == 1, "the proxy has gone into transmission")
            wait_until(lambda: upstream_connections(up) == 1, "one upstream connection is left")
            assert run(["nbdinfo", "--size", px.uri]).strip() == str(16 * MiB)
            assert (transmissions(up), upstream_connections(up)) == (1, 1)


def test_a_dead_upstream_stops_the_start_up() -> None:
    result = trionbd_exit("--filter=shared", "nbd", "socket=/nonexistent/upstream.sock")
    assert result.returncode == 1
    assert result.stderr == (
        "trionbd: shared: cannot open the default export of nbd: cannot connect to "
        "/nonexistent/upstream.sock: No such file or directory (EIO)\n"
    )


def test_other_exports_open_on_first_use(tmp_path: Path) -> None:
    for name in ("a.img", "b.img"):
        (tmp_path / name).write_bytes(name.encode() * 1024)
    with trionbd_process("-v", "file", f"dir={tmp_path}") as up:
        with trionbd_process("--filter=shared", "nbd", f"socket={up.socket}") as px:
            wait_until(lambda: transmissions(up) == 1, "the default export (a.img) is open")
            assert "transmission on export 'a.img'" in up.stderr
            for _ in range(2):
                assert run(["nbdinfo", "--size", px.uri_for("b.img")]).strip() == "5120"
            assert transmissions(up) == 2  # b.img opened by the first client asking for it
            assert "transmission on export 'b.img'" in up.stderr


def test_without_shared_every_client_has_its_own_upstream_connection() -> None:
    # The same measurement without the filter: it tells the difference.
    with trionbd_process("-v", "memory", "16M") as up:
        with trionbd_process("nbd", f"socket={up.socket}") as px:
            after_turns, connected, total = clients_in_turn_then_at_once(px, up)
    assert (after_turns, connected, total) == (CLIENTS, CLIENTS, 2 * CLIENTS)


def test_shared_over_memory_with_the_real_command() -> None:
    script = textwrap.dedent(
        """
        import nbd, sys
        a, b = nbd.NBD(), nbd.NBD()
        a.connect_uri(sys.argv[1])
        b.connect_uri(sys.argv[1])
        a.pwrite(b"from a", 1000)
        b.pwrite(b"from b", 2000)
        a.flush()
        print(bytes(b.pread(6, 1000)), bytes(a.pread(6, 2000)), a.can_multi_conn(),
              b.is_read_only())
        """
    )
    with trionbd_process("--filter=shared", "memory", "1M") as px:
        out = run([SYSTEM_PYTHON, "-c", script, px.uri])
    assert out.split() == ["b'from", "a'", "b'from", "b'", "True", "False"]
    with trionbd_process("-r", "--filter=shared", "memory", "1M") as px:
        assert "is_read_only: true" in run(["nbdinfo", px.uri])


# --- in process: a plugin whose state is per handle ----------------------------------------


@dataclass
class Scratch:
    """One handle of ScratchPlugin: its own disk."""

    readonly: bool
    export: str
    data: bytearray = field(default_factory=lambda: bytearray(MiB))
    flushes: int = 0
    closed: bool = False


class ScratchPlugin(Plugin):
    """A RAM disk per open: clients see each other's writes only if they share a handle."""

    name = "scratch"

    def __init__(self, concurrency: Concurrency = Concurrency.PARALLEL, fail_opens: int = 0):
        self.concurrency = concurrency  # type: ignore[misc]
        self.handles: list[Scratch] = []
        self.fail_opens = fail_opens
        self.defaults = 0
        self.inside = 0
        self.most_inside = 0
        self.two_inside = trio.Event()

    async def default_export(self, readonly: bool, is_tls: bool) -> str:
        self.defaults += 1
        return "scratch"

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> Scratch:
        await trio.sleep(0.02)  # widen the window in which concurrent clients could race
        if self.fail_opens:
            self.fail_opens -= 1
            raise NBDError(errno.EIO, "scratch: backing store unavailable")
        handle = Scratch(readonly, export_name)
        self.handles.append(handle)
        return handle

    async def close(self, h: Scratch) -> None:
        h.closed = True

    async def get_size(self, h: Scratch) -> int:
        return len(h.data)

    async def pread(self, h: Scratch, count: int, offset: int, flags: int) -> bytes:
        # Records how many reads run at once: two overlapping reads meet here at once,
        # a serialized plugin never sees two (each waits a short while, then goes on).
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        if self.inside >= 2:
            self.two_inside.set()
        with trio.move_on_after(0.05):
            await self.two_inside.wait()
        self.inside -= 1
        return bytes(h.data[offset : offset + count])

    async def pwrite(self, h: Scratch, buf: bytes, offset: int, flags: int) -> None:
        h.data[offset : offset + len(buf)] = buf

    async def flush(self, h: Scratch, flags: int) -> None:
        h.flushes += 1


def socket_of(server: Server) -> str:
    path = server.addresses[0].unix_path
    assert path is not None
    return path


def chain(plugin: Plugin, shared: bool) -> Chain:
    return Chain(plugin, [SharedFilter()] if shared else [])


@pytest.mark.parametrize("shared", [True, False])
async def test_writes_of_one_client_are_seen_by_another(shared: bool) -> None:
    plugin = ScratchPlugin()
    async with serving(chain(plugin, shared)) as server:
        path = socket_of(server)
        async with await nbd.connect_unix(path) as a, await nbd.connect_unix(path) as b:
            await a.pwrite(b"written by a", 4096)
            seen = await b.pread(12, 4096)
    if shared:
        assert seen == b"written by a"
        assert len(plugin.handles) == 1 and plugin.handles[0].closed  # closed at unload
    else:
        assert seen == bytes(12)
        assert len(plugin.handles) == 2


async def test_concurrent_first_clients_open_the_context_once() -> None:
    plugin = ScratchPlugin()
    async with serving(chain(plugin, True)) as server:
        path = socket_of(server)
        clients: list[nbd.Client] = []

        async def connect() -> None:
            clients.append(await nbd.connect_unix(path))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(connect)
        for c in clients:
            await c.aclose()
        assert len(plugin.handles) == 1
        assert plugin.defaults == 1  # the default export is resolved once as well
        assert not plugin.handles[0].closed  # clients leaving do not close it
    assert plugin.handles[0].closed


async def test_flush_from_any_client_flushes_the_shared_context() -> None:
    plugin = ScratchPlugin()
    async with serving(chain(plugin, True)) as server:
        path = socket_of(server)
        async with await nbd.connect_unix(path) as a, await nbd.connect_unix(path) as b:
            assert a.can_multi_conn and b.can_multi_conn  # plugin alone: no multi-conn
            await a.pwrite(b"data", 0)
            await b.flush()
            assert plugin.handles[0].flushes == 1


async def test_read_only_server_opens_the_shared_context_read_only() -> None:
    plugin = ScratchPlugin()
    async with serving(chain(plugin, True), ServerConfig(readonly=True)) as server:
        async with await nbd.connect_unix(socket_of(server)) as c:
            assert c.is_read_only
            with pytest.raises(nbd.RequestError) as e:
                await c.pwrite(b"x", 0)
            assert e.value.errno == errno.EPERM
    assert plugin.handles[0].readonly


@pytest.mark.parametrize(
    ("concurrency", "shared", "allowed"),
    [
        (Concurrency.SERIALIZE_REQUESTS, True, {1}),  # one context: one request at a time
        (Concurrency.SERIALIZE_REQUESTS, False, {2}),  # a context per client: one each
        (Concurrency.PARALLEL, True, set(range(2, 9))),  # 8 requests, any overlap
    ],
)
async def test_requests_follow_the_plugins_concurrency(
    concurrency: Concurrency, shared: bool, allowed: set[int]
) -> None:
    plugin = ScratchPlugin(concurrency)
    async with serving(chain(plugin, shared)) as server:
        path = socket_of(server)
        async with await nbd.connect_unix(path) as a, await nbd.connect_unix(path) as b:
            with trio.fail_after(HANG_GUARD):
                async with trio.open_nursery() as nursery:
                    for client in (a, b):
                        for i in range(4):
                            nursery.start_soon(client.pread, 512, i * 512)
    assert plugin.most_inside in allowed


async def test_a_failed_open_is_retried_by_the_next_client() -> None:
    """(Of an export other than the default, whose context opens at start-up.)"""
    plugin = ScratchPlugin()
    async with serving(chain(plugin, True)) as server:
        path = socket_of(server)
        plugin.fail_opens = 1
        with pytest.raises(nbd.OptionError) as e:
            await nbd.connect_unix(path, "other")
        assert "backing store unavailable" in e.value.message
        async with await nbd.connect_unix(path, "other") as c:
            await c.pwrite(b"ok", 0)
            assert await c.pread(2, 0) == b"ok"
    assert [h.export for h in plugin.handles] == ["scratch", "other"]


async def test_each_export_name_gets_its_own_shared_context() -> None:
    plugin = ScratchPlugin()
    async with serving(chain(plugin, True)) as server:
        path = socket_of(server)
        names: Sequence[str] = ("one", "two", "one", "two", "")
        clients = [await nbd.connect_unix(path, name) for name in names]
        for c in clients:
            await c.aclose()
    assert sorted(h.export for h in plugin.handles) == ["one", "scratch", "two"]
