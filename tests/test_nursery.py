"""The lifetime nursery: contexts that live from after_fork to unload.

Open order and reverse close order, exactly-once closing (also when start-up is
cancelled halfway), ESHUTDOWN for late users, the close deadline, no leaked tasks, and
start-up failures stopping the real command with status 1.
"""

from __future__ import annotations

import errno
import logging
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.server.nbdclient import connect
from tests.support import PYTHON, ROOT, all_tasks, serving, short_tmpdir
from trionbd.chain import Chain, Filter, Layer, NBDError, Next, StartupError
from trionbd.chain.plugin import Plugin
from trionbd.nursery import Lifetime, open_lifetime
from trionbd.protocol.constants import Cmd
from trionbd.protocol.events import DataChunk

SIZE = 1 << 20


class Recorder(Plugin):
    """Records opens, closes and reads (shared ``events`` list); named exports can be
    made slow to open, slow to prepare, hanging on close, or failing to open."""

    name = "recorder"

    def __init__(
        self,
        events: list[tuple[str, ...]],
        *,
        slow_open: Sequence[str] = (),
        slow_size: Sequence[str] = (),
        hang_close: Sequence[str] = (),
        missing: Sequence[str] = (),
        read_time: float = 1.0,
    ):
        self.events = events
        self.slow_open = set(slow_open)
        self.slow_size = set(slow_size)
        self.hang_close = set(hang_close)
        self.missing = set(missing)
        self.read_time = read_time

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> str:
        if export_name in self.missing:
            raise NBDError(errno.ENOENT, f"recorder: no export named {export_name!r}")
        self.events.append(("open", export_name))
        if export_name in self.slow_open:
            await trio.sleep_forever()
        return export_name

    async def close(self, h: str) -> None:
        self.events.append(("close", h))
        if h in self.hang_close:
            await trio.sleep_forever()
        self.events.append(("closed", h))

    async def get_size(self, h: str) -> int:
        if h in self.slow_size:
            await trio.sleep_forever()
        return SIZE

    async def pread(self, h: str, count: int, offset: int, flags: int) -> bytes:
        self.events.append(("pread", h))
        await trio.sleep(self.read_time)
        self.events.append(("pread done", h))
        return bytes(count)

    async def cleanup(self) -> None:
        self.events.append(("cleanup", self.name))


class Opener(Filter):
    """Opens lifetime contexts of the layer below in after_fork, optionally starts
    background tasks, and optionally never finishes after_fork."""

    def __init__(
        self,
        events: list[tuple[str, ...]],
        names: Sequence[str],
        *,
        name: str = "opener",
        block: bool = False,
        background: int = 0,
        hang_cleanup: bool = False,
    ):
        self.name = name  # type: ignore[misc]
        self.events = events
        self.names = names
        self.block = block
        self.background = background
        self.hang_cleanup = hang_cleanup
        self.contexts: list[Next] = []
        self.finished: list[str] = []

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        self.events.append(("after_fork", self.name))
        for n in self.names:
            self.contexts.append(await lifetime.open_context(below, n, readonly=True))
        for i in range(self.background):
            lifetime.nursery.start_soon(self._background, i)
        if self.block:
            await trio.sleep_forever()

    async def _background(self, i: int) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.finished.append(f"background {i}")

    async def cleanup(self) -> None:
        self.events.append(("cleanup", self.name))
        if self.hang_cleanup:
            await trio.sleep_forever()


