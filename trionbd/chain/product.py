"""Helpers for filters whose exports are the product shape: ``BELOW/ITEM``.

A filter in this shape combines each export of the layer below with items of its own
(the tar filter over ``file dir=DIR``: every member of every archive). Names are
``BELOWEXPORT/ITEM``; an incoming name is split by matching the known names of the
layer below, longest first, so names below may themselves contain ``/``. When the
layer below has only its unnamed default export, names are just ``ITEM``.

Per-export state (an archive's member map) is typically built on first use and kept;
:class:`BuildOnce` does that safely when several clients ask at the same moment.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

import trio

from .errors import NBDError
from .layer import Layer
from .types import Export, each_export

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ProductNames:
    """The names of the layer below, and how to join and split product names."""

    def __init__(self, below: Iterable[Export]):
        self.below = [e.name for e in below]
        self._known = set(self.below)
        self.single = self.below == [""]
        """True when the layer below has only its unnamed default export."""

    @classmethod
    async def of(cls, below: Layer, readonly: bool, is_tls: bool) -> ProductNames:
        return cls([e async for e in each_export(await below.list_exports(readonly, is_tls))])

    def __contains__(self, name: str) -> bool:
        """Whether ``name`` is an export of the layer below."""
        return name in self._known

    def shown(self) -> str:
        """The names of the layer below for a message: the first five, and how many more."""
        shown = ", ".join(repr(n) for n in self.below[:5])
        return shown + (f" and {len(self.below) - 5} more" if len(self.below) > 5 else "")

    def join(self, below: str, item: str) -> str:
        return item if self.single else f"{below}/{item}"

    def split(self, name: str) -> tuple[str, str]:
        """``(below_export, item)`` for a product name; ``NBDError(ENOENT)`` if no
        export of the layer below is a prefix of ``name``."""
        if self.single:
            return "", name
        end = len(name)
        while (end := name.rfind("/", 0, end)) != -1:
            if name[:end] in self._known:
                return name[:end], name[end + 1 :]
        raise NBDError(
            errno.ENOENT,
            f"no export named {name!r}: names are EXPORT/ITEM with EXPORT one of {self.shown()}",
        )


class BuildOnce(Generic[K, V]):
    """A per-key cache of values built by an async function, at most once per key.

    Concurrent callers for the same key wait for the one build. A build that raises
    ``NBDError`` is remembered too (a corrupt archive stays corrupt) unless
    ``remember_errors`` is false (a server that was down may be back); other exceptions,
    including cancellation, are never remembered, and the next caller tries again.
    """

    def __init__(self, build: Callable[[K], Awaitable[V]], *, remember_errors: bool = True):
        self._build = build
        self._remember_errors = remember_errors
        self._done: dict[K, V | NBDError] = {}
        self._running: dict[K, trio.Event] = {}

    async def get(self, key: K) -> V:
        while True:
            if key in self._done:
                value = self._done[key]
                if isinstance(value, NBDError):
                    raise value
                return value
            running = self._running.get(key)
            if running is None:
                break
            await running.wait()
        event = self._running[key] = trio.Event()
        try:
            self._done[key] = await self._build(key)
        except NBDError as e:
            if not self._remember_errors:
                raise
            self._done[key] = e
        finally:
            del self._running[key]
            event.set()
        return await self.get(key)

    def cached(self) -> dict[K, V]:
        """The values built successfully so far."""
        return {k: v for k, v in self._done.items() if not isinstance(v, NBDError)}
