"""A filter for unit tests: put under the filter being tested, it records every request
that reaches it and can pretend to lack capabilities."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from trionbd.chain import CacheMode, Chain, Extent, Filter, FuaMode, Next, Plugin, ZeroMode


class Recording(Filter):
    """Passes everything down and appends ``(command, length, offset, flags)`` to
    :attr:`calls` (``("flush", 0, 0, flags)`` for flushes). ``caps`` overrides answers
    of capability callbacks by name (``can_fua=FuaMode.NONE``)."""

    name = "recording"

    def __init__(self, **caps: Any) -> None:
        self.calls: list[tuple[str, int, int, int]] = []
        self.caps = caps

    def commands(self) -> list[str]:
        return [c[0] for c in self.calls]

    async def _cap(self, name: str, next: Next) -> Any:
        if name in self.caps:
            return self.caps[name]
        return await getattr(next, name)()

    async def can_write(self, next: Next, h: Any) -> bool:
        return bool(await self._cap("can_write", next))

    async def can_flush(self, next: Next, h: Any) -> bool:
        return bool(await self._cap("can_flush", next))

    async def can_fua(self, next: Next, h: Any) -> FuaMode:
        return FuaMode(await self._cap("can_fua", next))

    async def can_zero(self, next: Next, h: Any) -> ZeroMode:
        return ZeroMode(await self._cap("can_zero", next))

    async def can_fast_zero(self, next: Next, h: Any) -> bool:
        return bool(await self._cap("can_fast_zero", next))

    async def can_trim(self, next: Next, h: Any) -> bool:
        return bool(await self._cap("can_trim", next))

    async def can_multi_conn(self, next: Next, h: Any) -> bool:
        return bool(await self._cap("can_multi_conn", next))

    async def can_extents(self, next: Next, h: Any) -> bool:
        return bool(await self._cap("can_extents", next))

    async def can_cache(self, next: Next, h: Any) -> CacheMode:
        return CacheMode(await self._cap("can_cache", next))

    async def pread(self, next: Next, h: Any, count: int, offset: int, flags: int) -> bytes:
        self.calls.append(("pread", count, offset, flags))
        return await next.pread(count, offset, flags)

    async def pwrite(self, next: Next, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.calls.append(("pwrite", len(buf), offset, flags))
        await next.pwrite(buf, offset, flags)

    async def flush(self, next: Next, h: Any, flags: int) -> None:
        self.calls.append(("flush", 0, 0, flags))
        await next.flush(flags)

    async def trim(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("trim", count, offset, flags))
        await next.trim(count, offset, flags)

    async def zero(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("zero", count, offset, flags))
        await next.zero(count, offset, flags)

    async def extents(
        self, next: Next, h: Any, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        self.calls.append(("extents", count, offset, flags))
        return await next.extents(count, offset, flags)

    async def cache(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("cache", count, offset, flags))
        await next.cache(count, offset, flags)


def recorded(plugin: Plugin, top: Filter, **caps: Any) -> tuple[Chain, Recording]:
    """``top`` over a :class:`Recording` (with ``caps``) over ``plugin``."""
    recording = Recording(**caps)
    return Chain(plugin, [top, recording]), recording
