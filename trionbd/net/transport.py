"""Moving bytes: receive into a reused buffer, send many buffers in one system call.

On a plain socket the transport calls ``readv``/``writev`` on the file descriptor
itself and waits for readiness only when a call would block. Trio's socket methods
yield to the scheduler before and after every call, which at tens of thousands of
requests per second costs more than the system calls. Here a send yields only to wait;
the reader first takes bytes that are already waiting without yielding
(:meth:`Transport.receive_nowait`) and yields when it must wait or, at the latest, on
every EAGER_RECEIVES-th receive: the connection stays cancellable and fair to its
neighbours while a client that keeps us busy (``nbdinfo --list`` asking about thousands
of exports) does not pay a scheduler pass per message.

Any other stream (the pipes of ``-s``, memory streams in tests) and, after
:meth:`Transport.start_tls`, a ``trio.SSLStream`` go through Trio's stream methods.
The server's connections and the client both move their bytes through a transport.
"""

from __future__ import annotations

import math
import mmap
import os
import ssl

import trio

from ..protocol.wire import Buffer

RECEIVE_SIZE = 256 * 1024
"""Bytes asked for per receive."""
EAGER_RECEIVES = 8
"""Receives that found data waiting allowed in a row before yielding to the scheduler."""
IOV_BATCH = 512
"""Buffers per ``writev`` call (below the kernel's IOV_MAX of 1024)."""


class Transport:
    """A connection's byte stream with the two operations NBD needs fast."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._eager = 0
        self._drained = False
        """The last :meth:`receive_nowait` found nothing waiting: :meth:`receive` then
        waits at once instead of trying a read that would fail the same way."""
        self._rbuf = mmap.mmap(-1, RECEIVE_SIZE)
        """Anonymous memory rather than a bytearray (which zero-fills, and so makes
        resident, all of it): only the pages receives fill count, a few KiB for a
        connection that sends only small requests (about 50 of 83 MiB of RSS with 200
        idle clients went to these buffers)."""
        self._rview = memoryview(self._rbuf)

    async def start_tls(self, context: ssl.SSLContext) -> str:
        """Wrap the stream in TLS (server side) and do the handshake; returns the TLS
        version. Raises ``trio.BrokenResourceError`` if the handshake fails."""
        stream = trio.SSLStream(self.stream, context, server_side=True)
        self.stream = stream
        self._fd = -1
        await stream.do_handshake()
        return stream.version() or "TLS"

    def receive_nowait(self) -> Buffer | None:
        """Bytes that are already waiting, taken without yielding (valid until the next
        receive); empty at EOF. ``None`` when a receive would block, on a stream that is
        not a plain socket, and on every EAGER_RECEIVES-th call (time to yield: call
        :meth:`receive`)."""
        fd = self._fd
        if fd < 0:
            return None
        self._eager += 1
        if self._eager >= EAGER_RECEIVES:
            self._eager = 0
            return None
        try:
            n = os.readv(fd, [self._rbuf])
        except BlockingIOError:
            self._eager = 0
            self._drained = True
            return None
        return self._rview[:n]

    async def receive(self) -> Buffer:
        """The next bytes from the peer (valid until the next call); empty at EOF.
        Always yields to the scheduler at least once."""
        fd = self._fd
        if fd < 0:
            return await self.stream.receive_some(RECEIVE_SIZE)
        if self._drained:
            self._drained = False
        else:
            try:
                n = os.readv(fd, [self._rbuf])
            except BlockingIOError:
                pass
            else:
                await trio.lowlevel.checkpoint()
                return self._rview[:n]
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                n = os.readv(fd, [self._rbuf])
            except BlockingIOError:
                continue
            return self._rview[:n]

    async def send(self, buffers: list[Buffer], stall_limit: float | None = None) -> None:
        """Send every buffer, in order. Not safe to call concurrently (hold a lock).

        With ``stall_limit``, raises ``trio.TooSlowError`` if the peer has not taken the
        bytes ``stall_limit`` seconds after the send first had to wait. (Not the caller's
        ``trio.fail_after``: a cancel scope around every send would cost each one; this
        arms a deadline only when a send waits, which is rare.)"""
        fd = self._fd
        if fd < 0:
            data = b"".join(buffers)
            if stall_limit is None:
                await self.stream.send_all(data)
            else:
                with trio.fail_after(stall_limit):
                    await self.stream.send_all(data)
            return
        pending = buffers
        deadline = math.inf
        while True:
            batch = pending[:IOV_BATCH] if len(pending) > IOV_BATCH else pending
            try:
                sent = os.writev(fd, batch)
            except BlockingIOError:
                deadline = await self._wait_writable(fd, deadline, stall_limit)
                continue
            done = 0
            for buf in batch:
                size = len(buf)
                if sent < size:
                    break
                sent -= size
                done += 1
            if done == len(pending):
                return
            pending = pending[done:]
            if sent:
                pending[0] = memoryview(pending[0])[sent:]
            deadline = await self._wait_writable(fd, deadline, stall_limit)

    @staticmethod
    async def _wait_writable(fd: int, deadline: float, stall_limit: float | None) -> float:
        """Wait until ``fd`` takes more bytes; with ``stall_limit``, give up at
        ``deadline`` (set to ``stall_limit`` seconds from now on the first wait). The
        deadline to keep."""
        if stall_limit is None:
            await trio.lowlevel.wait_writable(fd)
            return deadline
        if deadline == math.inf:
            deadline = trio.current_time() + stall_limit
        with trio.fail_at(deadline):
            await trio.lowlevel.wait_writable(fd)
        return deadline

    async def aclose(self) -> None:
        # Forget the descriptor first: once closed its number may be reused by another
        # socket, and a later receive or send (another task of a client) must fail on
        # the closed stream instead of reading or writing someone else's connection.
        self._fd = -1
        with trio.CancelScope(shield=True):
            with trio.move_on_after(1):
                await self.stream.aclose()
