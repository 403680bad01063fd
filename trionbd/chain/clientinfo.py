"""Who is asking: the client connection a callback runs for.

The server sets this for each connection's task (and so for the tasks of its
requests); plugins and filters read it with :func:`current_client`, e.g. to log a
connection id or to treat TLS clients differently. Lifetime work done outside any
connection sees ``None``.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, NamedTuple


class Credentials(NamedTuple):
    """Who connected to a Unix socket: the process and its ids when it connected."""

    pid: int
    uid: int
    gid: int


@dataclass
class ClientInfo:
    """One client connection, as plugins and filters may see it."""

    id: int
    """Connection number, unique for the server's life, starting at 1."""
    peer: str
    """The client's address (``host:port``, or the Unix socket path)."""
    is_tls: bool = False
    export_name: str | None = None
    """The export chosen with GO or EXPORT_NAME (``None`` during negotiation)."""
    family: int = 0
    """The socket's address family (``socket.AF_INET``, ``AF_INET6``, ``AF_UNIX``,
    ``AF_VSOCK``); 0 when the client is not on a socket (``-s`` over pipes)."""
    address: Any = None
    """The client's socket address as :mod:`socket` gives it: ``(host, port)`` for IPv4,
    ``(host, port, flowinfo, scope_id)`` for IPv6, ``(cid, port)`` for AF_VSOCK."""
    credentials: Credentials | None = None
    """On a Unix socket: the connecting process (``SO_PEERCRED``)."""
    certificate_dn: str | None = None
    """After STARTTLS, when the client presented a certificate the server verified
    (``--tls-verify-peer``): its subject's Distinguished Name as RFC 4514 writes it
    (``CN=client.example.com,O=BigCo,C=US``)."""


_current: contextvars.ContextVar[ClientInfo | None] = contextvars.ContextVar(
    "trionbd_client", default=None
)


def current_client() -> ClientInfo | None:
    """The connection the calling task serves, or ``None`` outside any connection."""
    return _current.get()


def set_current_client(info: ClientInfo | None) -> None:
    """Set by the server at the start of a connection's task."""
    _current.set(info)
