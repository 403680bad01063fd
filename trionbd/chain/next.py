"""``Next``: what an open context offers, declared once; and ``Caps``, its capabilities.

A *context* is one export opened for one user: a client connection, or a filter's
lifetime context. What every context offers is the protocol :class:`Next` (nbdkit's
``next``): a filter's callbacks receive the context of the layer below as ``next``, and
the server serves the context of the top layer. Its implementations, each checked
against the protocol by mypy where it is defined or used, are

* :class:`~trionbd.chain.layer.LayerContext`: the context of one layer of a chain and
  everything below it; this is where each layer's generic machinery lives;
* :class:`~trionbd.nursery.LifetimeContext`: a context that the lifetime owns and lends
  to any task until unload; it wraps a layer context, refusing and counting calls;
* :class:`~trionbd.client.ClientContext`: a connection to an NBD server (the ``nbd``
  plugin forwards to one).

Plugin and filter authors write the same callbacks, under the same names, on
:class:`~trionbd.chain.plugin.Plugin` (with the handle first) and
:class:`~trionbd.chain.filter.Filter` (with ``next`` and the handle first);
:class:`~trionbd.chain.forward.ForwardingPlugin` is a plugin whose handles each hold a
context it forwards every callback to.

The capabilities are declared once too: :class:`Caps` holds the answer of each
capability callback, and each of its fields names the callback it comes from
(:data:`CAPABILITIES`). A context asks them once when it opens, in that order, and
answers the ``can_*`` callbacks from them afterwards (:class:`CachedCaps`).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, Protocol, get_args, get_type_hints

from .errors import NBDError
from .types import DEFAULT_BLOCK_SIZE, BlockSize, CacheMode, Extent, FuaMode, ZeroMode


class Next(Protocol):
    """An open context: one export, opened for one user, and what it can do.

    Capability queries answer what was asked once at open. ``flags`` are
    ``trionbd.CmdFlag`` bits; errors are ``NBDError``. A context is closed once, by
    whoever opened it.
    """

    @property
    def name(self) -> str:
        """What serves the context, for messages (the layer's name)."""
        ...

    @property
    def export_name(self) -> str:
        """The export it serves."""
        ...

    # --- capabilities, asked once at open ---------------------------------------------

    async def get_size(self) -> int: ...
    async def can_write(self) -> bool: ...
    async def can_flush(self) -> bool: ...
    async def can_trim(self) -> bool: ...
    async def can_zero(self) -> ZeroMode: ...
    async def can_fast_zero(self) -> bool: ...
    async def can_fua(self) -> FuaMode: ...
    async def can_multi_conn(self) -> bool: ...
    async def can_extents(self) -> bool: ...
    async def can_cache(self) -> CacheMode: ...
    async def is_rotational(self) -> bool: ...
    async def block_size(self) -> BlockSize: ...
    async def export_description(self) -> str | None: ...

    # --- data -------------------------------------------------------------------------

    async def pread(self, count: int, offset: int, flags: int = 0) -> bytes:
        """``count`` bytes at ``offset`` (a ``trionbd.Sparse`` may mark holes)."""
        ...

    async def pwrite(self, buf: bytes, offset: int, flags: int = 0) -> None: ...
    async def flush(self, flags: int = 0) -> None: ...
    async def trim(self, count: int, offset: int, flags: int = 0) -> None: ...
    async def zero(self, count: int, offset: int, flags: int = 0) -> None: ...

    async def extents(self, count: int, offset: int, flags: int = 0) -> list[Extent]:
        """Allocation extents from ``offset`` on: contiguous, inside the range, at least
        one (only one with ``REQ_ONE``)."""
        ...

    async def cache(self, count: int, offset: int, flags: int = 0) -> None: ...

    async def meta_extents(
        self, context: str, count: int, offset: int, flags: int = 0
    ) -> list[Extent]:
        """Block status of metadata context ``context`` (one the export offers besides
        ``base:allocation``, see ``Layer.meta_contexts``) from ``offset`` on, its status
        bits in ``Extent.flags``: contiguous, inside the range, at least one (only one
        with ``REQ_ONE``)."""
        ...

    async def close(self) -> None:
        """Close the context (and, for a layer's context, the one below it)."""
        ...


READ_WRITE = "a read-write open"
"""``Ask.needs`` for ``can_write``: asked only when the context is opened read-write."""


@dataclass(frozen=True, slots=True)
class Ask:
    """Where a field of :class:`Caps` comes from: the callback asked at open and how its
    answer becomes the field's value."""

    callback: str
    convert: Callable[[Any], Any]
    needs: str | None = None
    """An earlier field that must be on (or :data:`READ_WRITE`) for the question to be
    asked; otherwise the field is off (false, ``NONE``) and the callback is not called."""

    def off(self) -> Any:
        return self.convert(0)


def _same(value: Any) -> Any:
    return value  # checked once all is asked: see LayerContext.prepare


def _block_size(value: BlockSize | None) -> BlockSize:
    return BlockSize(*(value or DEFAULT_BLOCK_SIZE))


@dataclass(slots=True)
class Caps:
    """What an open context can do: the answer of each capability callback, asked once
    at open in the order of the fields (each field names its callback)."""

    size: Annotated[int, Ask("get_size", _same)]
    write: Annotated[bool, Ask("can_write", bool, needs=READ_WRITE)]
    flush: Annotated[bool, Ask("can_flush", bool)]
    trim: Annotated[bool, Ask("can_trim", bool, needs="write")]
    zero: Annotated[ZeroMode, Ask("can_zero", ZeroMode, needs="write")]
    fast_zero: Annotated[bool, Ask("can_fast_zero", bool, needs="zero")]
    fua: Annotated[FuaMode, Ask("can_fua", FuaMode, needs="write")]
    """``EMULATE`` (a flush after the write) only with ``flush``; ``NONE`` otherwise."""
    multi_conn: Annotated[bool, Ask("can_multi_conn", bool)]
    extents: Annotated[bool, Ask("can_extents", bool)]
    cache: Annotated[CacheMode, Ask("can_cache", CacheMode)]
    rotational: Annotated[bool, Ask("is_rotational", bool)]
    block_size: Annotated[BlockSize, Ask("block_size", _block_size)]


def _capabilities() -> tuple[tuple[str, Ask], ...]:
    hints = get_type_hints(Caps, include_extras=True)
    return tuple((f.name, get_args(hints[f.name])[1]) for f in fields(Caps))


CAPABILITIES = _capabilities()
"""``(Caps field, Ask)`` for every capability, in the order they are asked at open."""


class CachedCaps:
    """The capability callbacks of :class:`Next`, answered from :attr:`caps`."""

    name: str
    caps: Caps | None
    """The answers, asked once at open (None until then)."""

    def _caps(self) -> Caps:
        caps = self.caps
        if caps is None:
            raise NBDError(errno.EIO, f"{self.name}: context used before it was prepared")
        return caps

    async def get_size(self) -> int:
        return self._caps().size

    async def can_write(self) -> bool:
        return self._caps().write

    async def can_flush(self) -> bool:
        return self._caps().flush

    async def can_trim(self) -> bool:
        return self._caps().trim

    async def can_zero(self) -> ZeroMode:
        return self._caps().zero

    async def can_fast_zero(self) -> bool:
        return self._caps().fast_zero

    async def can_fua(self) -> FuaMode:
        return self._caps().fua

    async def can_multi_conn(self) -> bool:
        return self._caps().multi_conn

    async def can_extents(self) -> bool:
        return self._caps().extents

    async def can_cache(self) -> CacheMode:
        return self._caps().cache

    async def is_rotational(self) -> bool:
        return self._caps().rotational

    async def block_size(self) -> BlockSize:
        return self._caps().block_size
