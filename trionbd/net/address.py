"""Where an NBD server listens, and the URIs that name it.

:class:`Address` is a Unix socket path, a TCP host and port, or an AF_VSOCK context
id and port; :meth:`Address.uri` writes the ``nbd://``, ``nbd+unix://`` or
``nbd+vsock://`` URI a client uses, :func:`parse_uri` reads the first two back. The
server (its listeners) and the client (what it connects to) share both.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from ..protocol.constants import DEFAULT_PORT

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_LOCAL = 1
"""AF_VSOCK context ids: every one (what a listener binds), and this host's loopback."""


@dataclass(frozen=True)
class Address:
    """Where a listener listens, printable as an NBD URI."""

    unix_path: str | None = None
    host: str | None = None
    port: int | None = None
    """The TCP port, or with ``cid`` the AF_VSOCK port."""
    cid: int | None = None
    """An AF_VSOCK address's context id (``VMADDR_CID_ANY`` for a listener on every one)."""

    def uri(self, export: str = "", tls: bool = False) -> str:
        quoted = urllib.parse.quote(export, safe="/")
        scheme = "nbds" if tls else "nbd"
        if self.unix_path is not None:
            sock = urllib.parse.quote(self.unix_path, safe="/")
            return f"{scheme}+unix:///{quoted}?socket={sock}"
        if self.cid is not None:
            # Listening on every context id: name the local one, as nbdkit's $uri does.
            cid = VMADDR_CID_LOCAL if self.cid == VMADDR_CID_ANY else self.cid
            return f"{scheme}+vsock://{cid}:{self.port}/{quoted}"
        # A wildcard address (all interfaces) is nothing to connect to: name this host.
        host = "localhost" if self.host in (None, "", "0.0.0.0", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"{scheme}://{host}{port}/{quoted}"

    def __str__(self) -> str:
        if self.unix_path is not None:
            return self.unix_path
        if self.cid is not None:
            return f"vsock:{self.cid}:{self.port}"
        return f"{self.host}:{self.port}"


def parse_uri(uri: str) -> tuple[Address, str]:
    """The address and export name of an ``nbd://`` or ``nbd+unix://`` URI.

    ``nbd://HOST[:PORT]/EXPORT`` (port 10809 by default, IPv6 hosts in brackets) and
    ``nbd+unix:///EXPORT?socket=PATH``. The export name is the path without its first
    ``/``, percent-decoded. Raises ``ValueError`` saying what is wrong.
    """
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if scheme in ("nbds", "nbds+unix", "nbds+vsock"):
        raise ValueError(f"{uri!r}: TLS ({scheme}://) is not supported by this client")
    if scheme == "nbd+unix":
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise ValueError(f"{uri!r}: nbd+unix:// needs exactly one socket=PATH")
        if parts.netloc:
            raise ValueError(f"{uri!r}: nbd+unix:// takes no host (use nbd+unix:///EXPORT)")
        return Address(unix_path=sockets[0]), export
    if scheme in ("nbd", "nbd+tcp"):
        if not parts.hostname:
            raise ValueError(f"{uri!r}: nbd:// needs a host")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{uri!r}: bad port") from None
        return Address(host=parts.hostname, port=port), export
    raise ValueError(f"{uri!r}: not an NBD URI (nbd://HOST/EXPORT or nbd+unix:///EXPORT?socket=P)")
