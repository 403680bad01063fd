"""nbd: proxy another NBD server.

Every client connection opens one connection to the upstream server (put
``--filter=shared`` in front to make all clients share one). Requests are forwarded as
they come, pipelined on that connection, with their flags; errors come back with the
upstream's error code and message. The export advertises exactly what the upstream
export does: read-only, flush, FUA, trim, zero, fast zero, cache, multi-conn,
rotational, block sizes, and block status when the upstream offers ``base:allocation``.
The metadata contexts the upstream offers for an export besides ``base:allocation``
(qemu-nbd's and the dirty-bitmap filter's ``qemu:dirty-bitmap:NAME``, qemu-nbd's
``qemu:allocation-depth``) are offered with it, and their block status comes from the
upstream: a backup tool reads a dirty bitmap through the proxy as it would directly.
To know them, a client's ``NBD_OPT_LIST_META_CONTEXT`` or ``SET_META_CONTEXT`` is
answered after a short handshake with the upstream (as ``NBD_OPT_LIST`` is), and each
connection upstream lists them before it selects them all.

Export names: with ``export=NAME`` (or a URI naming an export) every client gets that
upstream export, whatever name it asks for. Without one the proxy is transparent: a
client's export name goes to the upstream server, the export list is the upstream's
list, and the default export is the upstream's default (asked with ``NBD_OPT_INFO``).

The connection upstream negotiates extended headers when the upstream server offers
them, so that trims, zeroes, caches and block status of 4 GiB and more pass through in
one request; an upstream without them gets such trims, zeroes and caches in pieces of
2 GiB, and block status asks it about 2 GiB at most (the client asks again for the rest).

If the upstream server goes away, requests in flight and all later requests on that
connection fail with EIO and a message saying so; new clients are refused until the
upstream is back.

The upstream server is given by one of ``uri``, ``socket`` and ``hostname``.

Examples:
  trionbd nbd socket=/tmp/upstream.sock
  trionbd nbd nbd://fileserver/disk.img
  trionbd --filter=shared nbd hostname=fileserver export=disk.img
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..chain import (
    Concurrency,
    ConfigError,
    Export,
    ForwardingPlugin,
    NBDError,
    Param,
    parse_int,
)
from ..client import (
    Address,
    ClientContext,
    Handshake,
    OptionError,
    handshake,
    open_stream,
    parse_uri,
)
from ..protocol.constants import BASE_ALLOCATION, DEFAULT_PORT

if TYPE_CHECKING:
    from ..nursery import Lifetime


@dataclass(eq=False, slots=True)
class Upstream:
    """The handle: one connection to the upstream server, as a context."""

    ctx: ClientContext


class NbdPlugin(ForwardingPlugin[Upstream]):
    """Forward every request to another NBD server."""

    name = "nbd"
    process_safe = True  # each client gets its own upstream connection anyway
    params = (
        Param(
            "uri",
            "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH",
            metavar="URI",
        ),
        Param("socket", "the upstream server's Unix socket", metavar="PATH"),
        Param("hostname", "the upstream server's host name or address (TCP)", metavar="HOST"),
        Param(
            "port",
            "its TCP port, with hostname only",
            parse_int,
            metavar="PORT",
            default=str(DEFAULT_PORT),
        ),
        Param(
            "export",
            "the upstream export (default: the one each client asks for)",
            metavar="NAME",
        ),
    )
    magic_param = "uri"
    nonblocking = False  # every request waits on the network
    concurrency = Concurrency.PARALLEL  # the client pipelines requests on one connection

    def __init__(
        self,
        uri: str | None = None,
        socket: str | None = None,
        hostname: str | None = None,
        port: int | None = None,
        export: str | None = None,
    ):
        given = [k for k, v in (("uri", uri), ("socket", socket), ("hostname", hostname)) if v]
        if len(given) != 1:
            raise ConfigError("nbd: give exactly one of uri=, socket= or hostname=")
        if port is not None and hostname is None:
            raise ConfigError("nbd: port= goes with hostname= (put the port in the URI)")
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"nbd: port {port} is not a TCP port")
        self.export = export
        """The fixed upstream export, or ``None``: pass each client's name through."""
        if uri is not None:
            try:
                self.address, uri_export = parse_uri(uri)
            except ValueError as e:
                raise ConfigError(f"nbd: {e}") from None
            if uri_export:
                if export is not None:
                    raise ConfigError("nbd: the URI names an export; do not add export=")
                self.export = uri_export
        elif socket is not None:
            self.address = Address(unix_path=socket)
        else:
            self.address = Address(host=hostname, port=port or DEFAULT_PORT)
        self._nursery: trio.Nursery | None = None

    async def after_fork(self, lifetime: Lifetime) -> None:
        # Each connection's reader task runs here: it must outlive the client task
        # that opened the connection, until close (or unload) ends it.
        self._nursery = lifetime.nursery

    # --- exports -------------------------------------------------------------------------

    async def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        if self.export is not None:
            return [Export(self.export)]
        async with await handshake(await open_stream(self.address), peer=self._peer) as h:
            return await h.list_exports()

    async def default_export(self, readonly: bool, is_tls: bool) -> str:
        if self.export is not None:
            return self.export
        async with await handshake(await open_stream(self.address), peer=self._peer) as h:
            return (await h.info("")).name

    async def meta_contexts(self, readonly: bool, export_name: str, is_tls: bool) -> list[str]:
        async with await handshake(await open_stream(self.address), peer=self._peer) as h:
            return await _offered(h, self._upstream_name(export_name))

    def _upstream_name(self, export_name: str) -> str:
        return self.export if self.export is not None else export_name

    @property
    def _peer(self) -> str:
        return f"nbd: upstream {self.address}"

    # --- per connection ------------------------------------------------------------------

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> Upstream:
        if self._nursery is None:
            raise NBDError(errno.EIO, "nbd: the plugin was opened before after_fork")
        name = self._upstream_name(export_name)
        h = await handshake(await open_stream(self.address), peer=self._peer)
        try:
            client = await h.go(name, meta_contexts=await _offered(h, name))
        except BaseException:
            await h.aclose()
            raise
        try:
            await self._nursery.start(client.run)
        except BaseException:
            await client.aclose()
            raise
        return Upstream(ClientContext(client, self._peer))


async def _offered(h: Handshake, export: str) -> list[str]:
    """The meta contexts the upstream offers for ``export`` besides ``base:allocation``:
    none if it has no structured replies (it could not answer their block status) or
    refuses to list them (an unknown export is then refused by GO, as without them)."""
    if not h.structured:
        return []
    try:
        listed = await h.list_meta_contexts(export)
    except OptionError:
        return []
    return [name for name in listed if name != BASE_ALLOCATION]


PLUGIN = NbdPlugin
