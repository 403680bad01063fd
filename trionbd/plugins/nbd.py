"""nbd: proxy another NBD server.

Every client connection opens one connection to the upstream server (put
``--filter=shared`` in front to make all clients share one). Requests are forwarded as
they come, pipelined on that connection, with their flags; errors come back with the
upstream's error code and message. The export advertises exactly what the upstream
export does: read-only, flush, FUA, trim, zero, fast zero, cache, multi-conn,
rotational, block sizes, and block status when the upstream offers ``base:allocation``.

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
from typing import TYPE_CHECKING

import trio

from ..chain import (
    BlockSize,
    CacheMode,
    Concurrency,
    ConfigError,
    Export,
    Extent,
    FuaMode,
    NBDError,
    Param,
    Plugin,
    ZeroMode,
    parse_int,
)
from ..client import Address, Client, connect, handshake, open_stream, parse_uri
from ..protocol.constants import DEFAULT_PORT, CmdFlag, TransmissionFlag

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ..nursery import Lifetime

COMPACT_PIECE = 1 << 31
"""The longest trim, zero, cache or block status sent to an upstream server without
extended headers (their lengths have 32 bits)."""


class NbdPlugin(Plugin):
    """Forward every request to another NBD server."""

    name = "nbd"
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

    @property
    def _peer(self) -> str:
        return f"nbd: upstream {self.address}"

    # --- per connection ------------------------------------------------------------------

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> Client:
        if self._nursery is None:
            raise NBDError(errno.EIO, "nbd: the plugin was opened before after_fork")
        name = self.export if self.export is not None else export_name
        client = await connect(await open_stream(self.address), name, peer=self._peer)
        try:
            await self._nursery.start(client.run)
        except BaseException:
            await client.aclose()
            raise
        return client

    async def close(self, h: Client) -> None:
        await h.aclose()

    async def export_description(self, h: Client) -> str | None:
        return h.description

    async def get_size(self, h: Client) -> int:
        return h.size

    async def block_size(self, h: Client) -> BlockSize | None:
        return h.block_size

    async def is_rotational(self, h: Client) -> bool:
        return h.is_rotational

    async def can_write(self, h: Client) -> bool:
        return not h.is_read_only

    async def can_flush(self, h: Client) -> bool:
        return h.can_flush

    async def can_trim(self, h: Client) -> bool:
        return h.can_trim

    async def can_zero(self, h: Client) -> ZeroMode:
        return ZeroMode.NATIVE if h.can_zero else ZeroMode.NONE

    async def can_fast_zero(self, h: Client) -> bool:
        return h.can_fast_zero

    async def can_fua(self, h: Client) -> FuaMode:
        return FuaMode.NATIVE if h.can_fua else FuaMode.NONE

    async def can_multi_conn(self, h: Client) -> bool:
        return h.can_multi_conn

    async def can_extents(self, h: Client) -> bool:
        return h.can_block_status

    async def can_cache(self, h: Client) -> CacheMode:
        return CacheMode.NATIVE if h.can_cache else CacheMode.NONE

    # --- data ----------------------------------------------------------------------------

    async def pread(self, h: Client, count: int, offset: int, flags: int) -> bytes:
        if not h.flags & TransmissionFlag.SEND_DF:
            flags &= ~CmdFlag.DF  # our server offers DF; the data is the same without it
        return await h.pread(count, offset, flags)

    async def pwrite(self, h: Client, buf: bytes, offset: int, flags: int) -> None:
        await h.pwrite(buf, offset, flags)

    async def flush(self, h: Client, flags: int) -> None:
        await h.flush(flags)

    async def trim(self, h: Client, count: int, offset: int, flags: int) -> None:
        await _in_pieces(h, h.trim, count, offset, flags)

    async def zero(self, h: Client, count: int, offset: int, flags: int) -> None:
        await _in_pieces(h, h.zero, count, offset, flags)

    async def extents(self, h: Client, count: int, offset: int, flags: int) -> list[Extent]:
        if not h.extended:
            count = min(count, COMPACT_PIECE)
        return await h.block_status(count, offset, flags)

    async def cache(self, h: Client, count: int, offset: int, flags: int) -> None:
        await _in_pieces(h, h.cache, count, offset, flags)


async def _in_pieces(
    h: Client, call: Callable[[int, int, int], Awaitable[None]], count: int, offset: int, flags: int
) -> None:
    """``call(count, offset, flags)`` at once with extended headers, else in pieces of at
    most COMPACT_PIECE bytes, one after the other."""
    if h.extended:
        await call(count, offset, flags)
        return
    end = offset + count
    while offset < end:
        n = min(COMPACT_PIECE, end - offset)
        await call(n, offset, flags)
        offset += n


PLUGIN = NbdPlugin
