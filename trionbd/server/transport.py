"""Moving bytes: receive into a reused buffer, send many buffers in one system call.

After :meth:`Transport.start_tls` every byte goes through a ``trio.SSLStream``.
"""

from __future__ import annotations

import ssl

import trio

RECEIVE_SIZE = 256 * 1024
"""Bytes asked for per receive."""
IOV_BATCH = 512
"""Buffers per ``sendmsg`` call (below the kernel's IOV_MAX of 1024)."""

Buffer = bytes | bytearray | memoryview


class Transport:
    """A connection's byte stream with the two operations the server needs fast."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._rbuf = bytearray(RECEIVE_SIZE)
        self._rview = memoryview(self._rbuf)

    async def start_tls(self, context: ssl.SSLContext) -> str:
        """Wrap the stream in TLS (server side) and do the handshake; returns the TLS
        version. Raises ``trio.BrokenResourceError`` if the handshake fails."""
        stream = trio.SSLStream(self.stream, context, server_side=True)
        self.stream = stream
        self._sock = None
        await stream.do_handshake()
        return stream.version() or "TLS"

    async def receive(self) -> Buffer:
        """The next bytes from the peer (valid until the next call); empty at EOF."""
        if self._sock is not None:
            n = await self._sock.recv_into(self._rbuf)
            return self._rview[:n]
        return await self.stream.receive_some(RECEIVE_SIZE)

    async def send(self, buffers: list[Buffer]) -> None:
        """Send every buffer, in order. Not safe to call concurrently (hold a lock)."""
        sock = self._sock
        if sock is None:
            await self.stream.send_all(b"".join(buffers))
            return
        pending = list(buffers)
        while pending:
            batch = pending[:IOV_BATCH]
            sent = await sock.sendmsg(batch)
            done = 0
            for buf in batch:
                size = len(buf)
                if sent < size:
                    break
                sent -= size
                done += 1
            pending = pending[done:]
            if sent:
                pending[0] = memoryview(pending[0])[sent:]

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(1):
                await self.stream.aclose()
