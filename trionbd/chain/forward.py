"""``ForwardingPlugin``: a plugin that serves contexts it opened itself.

Its ``open`` returns a handle holding an open context (``h.ctx``, a
:class:`~trionbd.chain.next.Next`: a whole chain opened by the plugin, a lifetime
context, ...); every per-connection callback forwards to that context, written here once.
The context already answers its capabilities and emulates what it lacks, so they pass
through unchanged. :class:`~trionbd.exporttable.ExportTable` is one (its handles hold a
backend's chain), the ``nbd`` plugin another (its handles hold a
:class:`~trionbd.client.ClientContext`: a connection to the upstream server).
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from .next import Next
from .plugin import Plugin
from .types import BlockSize, CacheMode, Extent, FuaMode, ZeroMode


class Forwarded(Protocol):
    """A handle of a :class:`ForwardingPlugin`: what it holds open."""

    @property
    def ctx(self) -> Next: ...


H = TypeVar("H", bound=Forwarded)


class ForwardingPlugin(Plugin, Generic[H]):
    """A plugin whose handles (of type ``H``) hold an open context; every callback
    forwards to it. Subclasses define ``open`` (returning an ``H``) and export lists."""

    async def close(self, h: H) -> None:
        await h.ctx.close()

    async def export_description(self, h: H) -> str | None:
        return await h.ctx.export_description()

    # --- capabilities --------------------------------------------------------------------

    async def get_size(self, h: H) -> int:
        return await h.ctx.get_size()

    async def block_size(self, h: H) -> BlockSize | None:
        return await h.ctx.block_size()

    async def is_rotational(self, h: H) -> bool:
        return await h.ctx.is_rotational()

    async def can_write(self, h: H) -> bool:
        return await h.ctx.can_write()

    async def can_flush(self, h: H) -> bool:
        return await h.ctx.can_flush()

    async def can_trim(self, h: H) -> bool:
        return await h.ctx.can_trim()

    async def can_zero(self, h: H) -> ZeroMode:
        return await h.ctx.can_zero()

    async def can_fast_zero(self, h: H) -> bool:
        return await h.ctx.can_fast_zero()

    async def can_fua(self, h: H) -> FuaMode:
        return await h.ctx.can_fua()

    async def can_multi_conn(self, h: H) -> bool:
        return await h.ctx.can_multi_conn()

    async def can_extents(self, h: H) -> bool:
        return await h.ctx.can_extents()

    async def can_cache(self, h: H) -> CacheMode:
        return await h.ctx.can_cache()

    # --- data ----------------------------------------------------------------------------

    async def pread(self, h: H, count: int, offset: int, flags: int) -> bytes:
        return await h.ctx.pread(count, offset, flags)

    async def pwrite(self, h: H, buf: bytes, offset: int, flags: int) -> None:
        await h.ctx.pwrite(buf, offset, flags)

    async def flush(self, h: H, flags: int) -> None:
        await h.ctx.flush(flags)

    async def trim(self, h: H, count: int, offset: int, flags: int) -> None:
        await h.ctx.trim(count, offset, flags)

    async def zero(self, h: H, count: int, offset: int, flags: int) -> None:
        await h.ctx.zero(count, offset, flags)

    async def extents(self, h: H, count: int, offset: int, flags: int) -> list[Extent]:
        return await h.ctx.extents(count, offset, flags)

    async def cache(self, h: H, count: int, offset: int, flags: int) -> None:
        await h.ctx.cache(count, offset, flags)

    async def meta_extents(
        self, h: H, context: str, count: int, offset: int, flags: int
    ) -> list[Extent]:
        return await h.ctx.meta_extents(context, count, offset, flags)
