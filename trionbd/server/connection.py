"""One client connection, from greeting to close.

A connection owns the client's transport, the sans-IO state machine and the send lock.
It sends the greeting, lets :class:`~.handshake.Handshake` answer options until the
client enters transmission, then lets :class:`~.transmission.Transmission` serve
requests until the client leaves; at the end it closes the export's context (flushing
it first when the server shuts down). Whatever goes wrong, only this client is lost.

A connection whose export goes away is *retired* (``Server.close_connections``): it
answers whatever still arrives with ``ESHUTDOWN`` until the client disconnects or the
grace period ends. Draining (server shutdown) stops reading new requests; those in
flight finish.

Why a client's option or request failed (an export that cannot be opened, a read the
plugin refused, a malformed request) is logged as a warning, as nbdkit prints its
errors, within two budgets so that a client cannot flood the log: the first
``WARNINGS_PER_CONNECTION`` of each connection, and the server's
:class:`~.ratelimit.WarningBudget`. What is held back is counted in a later line.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..chain import Layer, LayerContext
from ..chain.clientinfo import ClientInfo, Credentials, set_current_client
from ..chain.errors import DropConnection, NBDError
from ..net.transport import Transport
from ..protocol.errors import RemoteProtocolError
from ..protocol.server import ServerConnection
from ..protocol.wire import Buffer
from .handshake import Handshake
from .transmission import Transmission

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("trionbd.server")

PEERCRED = struct.Struct("3i")
"""``struct ucred`` as ``SO_PEERCRED`` gives it: pid, uid, gid."""
WARNINGS_PER_CONNECTION = 10
"""Failures of one connection logged as warnings; later ones are counted, and the count
is logged when the connection closes."""


@dataclass(slots=True)
class Counters:
    """What a client did: plain ints, cheap to bump on the per-request path."""

    requests: int = 0
    """Requests answered (including those answered with an error)."""
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    """Requests answered with an error."""


class Connection:
    """One client, from greeting to close."""

    def __init__(
        self,
        server: Server,
        stream: trio.abc.Stream,
        conn_id: int,
        unserved_reason: str | None = None,
    ):
        self.server = server
        self.chain = server.chain
        self.config = server.config
        self.id = conn_id
        self.unserved_reason = unserved_reason
        """Why this client is not served (over the connection limit): every option it
        sends but ABORT is answered ERR_POLICY with this message."""
        self.transport = Transport(stream)
        self.proto = ServerConnection(self.config.handshake_flags)
        self.info = _client_info(conn_id, stream)
        self.ctx: LayerContext | None = None
        """The context of the export chosen for transmission: set as soon as GO or
        EXPORT_NAME has opened it (``Server.close_connections`` sees the export in use
        while the answer is sent), back to ``None`` if GO then fails."""
        self.counters = Counters()
        """What the client did (summed per export by ``Server.stats``)."""
        self.draining = False
        self.retire_deadline: float | None = None
        """Set by :meth:`retire`: when a retired connection closes at the latest."""
        self.closed = trio.Event()
        self.stall_limit: float | None = None
        """While negotiating: how long a send may wait for the client to read."""
        self.receive_scope: trio.CancelScope | None = None
        """The cancel scope of a receive that waits (draining cancels it; the idle
        timeout moves its deadline)."""
        self._send_lock = trio.StrictFIFOLock()
        self._warnings = 0
        self._unlogged = 0

    def __repr__(self) -> str:
        return f"<Connection {self.id}>"

    def debug(self, msg: str, *args: object) -> None:
        log.debug("conn %d: " + msg, self.id, *args)

    def warn(self, msg: str, *args: object) -> None:
        """Log why one of the client's options or requests failed, as a warning, within
        the connection's and the server's budgets (see the module doc)."""
        if self._warnings >= WARNINGS_PER_CONNECTION:
            self._unlogged += 1
            return
        self._warnings += 1
        self.server.warnings.log(log, "conn %d: " + msg, self.id, *args)

    @property
    def is_tls(self) -> bool:
        return self.info.is_tls

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve this client until it leaves (or the server drains it)."""
        set_current_client(self.info)
        try:
            ctx = None
            self.stall_limit = self.config.handshake_timeout
            try:
                await self.send([self.proto.greeting()])
                ctx = await Handshake(self).run()
            except trio.TooSlowError:
                log.info(
                    "conn %d: no complete option within %ss (handshake timeout); closing",
                    self.id,
                    self.config.handshake_timeout,
                )
            self.stall_limit = None
            if ctx is None:
                return
            try:
                await Transmission(self, ctx).run()
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(self.config.shutdown_timeout):
                        if self.server.shutting_down or self.retire_deadline is not None:
                            await self._flush_at_shutdown(ctx)
                        await ctx.close()
        # except*: errors raised while requests are in flight arrive wrapped in the
        # request nursery's ExceptionGroup. Whatever goes wrong, only this client is lost.
        except* RemoteProtocolError as group:
            for e in group.exceptions:
                log.warning("conn %d: protocol error: %s; closing", self.id, e)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as group:
            self.debug("connection lost: %s", "; ".join(map(str, group.exceptions)))
        except* DropConnection as group:
            log.warning("conn %d: %s; disconnecting", self.id, group.exceptions[0])
        except* Exception as group:
            for error in group.exceptions:
                log.error("conn %d: internal error; closing", self.id, exc_info=error)
        finally:
            if self._unlogged:
                self.server.warnings.log(
                    log,
                    "conn %d: %d more failure%s not logged (the first %d were)",
                    self.id, self._unlogged, "s" if self._unlogged > 1 else "",
                    WARNINGS_PER_CONNECTION,
                )  # fmt: skip
            await self.transport.aclose()
            self.closed.set()

    async def _flush_at_shutdown(self, ctx: LayerContext) -> None:
        """The server is going away: flush a writable context, so that writes acknowledged
        to the client leave every layer's buffers (write-back caches, the plugin's own).
        A client that leaves on its own flushes if it cares; nbdkit does not flush then."""
        caps = ctx.caps
        if caps is None or not (caps.write and caps.flush):
            return
        try:
            await ctx.flush(0)
        except (NBDError, OSError) as e:
            log.error("conn %d: flush at shutdown failed: %s", self.id, e)

    def drain(self) -> None:
        """Stop reading new requests; in-flight ones finish and get their replies."""
        self.draining = True
        if self.receive_scope is not None:
            self.receive_scope.cancel()

    def uses(self, layer: Layer, match: Callable[[LayerContext], bool]) -> bool:
        """Whether this connection's context of ``layer`` satisfies ``match``."""
        ctx = self.ctx.find(layer) if self.ctx is not None else None
        return ctx is not None and match(ctx)

    def retire(self, grace: float) -> None:
        """The export went away: stop serving it. Requests in flight finish; requests
        still arriving get ``ESHUTDOWN``; the connection closes when the client
        disconnects, or after ``grace`` seconds (cancelling what still runs)."""
        if self.retire_deadline is None:
            self.retire_deadline = trio.current_time() + grace
            self.debug("export %r retired; closing within %.1fs", self.info.export_name, grace)
        self.drain()

    # --- bytes in, bytes out -------------------------------------------------------------

    async def receive(self, deadline: float) -> bool:
        """Feed the next bytes to the state machine; False when draining. Raises
        ``trio.TooSlowError`` when no byte arrived before ``deadline`` (the handshake
        and idle timeouts)."""
        if self.draining:
            return False
        data = self.transport.receive_nowait()
        if data is not None:  # no wait, so no cancel scope needed
            self.proto.receive_data(data)
            return True
        with trio.CancelScope(deadline=deadline) as scope:
            self.receive_scope = scope
            data = await self.transport.receive()
            self.proto.receive_data(data)
        self.receive_scope = None
        if self.draining:
            return False
        if scope.cancelled_caught:
            raise trio.TooSlowError
        return True

    async def send(self, buffers: list[Buffer]) -> None:
        """Send ``buffers`` in order, whole, under the send lock."""
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # uncontended: no scheduler round trip
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self.transport.send(buffers, self.stall_limit)
        finally:
            lock.release()


def _client_info(conn_id: int, stream: trio.abc.Stream) -> ClientInfo:
    """What the connection's socket tells of the client: its address, and on a Unix
    socket the connecting process's credentials."""
    if not isinstance(stream, trio.SocketStream):
        return ClientInfo(conn_id, type(stream).__name__)
    sock = stream.socket
    try:
        address = sock.getpeername()
    except OSError:
        return ClientInfo(conn_id, "?", family=sock.family)
    if sock.family != socket.AF_UNIX:
        peer = f"{address[0]}:{address[1]}"
        return ClientInfo(conn_id, peer, family=sock.family, address=address)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
        credentials = Credentials(*PEERCRED.unpack(raw))
    except OSError:
        credentials = None
    return ClientInfo(conn_id, str(address) or "unix", family=sock.family, credentials=credentials)