def closes(events: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return [e for e in events if e[0] in ("close", "closed")]


# --- order ---------------------------------------------------------------------------------


async def test_after_fork_bottom_up_and_contexts_close_in_reverse_order() -> None:
    events: list[tuple[str, ...]] = []
    lower = Opener(events, ["a", "b"], name="lower")
    upper = Opener(events, ["c"], name="upper")
    chain = Chain(Recorder(events), [upper, lower])
    async with open_lifetime(chain) as lifetime:
        assert events == [
            ("after_fork", "lower"),
            ("open", "a"),
            ("open", "b"),
            ("after_fork", "upper"),
            ("open", "c"),
        ]
        # upper's context is a context of the lower filter's layer, over plugin "c".
        assert upper.contexts[0].inner.layer.target is lower
        assert lifetime.contexts == [*lower.contexts, *upper.contexts]
        # A client closing a lifetime context does nothing; unload closes it.
        await lower.contexts[0].close()
        assert closes(events) == []
        del events[:]
    assert events == [
        ("cleanup", "upper"),
        ("cleanup", "lower"),
        ("cleanup", "recorder"),
        ("close", "c"),
        ("closed", "c"),
        ("close", "b"),
        ("closed", "b"),
        ("close", "a"),
        ("closed", "a"),
    ]
    assert all(ctx.closed for ctx in lifetime.contexts)


# --- cancelled start-up --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plugin_options", "names", "expected"),
    [
        # Cancelled in after_fork itself, after two contexts were opened.
        ({}, ["a", "b"], ["b", "a"]),
        # Cancelled inside the plugin's open of the third: it never opened.
        ({"slow_open": ["c"]}, ["a", "b", "c"], ["b", "a"]),
        # Cancelled while the third was being prepared: it opened, so it closes too.
        ({"slow_size": ["c"]}, ["a", "b", "c"], ["c", "b", "a"]),
    ],
)
async def test_cancelled_start_up_closes_what_was_opened_exactly_once(
    autojump_clock: trio.testing.MockClock,
    plugin_options: dict[str, Any],
    names: list[str],
    expected: list[str],
) -> None:
    events: list[tuple[str, ...]] = []
    upper = Opener(events, ["never"], name="upper")
    opener = Opener(events, names, block=not plugin_options, background=2)
    chain = Chain(Recorder(events, **plugin_options), [upper, opener])
    before = all_tasks()
    with trio.move_on_after(10) as scope:
        async with open_lifetime(chain):
            pytest.fail("start-up finished although after_fork never returns")
    assert scope.cancelled_caught
    assert ("after_fork", "upper") not in events
    assert closes(events) == [e for n in expected for e in (("close", n), ("closed", n))]
    assert sorted(opener.finished) == (
        ["background 0", "background 1"] if not plugin_options else []
    )
    assert all_tasks() == before


async def test_the_server_cancelled_at_the_end_of_start_up_stops_cleanly() -> None:
    """Cancelled after the lifetime started but before the server is handed over (the
    server then runs shielded): start-up must end, not serve forever unreachable."""
    events: list[tuple[str, ...]] = []
    scope = trio.CancelScope()

    class CancelsAtStartUp(Opener):
        async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
            await super().after_fork(lifetime, below)
            scope.cancel()  # takes effect at the next checkpoint, after this returns

    chain = Chain(Recorder(events), [CancelsAtStartUp(events, ["a"])])
    with scope:
        async with serving(chain):
            pytest.fail("serving started although start-up was cancelled")
    assert scope.cancelled_caught
    assert closes(events) == [("close", "a"), ("closed", "a")]


async def test_a_lifetime_opened_under_a_cancelled_scope_ends_at_once() -> None:
    events: list[tuple[str, ...]] = []
    with trio.fail_after(60), trio.CancelScope() as scope:
        scope.cancel()
        async with open_lifetime(Chain(Recorder(events), [Opener(events, ["a"])])):
            pytest.fail("the lifetime started although it was cancelled")
    assert scope.cancelled_caught
    assert events == []


# --- late users ----------------------------------------------------------------------------


async def test_a_task_using_a_lifetime_context_at_shutdown_gets_eshutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[tuple[str, ...]] = []
    opener = Opener(events, ["a"])
    chain = Chain(Recorder(events, read_time=1.0), [opener])
    results: list[object] = []

    async def client(ctx: Next) -> None:
        try:
            while True:
                results.append(len(await ctx.pread(512, 0)))
        except NBDError as e:
            results.append(e)

    with trio.fail_after(60):
        async with trio.open_nursery() as outside:
            async with open_lifetime(chain):
                outside.start_soon(client, opener.contexts[0])
                await trio.sleep(2.5)  # the third read is in flight
    assert results[:3] == [512, 512, 512]
    error = results[3]
    assert isinstance(error, NBDError) and error.errno == errno.ESHUTDOWN
    assert "shutting down" in error.message
    assert len(results) == 4
    # Shutdown began during the third read; the context closed only after it finished.
    assert events[-6:] == [
        ("pread", "a"),
        ("cleanup", "opener"),
        ("cleanup", "recorder"),
        ("pread done", "a"),
        ("close", "a"),
        ("closed", "a"),
    ]


