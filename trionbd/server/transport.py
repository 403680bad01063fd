"""Moving bytes: receive into a reused buffer, send many buffers in one system call.

On a plain socket the transport calls ``readv``/``writev`` on the file descriptor
itself and waits for readiness only when a call would block. Trio's socket methods
yield to the scheduler before and after every call, which at tens of thousands of
requests per second costs more than the system calls. Here a send yields only to wait,
and a receive yields when it waits for data or, when data was already there, on every
EAGER_RECEIVES-th call: the connection stays cancellable and fair to its neighbours
while a client that keeps us busy (``nbdinfo --list`` asking about thousands of
exports) does not pay a scheduler pass per message.

After :meth:`Transport.start_tls` every byte goes through a ``trio.SSLStream``.
"""

from __future__ import annotations

import os
import ssl

import trio

RECEIVE_SIZE = 256 * 1024
"""Bytes asked for per receive."""
EAGER_RECEIVES = 8
"""Receives that found data waiting allowed in a row before yielding to the scheduler."""
IOV_BATCH = 512
"""Buffers per ``writev`` call (below the kernel's IOV_MAX of 1024)."""

Buffer = bytes | bytearray | memoryview


class Transport:
    """A connection's byte stream with the two operations the server needs fast."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._eager = 0
        self._rbuf = bytearray(RECEIVE_SIZE)
        self._rview = memoryview(self._rbuf)

    async def start_tls(self, context: ssl.SSLContext) -> str:
        """Wrap the stream in TLS (server side) and do the handshake; returns the TLS
        version. Raises ``trio.BrokenResourceError`` if the handshake fails."""
        stream = trio.SSLStream(self.stream, context, server_side=True)
        self.stream = stream
        self._fd = -1
        await stream.do_handshake()
        return stream.version() or "TLS"

    async def receive(self) -> Buffer:
        """The next bytes from the peer (valid until the next call); empty at EOF."""
        fd = self._fd
        if fd < 0:
            return await self.stream.receive_some(RECEIVE_SIZE)
        try:
            n = os.readv(fd, [self._rbuf])
        except BlockingIOError:
            pass
        else:
            # Data was waiting: yield only every few receives, so a chatty client
            # costs fewer scheduler passes yet cannot starve its neighbours.
            self._eager += 1
            if self._eager >= EAGER_RECEIVES:
                self._eager = 0
                await trio.lowlevel.checkpoint()
            return self._rview[:n]
        self._eager = 0
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                n = os.readv(fd, [self._rbuf])
            except BlockingIOError:
                continue
            return self._rview[:n]

    async def send(self, buffers: list[Buffer]) -> None:
        """Send every buffer, in order. Not safe to call concurrently (hold a lock)."""
        fd = self._fd
        if fd < 0:
            await self.stream.send_all(b"".join(buffers))
            return
        pending = buffers
        while True:
            batch = pending[:IOV_BATCH] if len(pending) > IOV_BATCH else pending
            try:
                sent = os.writev(fd, batch)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
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
            await trio.lowlevel.wait_writable(fd)

    async def aclose(self) -> None:
        # Forget the descriptor first: once closed its number may be reused by another
        # socket, and a later receive or send (another task of a client) must fail on
        # the closed stream instead of reading or writing someone else's connection.
        self._fd = -1
        with trio.CancelScope(shield=True):
            with trio.move_on_after(1):
                await self.stream.aclose()
