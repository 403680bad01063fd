"""The ``Plugin`` base class: the bottom of every chain, where the data lives.

Callbacks are named after nbdkit's so its users feel at home. Every one has a default;
a plugin must define at least ``get_size`` and ``pread``. Data callbacks receive the
handle that ``open`` returned. Capabilities follow from what is defined: a plugin with
``pwrite`` is writable, one with ``flush`` can flush (and gets FUA emulated by a flush),
one without ``zero`` gets zeroing emulated with writes of zeroes, and so on.

Callbacks may be ``async def`` (run in the server's Trio task) or plain ``def`` (run in
a worker thread, for wrapping blocking libraries).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self

from .errors import NBDError
from .params import Param, build_kwargs
from .types import (
    BlockSize,
    CacheMode,
    Concurrency,
    Export,
    ExportList,
    Extent,
    FuaMode,
    ZeroMode,
)

if TYPE_CHECKING:
    from ..nursery import Lifetime


def overrides(obj: object, base: type, name: str) -> bool:
    """Whether ``obj``'s class defines ``name`` itself rather than inheriting ``base``'s."""
    return getattr(type(obj), name) is not getattr(base, name)


class Plugin:
    """Base class of plugins. Subclass it, set ``name`` and define callbacks."""

    name: ClassVar[str] = ""
    """The name used on the command line (``trionbd NAME ...``)."""
    version: ClassVar[str] = ""
    params: ClassVar[Sequence[Param]] = ()
    """Declared ``key=value`` parameters, passed to the constructor as keywords."""
    magic_param: ClassVar[str | None] = None
    """The parameter a bare word after the plugin name sets (``trionbd file disk.img``)."""
    concurrency: ClassVar[Concurrency] = Concurrency.PARALLEL
    """How much concurrency the callbacks tolerate; the server serializes accordingly."""
    nonblocking: ClassVar[bool] = False
    """True if ``pread``/``pwrite``/``extents`` finish without waiting on anything slow
    (memory, page cache). The server then runs them inline in the connection's reader,
    without a task per request."""
    process_safe: bool = False
    """True if several worker processes (``--workers``) may each serve clients with
    their own copy of this plugin, as forked after ``get_ready``: nothing a client
    changes or counts lives only in this process (a file on disk, a remote server: yes;
    data held in memory: no). An instance may set it from its parameters. A chain runs
    in one process unless every layer says true."""

    @classmethod
    def from_params(cls, items: Iterable[tuple[str, str]]) -> Self:
        """Build the plugin from command-line ``key=value`` pairs."""
        return cls(**build_kwargs(cls.name, cls.params, items))

    # --- lifecycle -----------------------------------------------------------------------

    def get_ready(self) -> None:
        """Called once after configuration, before forking and before Trio starts.
        Open files and check the configuration here; raise to stop start-up."""

    async def after_fork(self, lifetime: Lifetime) -> None:
        """Called once inside Trio before the first client; ``lifetime.nursery`` may run
        background tasks that live until unload."""

    async def cleanup(self) -> None:
        """Called once after the last client, before lifetime contexts are closed."""

    async def report(self) -> None:
        """Called when the operator asks for a report (SIGUSR1 on the command line),
        in the server's Trio thread, any number of times. Default: nothing."""

    def worker_share(self) -> object:
        """With worker processes: what this worker's copy counted, to be summed by
        :meth:`report_workers` (any picklable object). Asked in each worker for every
        report and once more when it exits. Default: None."""
        return None

    def report_workers(self, shares: Sequence[object], final: bool) -> None:
        """With worker processes, in the supervising process: report what every
        worker's copy counted (one share per worker that ran, each as
        :meth:`worker_share` returned it last); ``final`` once all have exited.
        Called on SIGUSR1 and at exit. Default: nothing."""

    def unload(self) -> None:
        """Called once at the very end, after Trio has stopped."""

    # --- exports -------------------------------------------------------------------------

    async def list_exports(self, readonly: bool, is_tls: bool) -> ExportList:
        """The exports a client sees with ``NBD_OPT_LIST``. Default: the default export.
        An async iterable streams a long list (see :data:`~.types.ExportList`)."""
        return [Export(await self.default_export(readonly, is_tls))]

    async def default_export(self, readonly: bool, is_tls: bool) -> str:
        """The canonical name of the export a client gets when it asks for ``""``."""
        return ""

    async def meta_contexts(self, readonly: bool, export_name: str, is_tls: bool) -> Sequence[str]:
        """The metadata contexts export ``export_name`` offers besides
        ``base:allocation`` (which ``extents`` answers), such as
        ``qemu:dirty-bitmap:NAME``; ``meta_extents`` answers their block status.
        Asked while a client negotiates, before any open, with the name as the client
        gave it (``""`` for the default export: see ``default_export``). Default: none."""
        return ()

    async def export_identity(self, export_name: str) -> bytes | None:
        """What identifies the present contents of export ``export_name`` without reading
        them (the ``file`` plugin: the file's inode, size and modification time), or None
        if this plugin cannot tell (the default). Not part of the protocol: a filter
        directly above that keeps what it derived from an export across restarts (the
        gzip filter's ``index=``) reuses it only while the identity is the same."""
        return None

    # --- per connection ------------------------------------------------------------------

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        """Open ``export_name`` for one connection and return a handle (any object).

        Raise ``NBDError(errno.ENOENT, ...)`` for an unknown export name.
        """
        return None

    async def close(self, h: Any) -> None:
        """Close a handle returned by ``open``."""

    async def export_description(self, h: Any) -> str | None:
        return None

    async def get_size(self, h: Any) -> int:
        raise NotImplementedError(f"plugin {self.name!r} must define get_size")

    async def block_size(self, h: Any) -> BlockSize | None:
        """Block size constraints, or ``None`` for the defaults (1, 4096, 32 MiB)."""
        return None

    async def is_rotational(self, h: Any) -> bool:
        return False

    async def can_write(self, h: Any) -> bool:
        return overrides(self, Plugin, "pwrite")

    async def can_flush(self, h: Any) -> bool:
        return overrides(self, Plugin, "flush")

    async def can_trim(self, h: Any) -> bool:
        return overrides(self, Plugin, "trim")

    async def can_zero(self, h: Any) -> ZeroMode:
        return ZeroMode.NATIVE if overrides(self, Plugin, "zero") else ZeroMode.EMULATE

    async def can_fast_zero(self, h: Any) -> bool:
        # Emulated zeroing fails at once with ENOTSUP when FAST_ZERO is asked: that is fast.
        return not overrides(self, Plugin, "zero")

    async def can_fua(self, h: Any) -> FuaMode:
        return FuaMode.EMULATE if overrides(self, Plugin, "flush") else FuaMode.NONE

    async def can_multi_conn(self, h: Any) -> bool:
        return False

    async def can_extents(self, h: Any) -> bool:
        return overrides(self, Plugin, "extents")

    async def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE if overrides(self, Plugin, "cache") else CacheMode.NONE

    # --- data ----------------------------------------------------------------------------

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        raise NotImplementedError(f"plugin {self.name!r} must define pread")

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        raise NBDError(errno.EROFS, "this export is read-only")

    async def flush(self, h: Any, flags: int) -> None:
        raise NBDError(errno.EINVAL, "flush is not supported")

    async def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        raise NBDError(errno.EINVAL, "trim is not supported")

    async def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        raise NBDError(errno.EINVAL, "zero is not supported")

    async def extents(self, h: Any, count: int, offset: int, flags: int) -> Iterable[Extent]:
        """Allocation state of the range: contiguous extents starting at or before
        ``offset``. Returning less than ``count`` bytes is fine (clients ask again)."""
        return [Extent(offset, count, 0)]

    async def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass

    async def meta_extents(
        self, h: Any, context: str, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        """Block status of metadata context ``context`` (one of ``meta_contexts``):
        contiguous extents starting at or before ``offset``, the context's status bits
        in ``flags``. Returning less than ``count`` bytes is fine (clients ask again)."""
        raise NBDError(errno.EINVAL, f"no metadata context {context!r}")
