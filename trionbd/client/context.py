"""``ClientContext``: a client in transmission as an open context of the chain (a
:class:`~trionbd.chain.next.Next`), so that whatever takes a context can use an
upstream NBD server: the ``nbd`` plugin forwards every callback to one.

The :class:`~.transmission.Client` keeps its own API (synchronous properties for what
was negotiated, the requests as the protocol has them); this adapter answers the
capabilities from the export's transmission flags, as they were when it connected, and
turns the protocol's limits into what a context promises:

* trims, zeroes and caches of any length: a server without extended headers gets them
  in pieces of :data:`COMPACT_PIECE` bytes, one after the other;
* block status of ``base:allocation`` (all data if the server does not offer it) and
  of the other meta contexts negotiated, clipped to the range asked; without extended
  headers it asks about :data:`COMPACT_PIECE` bytes at most (the extents then cover
  less, which callers expect);
* ``CmdFlag.DF`` on a read is dropped for a server that did not offer it (the data
  is the same without it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..chain.layer import clip_extents
from ..chain.next import CachedCaps, Caps, Next
from ..chain.types import DEFAULT_BLOCK_SIZE, CacheMode, Extent, FuaMode, ZeroMode
from ..protocol.constants import BASE_ALLOCATION, CmdFlag, TransmissionFlag
from .transmission import Client

COMPACT_PIECE = 1 << 31
"""The longest trim, zero, cache or block status sent to a server without extended
headers (their lengths have 32 bits)."""


def caps_of(client: Client) -> Caps:
    """The capabilities of the client's export, from its transmission flags."""
    write = not client.is_read_only
    return Caps(
        size=client.size,
        write=write,
        flush=client.can_flush,
        trim=write and client.can_trim,
        zero=ZeroMode.NATIVE if write and client.can_zero else ZeroMode.NONE,
        fast_zero=write and client.can_zero and client.can_fast_zero,
        fua=FuaMode.NATIVE if write and client.can_fua else FuaMode.NONE,
        multi_conn=client.can_multi_conn,
        extents=client.can_block_status,
        cache=CacheMode.NATIVE if client.can_cache else CacheMode.NONE,
        rotational=client.is_rotational,
        block_size=client.block_size or DEFAULT_BLOCK_SIZE,
    )


class ClientContext(CachedCaps):
    """A running :class:`Client` as a :class:`~trionbd.chain.next.Next`; closing the
    context closes the client (:meth:`Client.aclose`).

    ``name`` names it in messages (by default the client's peer).
    """

    def __init__(self, client: Client, name: str | None = None):
        self.client = client
        self.name = name or client.peer
        self.export_name = client.export_name
        self.caps = caps_of(client)
        self._pieces = not client.extended
        self._read_flags = ~0 if client.flags & TransmissionFlag.SEND_DF else ~CmdFlag.DF

    def __repr__(self) -> str:
        return f"<ClientContext {self.client!r}>"

    async def export_description(self) -> str | None:
        return self.client.description

    async def close(self) -> None:
        await self.client.aclose()

    # --- data ----------------------------------------------------------------------------

    async def pread(self, count: int, offset: int, flags: int = 0) -> bytes:
        return await self.client.pread(count, offset, flags & self._read_flags)

    async def pwrite(self, buf: bytes, offset: int, flags: int = 0) -> None:
        await self.client.pwrite(buf, offset, flags)

    async def flush(self, flags: int = 0) -> None:
        await self.client.flush(flags)

    async def trim(self, count: int, offset: int, flags: int = 0) -> None:
        await self._in_pieces(self.client.trim, count, offset, flags)

    async def zero(self, count: int, offset: int, flags: int = 0) -> None:
        await self._in_pieces(self.client.zero, count, offset, flags)

    async def cache(self, count: int, offset: int, flags: int = 0) -> None:
        await self._in_pieces(self.client.cache, count, offset, flags)

    async def extents(self, count: int, offset: int, flags: int = 0) -> list[Extent]:
        """``base:allocation``; all data if the server does not offer it."""
        if not self._caps().extents:
            return [Extent(offset, count, 0)]
        return await self.meta_extents(BASE_ALLOCATION, count, offset, flags)

    async def meta_extents(
        self, context: str, count: int, offset: int, flags: int = 0
    ) -> list[Extent]:
        asked = min(count, COMPACT_PIECE) if self._pieces else count
        raw = await self.client.block_status(asked, offset, flags, context=context)
        return clip_extents(self.name, raw, asked, offset, bool(flags & CmdFlag.REQ_ONE))

    async def _in_pieces(
        self, call: Callable[[int, int, int], Awaitable[None]], count: int, offset: int, flags: int
    ) -> None:
        """``call(count, offset, flags)`` at once with extended headers, else in pieces of
        at most COMPACT_PIECE bytes, one after the other."""
        if not self._pieces:
            await call(count, offset, flags)
            return
        end = offset + count
        while offset < end:
            n = min(COMPACT_PIECE, end - offset)
            await call(n, offset, flags)
            offset += n


if TYPE_CHECKING:
    _checked: type[Next] = ClientContext  # mypy: a ClientContext is a Next
