"""Listening sockets: Unix, TCP (IPv4 and IPv6), and the URIs clients use to reach them."""

from __future__ import annotations

import os
import socket as _stdlib_socket
import stat
import tempfile
import urllib.parse
from dataclasses import dataclass

import trio

from ..protocol.constants import DEFAULT_PORT

BACKLOG = 128


@dataclass(frozen=True)
class Address:
    """Where a listener listens, printable as an NBD URI."""

    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    def uri(self, export: str = "", tls: bool = False) -> str:
        quoted = urllib.parse.quote(export, safe="/")
        scheme = "nbds" if tls else "nbd"
        if self.unix_path is not None:
            sock = urllib.parse.quote(self.unix_path, safe="/")
            return f"{scheme}+unix:///{quoted}?socket={sock}"
        # A wildcard address (all interfaces) is nothing to connect to: name this host.
        host = "localhost" if self.host in (None, "", "0.0.0.0", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"{scheme}://{host}{port}/{quoted}"

    def __str__(self) -> str:
        if self.unix_path is not None:
            return self.unix_path
        return f"{self.host}:{self.port}"


def address_of(listener: trio.SocketListener) -> Address:
    sock = listener.socket
    if sock.family == _stdlib_socket.AF_UNIX:
        return Address(unix_path=str(sock.getsockname()))
    host, port = sock.getsockname()[:2]
    return Address(host=host, port=port)


async def open_unix_listener(path: str) -> trio.SocketListener:
    """Listen on a Unix socket at ``path`` (an existing socket file is replaced)."""
    sock = trio.socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    try:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        await sock.bind(path)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def private_socket_path() -> str:
    """A socket path in a new private directory (for ``-U -``)."""
    return os.path.join(tempfile.mkdtemp(prefix="trionbd"), "socket")


async def open_tcp_listeners(port: int, host: str | None = None) -> list[trio.SocketListener]:
    """Listen on TCP; without ``host``, on every address (IPv4 and IPv6)."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=BACKLOG)
    return [listener for listener in listeners if isinstance(listener, trio.SocketListener)]