async def test_a_background_task_of_the_lifetime_gets_eshutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[tuple[str, ...]] = []
    errors: list[NBDError] = []

    class Poller(Opener):
        async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
            await super().after_fork(lifetime, below)
            lifetime.nursery.start_soon(self.poll)

        async def poll(self) -> None:
            try:
                while True:
                    await self.contexts[0].pread(1, 0)
            except NBDError as e:
                errors.append(e)

    chain = Chain(Recorder(events), [Poller(events, ["a"])])
    before = all_tasks()
    with trio.fail_after(60):
        async with open_lifetime(chain):
            await trio.sleep(3.5)
    assert [e.errno for e in errors] == [errno.ESHUTDOWN]
    assert closes(events) == [("close", "a"), ("closed", "a")]
    assert all_tasks() == before


async def test_opening_a_context_after_shutdown_began_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[tuple[str, ...]] = []
    opener = Opener(events, [])
    chain = Chain(Recorder(events), [opener])
    async with open_lifetime(chain) as lifetime:
        below = chain.top.below
        assert below is not None
    with pytest.raises(NBDError) as info:
        await lifetime.open_context(below, "late", readonly=True)
    assert info.value.errno == errno.ESHUTDOWN
    assert ("open", "late") not in events


async def test_the_server_closes_lifetime_contexts_only_after_its_clients() -> None:
    """End to end: a client reading through a shared lifetime context while the server
    shuts down gets its read in flight answered, then the connection closes; only then
    do cleanup and the close of the shared context run, once. (Real clock and socket.)"""
    events: list[tuple[str, ...]] = []

    class Shared(Opener):
        reading = trio.Event()

        async def open(
            self, below: Layer, readonly: bool, export_name: str, is_tls: bool
        ) -> tuple[Next, Any]:
            return self.contexts[0], None

        async def pread(self, next: Next, h: Any, count: int, offset: int, flags: int) -> bytes:
            self.reading.set()
            return await next.pread(count, offset, flags)

    shared = Shared(events, ["a"])
    chain = Chain(Recorder(events, read_time=0.3), [shared])
    with trio.fail_after(60):
        async with serving(chain) as server:
            client = await connect(server)
            await client.go()
            assert await client.read(0, 512) == bytes(512)
            shared.reading = trio.Event()
            cookie = await client.send(Cmd.READ, 0, 512)
            await shared.reading.wait()
            server.shutdown()
            assert await client.reply(cookie) == [DataChunk(cookie, 0, bytes(512), True)]
            assert await client.eof()
    assert events[-5:] == [
        ("pread done", "a"),
        ("cleanup", "opener"),
        ("cleanup", "recorder"),
        ("close", "a"),
        ("closed", "a"),
    ]
    assert events.count(("close", "a")) == 1


# --- deadlines -----------------------------------------------------------------------------


