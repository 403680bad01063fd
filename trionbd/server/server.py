"""The server: listeners feeding a nursery of connections, inside the chain's lifetime.

::

    serve()
    └── Lifetime (after_fork .. unload)
        └── Server.run (shielded; drained by shutdown())
            ├── listener tasks
            └── connection nursery: one Connection task per client

Shutting down is cancellation with a grace period: :meth:`Server.shutdown` stops the
listeners, tells every connection to stop reading new requests, and gives in-flight
requests ``shutdown_timeout`` seconds before they are cancelled. Leaving the cancel
scope around :func:`serve` does the same.

With ``max_connections`` set, a client beyond the limit is not dropped unanswered: it
gets the greeting and every option it sends is refused with ``NBD_REP_ERR_POLICY`` and
a message naming the limit (clients report "server policy prevents NBD_OPT_GO", qemu
also prints the message); ABORT, EXPORT_NAME or the handshake timeout end it. Such
refusals are bounded too: while as many are under way as the limit, further clients
are closed at once, with a log line.

While it runs, the server counts what the clients of each export do
(:meth:`Server.stats`) and closes the connections of an export that went away when a
plugin or filter asks (:meth:`Server.close_connections`, reached through
``Lifetime.close_connections``). A plugin or filter may also end the server once its
clients have gone (:meth:`Server.stop_accepting`, reached through
``Lifetime.request_shutdown``): the listeners close, and the server ends when its last
connection does.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..chain import Chain, Layer, LayerContext
from ..chain.plugin import Plugin
from ..chain.types import Concurrency
from ..net.address import Address
from ..nursery import Lifetime, open_lifetime
from .config import ServerConfig
from .connection import Connection
from .daemon import remove_quietly
from .listeners import address_of, listen
from .ratelimit import WarningBudget

if TYPE_CHECKING:
    from .workers import Balance, Slot

log = logging.getLogger("trionbd.server")

ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""Errors of accept(2) that mean the system is out of something for now (descriptors,
buffers, memory): the server keeps serving the clients it has and tries again after
ACCEPT_RETRY seconds, with a log line, as ``trio.serve_listeners`` does. Any other
error ends the server (Trio's listener already retries those that concern only the
client, such as ECONNABORTED)."""
ACCEPT_RETRY = 0.1
TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
"""Where ``--keepalive`` applies (Unix and vsock sockets have no TCP keepalive)."""

ListenerSpec = str | trio.SocketListener
"""A listener, or where to listen: ``unix:PATH``, ``tcp:HOST:PORT``, ``tcp:PORT``."""


@dataclass(frozen=True)
class ExportStats:
    """What the clients of one export did since the server started."""

    requests: int = 0
    """Requests answered (including those answered with an error)."""
    bytes_read: int = 0
    """Bytes of successful reads."""
    bytes_written: int = 0
    """Bytes of successful writes."""
    errors: int = 0
    """Requests answered with an error."""
    connections: int = 0
    """Clients connected to the export now."""

    def __add__(self, other: ExportStats) -> ExportStats:
        return ExportStats(
            self.requests + other.requests,
            self.bytes_read + other.bytes_read,
            self.bytes_written + other.bytes_written,
            self.errors + other.errors,
            self.connections + other.connections,
        )

    @classmethod
    def of(cls, conn: Connection, connected: bool) -> ExportStats:
        c = conn.counters
        return cls(c.requests, c.bytes_read, c.bytes_written, c.errors, int(connected))


def sum_stats(many: Iterable[dict[str, ExportStats]]) -> dict[str, ExportStats]:
    """Several :meth:`Server.stats` (of worker processes) added up per export."""
    out: dict[str, ExportStats] = {}
    for stats in many:
        for name, st in stats.items():
            out[name] = out.get(name, ExportStats()) + st
    return out


def log_stats(stats: dict[str, ExportStats]) -> None:
    """One info line per export of :meth:`Server.stats` (the command line's SIGUSR1)."""
    for name, st in sorted(stats.items()):
        log.info(
            "export %r: %d requests (%d failed), %d bytes read, %d bytes written, "
            "%d clients connected",
            name, st.requests, st.errors, st.bytes_read, st.bytes_written, st.connections,
        )  # fmt: skip


