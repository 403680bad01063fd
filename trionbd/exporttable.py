"""exporttable: exports that the application adds, replaces and removes while serving.

An :class:`ExportTable` is a plugin that maps export names to backends, each a plugin
instance or a :class:`~trionbd.Chain` (filters on a plugin). A client asking for a name
gets that backend's default export; ``--list`` shows the current names; the export
named ``""`` (if any) is what a client gets when it asks for no name. ::

    table = trionbd.ExportTable({"scratch": MemoryPlugin(size=1 << 30)})
    server = await nursery.start(trionbd.serve, table, "unix:/tmp/nbd.sock")
    await table.add("disk", trionbd.Chain(FilePlugin(file="disk.img"), [CowFilter()]))
    await table.remove("scratch")

Each backend has a lifecycle of its own: ``get_ready`` and ``after_fork`` when it is
added (or when the server starts), ``cleanup`` when it is removed or the server stops,
``unload`` after that. Removing or replacing an export ends the connections using the
old backend (``Lifetime.close_connections``): their requests in flight finish, later
ones get ``ESHUTDOWN``, and they close when the client disconnects or after the grace
period. New clients do not see a removed export and get ``NBD_REP_ERR_UNKNOWN``.

It lives here rather than in ``trionbd/plugins/`` because its backends are Python
objects: it has no command-line form.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import trio

from .chain.chain import Chain
from .chain.errors import NBDError, StartupError
from .chain.forward import ForwardingPlugin
from .chain.next import Next
from .chain.plugin import Plugin
from .chain.types import Concurrency, Export
from .nursery import Lifetime, open_lifetime
from .protocol.constants import MAX_STRING

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Entry:
    """One export of the table: its backend and the backend's lifetime."""

    name: str
    chain: Chain
    description: str
    grace: float | None = None
    users: int = 0
    """Contexts of the backend open or opening (a client, or one asking NBD_OPT_INFO)."""
    removed: bool = False
    retire: trio.Event = field(default_factory=trio.Event)
    """Set when the entry leaves the table: its host task then ends the backend."""
    stopped: trio.Event = field(default_factory=trio.Event)
    idle: trio.Event = field(default_factory=trio.Event)
    """Set once the entry is removed and has no users left."""

    def release(self) -> None:
        self.users -= 1
        if self.removed and not self.users:
            self.idle.set()


@dataclass(eq=False, slots=True)
class _Handle:
    entry: _Entry
    ctx: Next


