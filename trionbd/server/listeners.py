"""Listening sockets: Unix, TCP (IPv4 and IPv6), AF_VSOCK. Where they listen is an
:class:`~trionbd.net.Address`. A socket that cannot listen raises :class:`ListenError`,
which says where and why in one line (``127.0.0.1:10809: address already in use``)."""

from __future__ import annotations

import errno
import os
import socket as _stdlib_socket
import stat
import tempfile

import trio

from ..net.address import Address

BACKLOG = _stdlib_socket.SOMAXCONN
"""Connections the kernel queues before we accept them (as nbdkit: SOMAXCONN; the kernel
caps it at net.core.somaxconn). With 128, a burst of 200 clients overflowed the queue:
a Unix client then gets EAGAIN from connect, which Trio's client takes for success."""


class ListenError(OSError):
    """Listening failed: ``where`` is the socket path or ``HOST:PORT``; ``errno`` is the
    system's error (``None`` when it was not a system call that failed)."""

    def __init__(self, where: str, error: OSError | str):
        if isinstance(error, str):
            super().__init__(error)
            self.reason = error
        else:
            super().__init__(error.errno, error.strerror)
            text = error.strerror or str(error)
            self.reason = text[:1].lower() + text[1:]
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_of(listening: trio.SocketListener | _stdlib_socket.socket) -> Address:
    """Where a listener, or a plain listening socket, listens."""
    sock = listening.socket if isinstance(listening, trio.SocketListener) else listening
    if sock.family == _stdlib_socket.AF_UNIX:
        return Address(unix_path=str(sock.getsockname()))
    if sock.family == _stdlib_socket.AF_VSOCK:
        cid, port = sock.getsockname()
        return Address(cid=cid, port=port)
    host, port = sock.getsockname()[:2]
    return Address(host=host, port=port)


def bind_unix(path: str) -> _stdlib_socket.socket:
    """A plain socket listening on a Unix socket at ``path`` (an existing socket file is
    replaced). Plain sockets can be opened before forking and Trio starts."""
    try:
        sock = _stdlib_socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    except OSError as e:
        raise ListenError(path, e) from e
    try:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ListenError(path, e) from e
    except BaseException:
        sock.close()
        raise
    return sock


def bind_tcp(
    port: int, host: str | None = None, family: int = _stdlib_socket.AF_UNSPEC
) -> list[_stdlib_socket.socket]:
    """Plain sockets listening on TCP; without ``host``, on every address (IPv4 and
    IPv6, each family its own socket). Port 0 picks a free port. ``family``
    (``AF_INET`` or ``AF_INET6``: ``-4``, ``-6``) keeps to one family, for the every
    address listening and for the addresses ``host`` resolves to."""
    try:
        infos = _stdlib_socket.getaddrinfo(
            host, port, family, _stdlib_socket.SOCK_STREAM, flags=_stdlib_socket.AI_PASSIVE
        )
    except OSError as e:
        raise ListenError(_host_port(host or "*", port), e) from e
    socks: list[_stdlib_socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in infos:
            where = _host_port(str(sockaddr[0]), port)
            try:
                sock = _stdlib_socket.socket(family, kind, proto)
            except OSError as e:
                if e.errno == errno.EAFNOSUPPORT:  # e.g. no IPv6 on this machine
                    continue
                raise ListenError(where, e) from e
            socks.append(sock)
            try:
                sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEADDR, 1)
                if family == _stdlib_socket.AF_INET6:
                    sock.setsockopt(_stdlib_socket.IPPROTO_IPV6, _stdlib_socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(BACKLOG)
            except OSError as e:
                raise ListenError(where, e) from e
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise ListenError(_host_port(host or "*", port), "no usable address family")
    return socks


def bind_vsock(port: int) -> _stdlib_socket.socket:
    """A plain socket listening on AF_VSOCK ``port`` of every context id (the host's, a
    guest's, the local loopback's), as nbdkit's ``--vsock``. Port 0 picks a free port
    (as for TCP; AF_VSOCK itself calls that port ``VMADDR_PORT_ANY``)."""
    where = f"vsock port {port}"
    try:
        sock = _stdlib_socket.socket(_stdlib_socket.AF_VSOCK, _stdlib_socket.SOCK_STREAM)
    except OSError as e:
        raise ListenError(where, e) from e
    try:
        sock.bind((_stdlib_socket.VMADDR_CID_ANY, port or _stdlib_socket.VMADDR_PORT_ANY))
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ListenError(where, e) from e
    return sock


def as_listener(sock: _stdlib_socket.socket) -> trio.SocketListener:
    """Hand a listening plain socket (bound here, inherited, or passed by systemd) to Trio."""
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def open_unix_listener(path: str) -> trio.SocketListener:
    """Listen on a Unix socket at ``path`` (an existing socket file is replaced)."""
    return as_listener(bind_unix(path))


def private_socket_path() -> str:
    """A socket path in a new private directory (for ``-U -``)."""
    try:
        return os.path.join(tempfile.mkdtemp(prefix="trionbd"), "socket")
    except OSError as e:
        raise ListenError(tempfile.gettempdir(), e) from e


async def open_tcp_listeners(port: int, host: str | None = None) -> list[trio.SocketListener]:
    """Listen on TCP; without ``host``, on every address (IPv4 and IPv6)."""
    return [as_listener(sock) for sock in bind_tcp(port, host)]


def listen(spec: str) -> list[trio.SocketListener]:
    """Listen where ``spec`` says: ``unix:PATH``, ``tcp:HOST:PORT`` (an IPv6 host in
    brackets: ``tcp:[::1]:10809``) or ``tcp:PORT`` (every address). Port 0 picks a free
    port. Raises ``ValueError`` for a malformed ``spec``, :class:`ListenError` (an
    ``OSError``) if binding fails."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return [as_listener(bind_unix(rest))]
    if kind == "tcp":
        host, colon, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            host = ""  # an IPv6 address must be in brackets
        if port.isdigit() and int(port) < 65536 and (host or not colon):
            return [as_listener(sock) for sock in bind_tcp(int(port), host or None)]
    raise ValueError(f"{spec!r} is not a listening address (unix:PATH, tcp:HOST:PORT or tcp:PORT)")