class Server:
    """A running server. Obtained from ``await nursery.start(serve, ...)``."""

    def __init__(
        self,
        chain: Chain,
        lifetime: Lifetime,
        config: ServerConfig,
        listeners: Sequence[trio.SocketListener],
        balance: Balance | None = None,
    ):
        self.chain = chain
        self.lifetime = lifetime
        self.config = config
        self.listeners = list(listeners)
        self.addresses: list[Address] = [address_of(lis) for lis in self.listeners]
        self.connections: set[Connection] = set()
        self.inline = chain.nonblocking
        self.warnings = WarningBudget()
        """Shared by the connections: how many warnings about clients may be logged."""
        self._ids = itertools.count(1)
        self._listen_scope = trio.CancelScope()
        self._connections_scope = trio.CancelScope()
        self._one_at_a_time = (
            trio.Lock() if chain.concurrency is Concurrency.SERIALIZE_CONNECTIONS else None
        )
        self.shutting_down = False
        self.accepting = True
        """False once the server takes no more clients (:meth:`stop_accepting`)."""
        self._turning_away = 0
        """Connections over the limit being refused (they are in ``connections`` too)."""
        self._connections: trio.Nursery | None = None
        self._running = trio.Event()
        self._past: dict[str, ExportStats] = {}
        """Counters of the connections that have closed, per export."""
        self.balance = balance
        """Set in a worker process: shared with the other workers, it decides which
        worker accepts a client and counts the clients of all of them."""
        lifetime.connection_closer = self.close_connections
        lifetime.shutdown_requester = self.stop_accepting
        if lifetime.shutdown_requested:
            self.stop_accepting()

    @property
    def uris(self) -> list[str]:
        """One URI per listening address, for the default export."""
        return [a.uri() for a in self.addresses]

    def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, drain connections, cancel what is left after ``grace`` seconds."""
        if grace is None:
            grace = self.config.shutdown_timeout
        deadline = trio.current_time() + grace
        if not self.shutting_down:
            self.shutting_down = True
            log.info("shutting down: %d connections, %.1fs grace", len(self.connections), grace)
        self._listen_scope.cancel()
        self._connections_scope.deadline = min(self._connections_scope.deadline, deadline)
        for conn in list(self.connections):
            conn.drain()

    def stop_accepting(self) -> None:
        """Close the listeners and accept no more clients; the server keeps serving the
        connected ones and ends when the last has gone (``Lifetime.request_shutdown``)."""
        self.accepting = False
        self._listen_scope.cancel()

    def stats(self) -> dict[str, ExportStats]:
        """Per export name (as clients asked for it, ``""`` resolved to the default
        export's name): the counters of its past and present connections, and how many
        clients are connected now. Exports no client has used are absent."""
        out = dict(self._past)
        for conn in self.connections:
            name = conn.info.export_name
            if name is not None:
                out[name] = out.get(name, ExportStats()) + ExportStats.of(conn, True)
        return out

    async def report(self) -> None:
        """Every layer reports; then the counters of :meth:`stats` are logged (info)."""
        await self.chain.report()
        log_stats(self.stats())

    async def close_connections(
        self, layer: Layer, match: Callable[[LayerContext], bool], grace: float | None = None
    ) -> int:
        """Retire the connections whose context of ``layer`` satisfies ``match`` and wait
        until they have closed; return how many. See ``Lifetime.close_connections``."""
        if grace is None:
            grace = self.config.shutdown_timeout
        closing = [conn for conn in self.connections if conn.uses(layer, match)]
        for conn in closing:
            conn.retire(grace)
        for conn in closing:
            await conn.closed.wait()
        return len(closing)

    async def run(self) -> None:
        """Accept and serve clients until :meth:`shutdown`; then wait for connections."""
        with self._connections_scope:
            async with trio.open_nursery() as connections:
                with self._listen_scope:
                    async with trio.open_nursery() as accepting:
                        for listener in self.listeners:
                            accepting.start_soon(self._accept_loop, listener, connections)
                        self._connections = connections
                        self._running.set()
                        await trio.sleep_forever()  # until shutdown(), even with no listener
                for listener in self.listeners:
                    await listener.aclose()

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        balance = self.balance
        accept = listener.accept if balance is None else functools.partial(balance.accept, listener)
        while True:
            try:
                stream = await accept()
            except OSError as e:
                if e.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error(
                    "accept on %s failed: %s (%s); retrying in %ss",
                    address_of(listener), errno.errorcode[e.errno], os.strerror(e.errno),
                    ACCEPT_RETRY,
                )  # fmt: skip
                await trio.sleep(ACCEPT_RETRY)
                continue
            if self.config.keepalive and stream.socket.family in TCP_FAMILIES:
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            limit = self.config.max_connections
            if balance is not None:
                admitted = balance.admit(limit)
            else:
                admitted = limit is None or len(self.connections) - self._turning_away < limit
            if not admitted:
                assert limit is not None
                if self._turning_away >= limit:
                    log.warning(
                        "closing a client at once: %d served and %d being refused "
                        "(--max-connections=%d)", limit, self._turning_away, limit,
                    )  # fmt: skip
                    await stream.aclose()
                else:
                    connections.start_soon(self._turn_away, stream, limit)
                continue
            if balance is None:
                connections.start_soon(self.handle_stream, stream)
            else:
                connections.start_soon(self._handle_admitted, stream, balance)

    async def _handle_admitted(self, stream: trio.abc.Stream, balance: Balance) -> None:
        """Serve a client that ``balance`` admitted, then tell it the client has gone."""
        try:
            await self.handle_stream(stream)
        finally:
            balance.release()

    async def _turn_away(self, stream: trio.abc.Stream, limit: int) -> None:
        """Negotiate with a client over the limit only to refuse its options (see the
        module doc)."""
        reason = f"too many clients: the limit is {limit} (--max-connections)"
        conn = Connection(self, stream, next(self._ids), unserved_reason=reason)
        log.warning("conn %d: refused: %s", conn.id, reason)
        self._turning_away += 1
        try:
            await self._serve_connection(conn, None)
        finally:
            self._turning_away -= 1

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve a client on an already connected ``stream`` (``-s`` serves stdin and
        stdout) as if a listener had accepted it, and return once it has gone. The client
        runs in the connection nursery: cancelling the caller leaves it to the server's
        graceful shutdown."""
        await self._running.wait()
        assert self._connections is not None
        if not self.accepting:  # the connection nursery may have closed already
            await stream.aclose()
            return
        gone = trio.Event()

        async def client() -> None:
            try:
                await self.handle_stream(stream)
            finally:
                gone.set()

        self._connections.start_soon(client)
        await gone.wait()

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one client on ``stream`` in the calling task."""
        await self._serve_connection(Connection(self, stream, next(self._ids)), self._one_at_a_time)

    async def _serve_connection(self, conn: Connection, one_at_a_time: trio.Lock | None) -> None:
        """Run ``conn`` (under ``one_at_a_time``, if given) as one of ``connections``;
        then add its counters to the closed connections' counters of its export."""
        self.connections.add(conn)
        if self.shutting_down:
            conn.drain()
        try:
            if one_at_a_time is not None:
                async with one_at_a_time:
                    await conn.run()
            else:
                await conn.run()
        finally:
            self.connections.discard(conn)
            name = conn.info.export_name
            if name is not None:
                self._past[name] = self._past.get(name, ExportStats()) + ExportStats.of(conn, False)


async def serve(
    target: Chain | Plugin,
    listeners: ListenerSpec | Iterable[ListenerSpec] = (),
    config: ServerConfig | None = None,
    *,
    worker: Slot | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``target`` (a chain, or a bare plugin) on ``listeners`` until cancelled.

    ``listeners`` holds ``trio.SocketListener`` objects and address strings, or is one
    of them: ``"unix:PATH"``, ``"tcp:HOST:PORT"``, ``"tcp:PORT"`` (every address); port
    0 picks a free port (see ``server.addresses``). Sockets opened from strings are
    closed at the end, and their Unix socket files removed.

    Use ``server = await nursery.start(serve, ...)``: it returns once every listener
    accepts clients and the chain's lifetime has started (export lists are ready).
    Cancelling the surrounding scope shuts down gracefully: in-flight requests get
    ``config.shutdown_timeout`` seconds, then lifetime contexts close and ``serve``
    returns (re-raising the cancellation). :meth:`Server.shutdown` ends it too.

    Unless the caller already did (``chain.get_ready()``, as the command line does
    before forking), ``serve`` calls every layer's ``get_ready`` first and ``unload``
    at the end: whoever calls ``get_ready`` calls ``unload``.

    ``worker`` is for the command line's ``--workers``: this process is one of several
    serving the same listening sockets (see :mod:`trionbd.server.workers`).
    """
    chain = target if isinstance(target, Chain) else Chain(target)
    config = config or ServerConfig()
    owns_chain = not chain.ready
    given = [listeners] if isinstance(listeners, str | trio.SocketListener) else list(listeners)
    opened: list[tuple[trio.SocketListener, str | None]] = []  # from strings: ours to close
    try:
        if owns_chain:
            chain.get_ready()
        sockets: list[trio.SocketListener] = []
        for spec in given:
            if isinstance(spec, str):
                new = listen(spec)
                opened += [(listener, address_of(listener).unix_path) for listener in new]
                sockets += new
            else:
                sockets.append(spec)
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                _run_shielded, chain, sockets, config, nursery, worker
            )
            task_status.started(server)
            try:
                await trio.sleep_forever()
            finally:
                server.shutdown()
    finally:
        for listener, path in opened:
            listener.socket.close()
            if path:
                remove_quietly(path)
        if owns_chain:
            chain.unload()


async def _run_shielded(
    chain: Chain,
    listeners: Sequence[trio.SocketListener],
    config: ServerConfig,
    parent: trio.Nursery,
    worker: Slot | None,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The server's body. Start-up can be cancelled; once serving, it is shielded so
    that outside cancellation becomes a graceful shutdown (started by ``serve``)."""
    index, balance = (None, None) if worker is None else (worker.index, worker.balance)
    try:
        async with open_lifetime(chain, readonly=config.readonly, worker=index) as lifetime:
            server = Server(chain, lifetime, config, listeners, balance)
            # Hand the server over before shielding (the listeners already listen). If
            # start-up was cancelled meanwhile, started() quietly hands nothing over and
            # the checkpoint ends this task: shielded, nobody could ever shut it down.
            task_status.started(server)
            await trio.lowlevel.checkpoint()
            with trio.CancelScope(shield=True):
                await server.run()
    finally:
        parent.cancel_scope.cancel()


__all__ = ["ExportStats", "ListenerSpec", "Server", "log_stats", "serve", "sum_stats"]