class ExportTable(ForwardingPlugin[_Handle]):
    """Exports by name, each served by its own backend; see the module docstring.

    ``nonblocking`` is False: each request runs in a task of its own, whatever the
    backends are. A subclass may declare ``nonblocking = True`` if it only ever holds
    nonblocking backends (memory, page-cache files); :meth:`add` then refuses others.
    Backends that serialize connections (``Concurrency.SERIALIZE_CONNECTIONS``) are
    refused; the other concurrency levels are enforced per backend.
    """

    name = "exporttable"

    def __init__(self, exports: Mapping[str, Plugin | Chain] | None = None):
        self._entries: dict[str, _Entry] = {}
        self._lifetime: Lifetime | None = None
        for name, backend in (exports or {}).items():
            self._entries[name] = self._entry(name, backend, "", None)

    def __repr__(self) -> str:
        return f"<ExportTable {list(self._entries)}>"

    def names(self) -> list[str]:
        """The export names, in the order they were added."""
        return list(self._entries)

    def _entry(
        self, name: str, backend: Plugin | Chain, description: str, grace: float | None
    ) -> _Entry:
        if "\0" in name or len(name.encode()) > MAX_STRING:
            raise ValueError(f"export name {name!r}: at most {MAX_STRING} bytes, no NUL")
        chain = backend if isinstance(backend, Chain) else Chain(backend)
        if chain.concurrency is Concurrency.SERIALIZE_CONNECTIONS:
            raise ValueError(
                f"export {name!r}: {chain!r} serializes connections, which an export "
                "table cannot do per export"
            )
        if self.nonblocking and not chain.nonblocking:
            raise ValueError(
                f"export {name!r}: {chain!r} is not nonblocking, but {type(self).__name__} "
                "declares nonblocking = True"
            )
        return _Entry(name, chain, description, grace)

    async def add(
        self,
        name: str,
        backend: Plugin | Chain,
        *,
        description: str = "",
        grace: float | None = None,
    ) -> None:
        """Serve ``backend`` as export ``name`` (replacing any export of that name).

        While serving, the backend is made ready first (``get_ready``, ``after_fork``;
        their errors propagate and the table is unchanged); a replaced backend is then
        retired as by :meth:`remove`, and this returns once it is gone. ``description``
        is shown by ``--list`` and ``nbdinfo``; ``grace`` is what :meth:`remove` will
        give this export's clients (default: the server's shutdown timeout).
        """
        entry = self._entry(name, backend, description, grace)
        lifetime = self._lifetime
        if lifetime is not None:
            if lifetime.closing:
                raise RuntimeError(f"cannot add export {name!r}: the server is shutting down")
            await self._start(lifetime, entry)
        old = self._entries.get(name)
        self._entries[name] = entry
        if old is not None:
            await self._retire(old)

    async def remove(self, name: str) -> None:
        """Stop serving export ``name`` and return once its backend is gone: its
        clients are disconnected (see the module docstring), its lifetime closed and
        ``unload`` called. ``KeyError`` if there is no such export."""
        try:
            entry = self._entries.pop(name)
        except KeyError:
            raise KeyError(f"no export named {name!r} (exports: {self.names()})") from None
        await self._retire(entry)

    async def _retire(self, entry: _Entry) -> None:
        entry.removed = True
        if not entry.users:
            entry.idle.set()
        if self._lifetime is None:  # never started
            return
        entry.retire.set()
        await entry.stopped.wait()

    async def _start(self, lifetime: Lifetime, entry: _Entry) -> None:
        """Make the backend ready and run its lifetime; on failure it is unloaded."""
        entry.retire = trio.Event()  # fresh events: a table may be served more than once
        entry.stopped = trio.Event()
        try:
            entry.chain.get_ready()
            await lifetime.nursery.start(self._host, entry)
        except BaseException as error:
            self._unload(entry)
            cause = _only(error)  # the lifetime's nursery wraps it in exception groups
            if isinstance(cause, StartupError):
                raise StartupError(f"export {entry.name!r}: {cause}") from cause
            raise

    async def _host(self, entry: _Entry, *, task_status: trio.TaskStatus[None]) -> None:
        """Run the backend's lifetime until the entry is retired (or the server stops:
        this task is then cancelled, after every context of the table is closed)."""
        lifetime = self._lifetime
        assert lifetime is not None
        try:
            async with open_lifetime(
                entry.chain, close_timeout=lifetime.close_timeout, readonly=lifetime.readonly
            ):
                task_status.started()
                await entry.retire.wait()
                await lifetime.close_connections(
                    self, lambda ctx: ctx.handle.entry is entry, entry.grace
                )
                # Contexts of clients still negotiating (NBD_OPT_INFO, or an open that
                # raced with the removal and will fail) are closed soon.
                with trio.move_on_after(lifetime.close_timeout):
                    await entry.idle.wait()
        finally:
            if entry.removed:
                self._unload(entry)
            entry.stopped.set()

    @staticmethod
    def _unload(entry: _Entry) -> None:
        if not entry.chain.ready:
            return
        try:
            entry.chain.unload()
        except Exception as e:
            log.error("export %r: unload failed: %s", entry.name, e)

    # --- lifecycle -----------------------------------------------------------------------

    def get_ready(self) -> None:
        for entry in self._entries.values():
            entry.chain.get_ready()

    async def after_fork(self, lifetime: Lifetime) -> None:
        if self._lifetime is not None and not self._lifetime.closing:
            raise StartupError("an ExportTable can serve only one server at a time")
        self._lifetime = lifetime
        for entry in list(self._entries.values()):
            await self._start(lifetime, entry)

    async def report(self) -> None:
        for entry in list(self._entries.values()):
            await entry.chain.report()

    def unload(self) -> None:
        for entry in self._entries.values():
            self._unload(entry)
        self._lifetime = None

    # --- exports -------------------------------------------------------------------------

    async def list_exports(self, readonly: bool, is_tls: bool) -> Iterable[Export]:
        return [Export(e.name, e.description) for e in self._entries.values()]

    async def default_export(self, readonly: bool, is_tls: bool) -> str:
        return ""

    async def meta_contexts(self, readonly: bool, export_name: str, is_tls: bool) -> list[str]:
        entry = self._entries.get(export_name)
        if entry is None:
            raise NBDError(errno.ENOENT, f"no export named {export_name!r}")
        top = entry.chain.top
        return await top.meta_contexts(readonly, await top.default_export(readonly, is_tls), is_tls)

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> _Handle:
        entry = self._entries.get(export_name)
        if entry is None:
            raise NBDError(errno.ENOENT, f"no export named {export_name!r}")
        top = entry.chain.top
        entry.users += 1
        try:
            ctx = await top.open(readonly, await top.default_export(readonly, is_tls), is_tls)
        except BaseException as e:
            entry.release()
            if entry.removed and isinstance(e, Exception):
                raise NBDError(errno.ESHUTDOWN, f"export {export_name!r} was removed") from e
            raise
        if entry.removed:  # removed while the backend opened: too late to join
            try:
                with trio.CancelScope(shield=True):
                    await ctx.close()
            finally:
                entry.release()
            raise NBDError(errno.ESHUTDOWN, f"export {export_name!r} was removed")
        return _Handle(entry, ctx)

    async def close(self, h: _Handle) -> None:
        try:
            await h.ctx.close()
        finally:
            h.entry.release()

    async def export_description(self, h: _Handle) -> str | None:
        return h.entry.description or await h.ctx.export_description()


def _only(error: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


__all__ = ["ExportTable"]