async def test_a_hanging_close_is_abandoned_and_the_others_still_close(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[tuple[str, ...]] = []
    chain = Chain(Recorder(events, hang_close=["b"]), [Opener(events, ["a", "b", "c"])])
    before = all_tasks()
    with caplog.at_level(logging.ERROR, logger="trionbd.nursery"):
        async with open_lifetime(chain, close_timeout=5) as lifetime:
            start = trio.current_time()
    assert trio.current_time() - start == pytest.approx(5)
    assert closes(events) == [
        ("close", "c"),
        ("closed", "c"),
        ("close", "b"),
        ("close", "a"),
        ("closed", "a"),
    ]
    assert "took longer than 5.0s; abandoned" in caplog.text
    assert "'b'" in caplog.text
    assert [ctx.closed for ctx in lifetime.contexts] == [True, True, True]
    assert all_tasks() == before


async def test_a_hanging_call_in_flight_delays_close_only_until_the_deadline(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[tuple[str, ...]] = []
    opener = Opener(events, ["a", "b"])
    chain = Chain(Recorder(events, read_time=float("inf")), [opener])
    with caplog.at_level(logging.ERROR, logger="trionbd.nursery"):
        async with trio.open_nursery() as outside:
            async with open_lifetime(chain, close_timeout=5):
                outside.start_soon(opener.contexts[1].pread, 1, 0)
                await trio.sleep(1)
                start = trio.current_time()
            assert trio.current_time() - start == pytest.approx(5)
            outside.cancel_scope.cancel()
    # b's read never finished, so b was abandoned before closing; a still closed.
    assert closes(events) == [("close", "a"), ("closed", "a")]
    assert "abandoned" in caplog.text


async def test_a_hanging_cleanup_is_cut_off_and_contexts_still_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[tuple[str, ...]] = []
    chain = Chain(Recorder(events), [Opener(events, ["a"], hang_cleanup=True)])
    async with open_lifetime(chain, close_timeout=5):
        start = trio.current_time()
    assert trio.current_time() - start == pytest.approx(5)
    assert events[-4:] == [("cleanup", "opener"), ("cleanup", "recorder"), *closes(events)]
    assert closes(events) == [("close", "a"), ("closed", "a")]


async def test_shutdown_by_cancellation_leaves_no_tasks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[tuple[str, ...]] = []
    opener = Opener(events, ["a", "b"], background=3)
    chain = Chain(Recorder(events), [opener])
    before = all_tasks()
    with trio.move_on_after(10):
        async with open_lifetime(chain) as lifetime:
            assert len(all_tasks() - before) >= 3  # the background tasks (and their hosts)
            await trio.sleep_forever()
    assert sorted(opener.finished) == ["background 0", "background 1", "background 2"]
    assert closes(events) == [("close", "b"), ("closed", "b"), ("close", "a"), ("closed", "a")]
    assert lifetime.closing
    assert all_tasks() == before


async def test_a_blocking_plain_def_close_is_abandoned_at_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A real clock: the mock clock would jump while the quick close of "a" is in its thread.
    events: list[tuple[str, ...]] = []
    release = threading.Event()

    class Blocking(Recorder):
        def close(self, h: str) -> None:  # type: ignore[override]
            self.events.append(("close", h))
            if h == "b":
                release.wait(10)  # long past the deadline; bounded so a regression fails
            self.events.append(("closed", h))

    chain = Chain(Blocking(events), [Opener(events, ["a", "b"])])
    try:
        with trio.fail_after(60), caplog.at_level(logging.ERROR, logger="trionbd.nursery"):
            async with open_lifetime(chain, close_timeout=1):
                pass
        assert closes(events) == [("close", "b"), ("close", "a"), ("closed", "a")]
        assert "export='b' for opener> took longer than 1.0s; abandoned" in caplog.text
        assert "export='a'" not in caplog.text
    finally:
        release.set()


async def test_plain_def_after_fork_and_cleanup_run_in_a_worker_thread() -> None:
    threads: dict[str, int] = {}

    class Sync(Recorder):
        def after_fork(self, lifetime: Lifetime) -> None:  # type: ignore[override]
            threads["after_fork"] = threading.get_ident()
            # A worker thread may reach back into Trio.
            threads["time"] = trio.from_thread.run_sync(trio.current_time) is not None

        def cleanup(self) -> None:  # type: ignore[override]
            threads["cleanup"] = threading.get_ident()

    async with open_lifetime(Chain(Sync([]))):
        assert "after_fork" in threads
    main = threading.get_ident()
    assert threads["after_fork"] != main and threads["cleanup"] != main
    assert threads["time"]


# --- start-up failures ---------------------------------------------------------------------


async def test_a_failing_open_at_start_up_is_a_startup_error_naming_the_filter() -> None:
    events: list[tuple[str, ...]] = []
    chain = Chain(Recorder(events, missing=["gone"]), [Opener(events, ["a", "gone", "c"])])
    with pytest.RaisesGroup(StartupError, flatten_subgroups=True) as group:
        async with open_lifetime(chain):
            pytest.fail("started although an open failed")
    (error,) = group.value.exceptions
    assert str(error) == "opener: recorder: no export named 'gone' (ENOENT)"
    assert closes(events) == [("close", "a"), ("closed", "a")]


def test_the_command_exits_1_when_a_start_up_open_fails(tmp_path: Path) -> None:
    (tmp_path / "present.img").write_bytes(b"\0" * 4096)
    with short_tmpdir() as tmp:
        sock = tmp / "sock"
        result = subprocess.run(
            [
                PYTHON,
                "-m",
                "trionbd",
                "-f",
                "-U",
                str(sock),
                "--filter=tests.chain.shape_filters:Directory",
                "file",
                f"dir={tmp_path}",
                "start-export=missing.img",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert not sock.exists()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip() == "trionbd: directory: file: no export named 'missing.img' (ENOENT)"
    )
