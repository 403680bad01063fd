"""An async NBD client on Trio, built on the sans-IO :class:`~trionbd.protocol.ClientConnection`.

Connect, negotiate and enter transmission in one call, then use the client inside
``async with`` (which runs its reader task and disconnects at the end)::

    import trionbd.client

    async with await trionbd.client.connect_unix("/tmp/sock", export="disk") as nbd:
        data = await nbd.pread(4096, 0)
        await nbd.pwrite(b"x" * 512, 8192, trionbd.client.CmdFlag.FUA)

Any number of tasks may issue requests on one client at the same time: they are
pipelined on the connection and each caller gets its own reply. To keep a client
longer than one ``async with`` block, run its reader in a nursery you own and close it
yourself (the ``nbd`` plugin does this with the lifetime nursery)::

    client = await trionbd.client.connect_uri("nbd://server/disk")
    await nursery.start(client.run)
    ...
    await client.aclose()          # run() returns

Export lists and export details come from the handshake (option) phase::

    async with await trionbd.client.handshake(await trionbd.client.open_stream(addr)) as h:
        exports = await h.list_exports()
        details = await h.info("disk")

Negotiation: fixed newstyle only; extended headers (64-bit lengths for trim, zero, cache
and block status) are requested, else structured replies, and the ``base:allocation``
meta context (plus those given as ``meta_contexts``, such as ``qemu:dirty-bitmap:NAME``;
``Handshake.list_meta_contexts`` asks which there are); ``NBD_OPT_GO`` (asking for the
canonical name, description and block sizes) falls back to ``NBD_OPT_EXPORT_NAME``
when the server answers ``NBD_REP_ERR_UNSUP`` (and extended headers were not
negotiated). No TLS.
``extended_headers=False`` keeps to compact headers, ``structured_replies=False`` to
simple replies (and compact headers).

Errors are :class:`~trionbd.chain.NBDError` subclasses carrying a host ``errno``:

* :class:`RequestError` — the server answered one request with an error (``.error`` is
  the NBD error value, ``.message`` the server's message); the connection stays usable.
* :class:`OptionError` — the server refused an option (no such export, ...).
* :class:`ConnectionFailed` (``EIO``) — the connection could not be made or is gone:
  every request in flight and every later one raises it, promptly.

The client sends requests as given and does not check them against the export's
flags; the server judges them (and says why in its error message).

:class:`ClientContext` wraps a running client as an open context of the chain
(``trionbd.chain.Next``), with the capabilities as async callbacks, trims and zeroes of
any length, and extents clipped as a context's are; the ``nbd`` plugin forwards to one.

Inside: :mod:`.handshake` (the option phase, :class:`Handshake`), :mod:`.transmission`
(:class:`Client`), :mod:`.context` (:class:`ClientContext`), :mod:`.errors`; connecting
is here. Addresses and URIs come from
:mod:`trionbd.net`, shared with the server.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ..net.address import Address, parse_uri
from ..protocol.client import ExportInfo
from ..protocol.constants import DEFAULT_PORT, CmdFlag, TransmissionFlag
from .context import ClientContext
from .errors import ConnectionFailed, OptionError, RequestError, describe
from .handshake import Handshake, handshake
from .transmission import Client

__all__ = [
    "Address",
    "Client",
    "ClientContext",
    "CmdFlag",
    "ConnectionFailed",
    "ExportInfo",
    "Handshake",
    "OptionError",
    "RequestError",
    "TransmissionFlag",
    "connect",
    "connect_tcp",
    "connect_unix",
    "connect_uri",
    "handshake",
    "open_stream",
    "parse_uri",
]


async def open_stream(address: Address) -> trio.SocketStream:
    """A socket connected to ``address`` (Unix or TCP); ``ConnectionFailed`` if it fails."""
    try:
        if address.unix_path is not None:
            return await trio.open_unix_socket(address.unix_path)
        assert address.host is not None
        return await trio.open_tcp_stream(address.host, address.port or DEFAULT_PORT)
    except OSError as e:
        raise ConnectionFailed(f"cannot connect to {address}: {describe(e)}") from e


async def connect(
    stream: trio.abc.Stream,
    export: str = "",
    *,
    structured_replies: bool = True,
    extended_headers: bool = True,
    base_allocation: bool = True,
    meta_contexts: Sequence[str] = (),
    peer: str = "NBD server",
) -> Client:
    """Negotiate ``export`` on an open ``stream`` and return the client in transmission.

    The stream belongs to the client (it is closed if negotiation fails). ``peer``
    names the server in error messages. ``base_allocation`` and ``meta_contexts`` are
    the meta contexts to select (see :meth:`Handshake.go`).
    """
    h = await handshake(
        stream,
        structured_replies=structured_replies,
        extended_headers=extended_headers,
        peer=peer,
    )
    try:
        return await h.go(export, base_allocation=base_allocation, meta_contexts=meta_contexts)
    except BaseException:
        await h.aclose()
        raise


async def connect_unix(
    path: str,
    export: str = "",
    *,
    structured_replies: bool = True,
    extended_headers: bool = True,
    base_allocation: bool = True,
    meta_contexts: Sequence[str] = (),
) -> Client:
    """Connect to a server on a Unix socket and negotiate ``export``."""
    address = Address(unix_path=path)
    return await _connect_to(
        address, export, structured_replies, extended_headers, base_allocation, meta_contexts
    )


async def connect_tcp(
    host: str,
    port: int = DEFAULT_PORT,
    export: str = "",
    *,
    structured_replies: bool = True,
    extended_headers: bool = True,
    base_allocation: bool = True,
    meta_contexts: Sequence[str] = (),
) -> Client:
    """Connect to a server over TCP and negotiate ``export``."""
    address = Address(host=host, port=port)
    return await _connect_to(
        address, export, structured_replies, extended_headers, base_allocation, meta_contexts
    )


async def connect_uri(
    uri: str,
    *,
    structured_replies: bool = True,
    extended_headers: bool = True,
    base_allocation: bool = True,
    meta_contexts: Sequence[str] = (),
) -> Client:
    """Connect to the server and export an ``nbd://`` or ``nbd+unix://`` URI names
    (``ValueError`` for a bad URI)."""
    address, export = parse_uri(uri)
    return await _connect_to(
        address, export, structured_replies, extended_headers, base_allocation, meta_contexts
    )


async def _connect_to(
    address: Address,
    export: str,
    structured_replies: bool,
    extended_headers: bool,
    base_allocation: bool,
    meta_contexts: Sequence[str],
) -> Client:
    return await connect(
        await open_stream(address),
        export,
        structured_replies=structured_replies,
        extended_headers=extended_headers,
        base_allocation=base_allocation,
        meta_contexts=meta_contexts,
        peer=str(address),
    )
