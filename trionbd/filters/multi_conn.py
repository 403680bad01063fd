"""multi-conn: offer multi-conn, emulating it where the layer below lacks it, or hide it.

A server that advertises multi-conn (``NBD_FLAG_CAN_MULTI_CONN``) promises that a flush
on any connection makes the writes of every connection stable and visible to all of
them: a client that got a write's reply on one connection, then a flush's reply on
another, reads the written data on a third. Clients such as nbdcopy and qemu then
spread their requests over several connections. Without the flag they must not.

``multi-conn-mode``:

* ``auto`` (the default): ``plugin`` if the layer below offers multi-conn, else
  ``emulate``; ``disable`` if the server serves one connection at a time anyway.
* ``emulate``: multi-conn is advertised, and a flush on one connection (or a write with
  FUA, which is then done as a write and a flush) is replicated as a flush of every
  connection's context of the layer below. Enough when each connection's context
  caches writes on its own and a flush empties that cache. Needs a layer below that can
  flush (a client of one that cannot is refused). FUA is offered as emulated (a flush
  after the write), since a write with FUA on one connection must reach all of them.
* ``plugin``: multi-conn is advertised as the layer below says, flushes are not
  replicated, but ``multi-conn-track-dirty`` still skips needless flushes.
* ``disable``: multi-conn is not advertised, even if the layer below offers it, and
  flushes are not replicated: for testing that clients then flush every connection.
* ``unsafe``: multi-conn is advertised whatever the layer below can do. A client relying
  on it can read stale data or lose writes: only for experiments.

``multi-conn-track-dirty`` says which flushes can be skipped:

* ``connection`` (the default, also ``conn``): a connection is dirty after a write,
  zero or trim on it since its last flush, or after a read or cache request on it while
  another connection had written since its own last flush; only dirty connections'
  contexts are flushed. Safe in every mode.
* ``fast``: the export is dirty after any write, zero or trim on any connection; while
  it is clean, flushes are skipped, and a flush on one connection counts for all.
  Safe with ``emulate``; with ``plugin`` over a layer below without multi-conn it can
  skip a flush that a connection's cache needed.
* ``off``: every flush is passed on (with ``emulate``: to every connection, so clients
  that flush each connection themselves cause a flush per pair of connections).

``multi-conn-exportname=true`` (also ``multi-conn-export-name``) replicates a flush
only to connections of the same export name; the default false replicates to all, which
is right when export names may share their data below, as they usually do.

Combine with the fua filter for more control over FUA and flush. Not for a layer below
that serves different data to each connection of one export name.

Examples:
  trionbd --filter=multi-conn nbd socket=/run/other.sock
  trionbd --filter=multi-conn file disk.img multi-conn-mode=plugin \\
      multi-conn-track-dirty=fast
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..chain import (
    Concurrency,
    Filter,
    FuaMode,
    Layer,
    NBDError,
    Next,
    Param,
    parse_bool,
    parse_choice,
)
from ..protocol.constants import CmdFlag

if TYPE_CHECKING:
    from ..nursery import Lifetime

MODES = ("auto", "emulate", "plugin", "disable", "unsafe")
TRACKING = ("connection", "conn", "fast", "off")

WROTE = 1
"""A connection's dirt: it wrote since its last flush."""
READ = 2
"""A connection's dirt: it read (and may have cached) since its last flush."""


@dataclass(eq=False)
class Group:
    """The connections a flush is replicated to."""

    conns: list[Conn] = field(default_factory=list)
    dirty: bool = False
    """Some connection of the group wrote since the last flush that counted for all."""
    lock: trio.Lock = field(default_factory=trio.Lock)
    """Held while a flush is replicated: a connection leaves the group only between."""


@dataclass(eq=False)
class Conn:
    """One connection: its context of the layer below and how it is dirty."""

    next: Next
    mode: str
    """The mode in force for it (``auto`` resolved at open)."""
    group: Group
    dirty: int = 0


class MultiConnFilter(Filter):
    """Advertises, emulates or hides multi-conn; replicates and skips flushes."""

    name = "multi-conn"
    process_safe = False  # a flush is replicated to the connections of this process only
    params = (
        Param(
            "multi-conn-mode",
            "auto: plugin if the layer below offers multi-conn, else emulate; emulate: "
            "advertise it and replicate flushes to every connection; plugin: as the layer "
            "below; disable: never advertise it; unsafe: always advertise it",
            parse_choice(*MODES),
            default="auto",
        ),
        Param(
            "multi-conn-track-dirty",
            "connection (or conn): skip flushes of connections with nothing to flush; fast: "
            "skip flushes while no connection wrote; off: never skip",
            parse_choice(*TRACKING),
            default="connection",
        ),
        Param(
            "multi-conn-exportname",
            "replicate flushes only among connections of one export name",
            parse_bool,
            default="false",
        ),
        Param("multi-conn-export-name", "another name for multi-conn-exportname", parse_bool),
    )
    # nonblocking stays True: the group lock is only held across flushes of the layer below.

    def __init__(
        self,
        multi_conn_mode: str = "auto",
        multi_conn_track_dirty: str = "connection",
        multi_conn_exportname: bool = False,
        multi_conn_export_name: bool = False,
    ):
        self.mode = multi_conn_mode
        self.track = "connection" if multi_conn_track_dirty == "conn" else multi_conn_track_dirty
        self.by_name = multi_conn_exportname or multi_conn_export_name
        self.groups: dict[str | None, Group] = {}

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        if self.mode == "auto" and lifetime.chain.concurrency is Concurrency.SERIALIZE_CONNECTIONS:
            self.mode = "disable"  # one connection at a time: nothing to make consistent

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Conn]:
        next = await below.open(readonly, export_name, is_tls)
        mode = self.mode
        if mode == "auto":
            mode = "plugin" if await next.can_multi_conn() else "emulate"
        if mode == "emulate" and not await next.can_flush():
            with trio.CancelScope(shield=True):
                await next.close()
            raise NBDError(
                errno.EINVAL,
                f"multi-conn: emulating multi-conn needs flush, which {next.name} lacks",
            )
        key = export_name if self.by_name else None
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group()
        conn = Conn(next, mode, group)
        group.conns.append(conn)
        return next, conn

    async def close(self, next: Next, h: Conn) -> None:
        group = h.group
        async with group.lock:
            group.conns.remove(h)
            if not group.conns:
                key = next.export_name if self.by_name else None
                del self.groups[key]

    async def can_fua(self, next: Next, h: Conn) -> FuaMode:
        fua = await next.can_fua()
        if fua is FuaMode.NATIVE and h.mode == "emulate":
            return FuaMode.EMULATE  # a FUA write must reach every connection: flush them
        return fua

    async def can_multi_conn(self, next: Next, h: Conn) -> bool:
        if h.mode == "plugin":
            return await next.can_multi_conn()
        return h.mode != "disable"

    def _mark(self, h: Conn, wrote: bool) -> None:
        # No lock: a client must wait for a flush's reply before sending what relies on
        # it, so a race here is a race the client created.
        if self.track == "connection":
            h.dirty |= WROTE if wrote else READ
        if wrote and self.track != "off":
            h.group.dirty = True

    def _mark_write(self, h: Conn, flags: int) -> None:
        # A FUA request is stable by itself, except when emulating (then it is followed
        # by a replicated flush, which must see it dirty).
        if not flags & CmdFlag.FUA or h.mode == "emulate":
            self._mark(h, True)

    async def pread(self, next: Next, h: Conn, count: int, offset: int, flags: int) -> bytes:
        self._mark(h, False)
        return await next.pread(count, offset, flags)

    async def cache(self, next: Next, h: Conn, count: int, offset: int, flags: int) -> None:
        self._mark(h, False)
        await next.cache(count, offset, flags)

    async def pwrite(self, next: Next, h: Conn, buf: bytes, offset: int, flags: int) -> None:
        self._mark_write(h, flags)
        await next.pwrite(buf, offset, flags)

    async def zero(self, next: Next, h: Conn, count: int, offset: int, flags: int) -> None:
        self._mark_write(h, flags)
        await next.zero(count, offset, flags)

    async def trim(self, next: Next, h: Conn, count: int, offset: int, flags: int) -> None:
        self._mark_write(h, flags)
        await next.trim(count, offset, flags)

    async def flush(self, next: Next, h: Conn, flags: int) -> None:
        group = h.group
        if h.mode == "emulate":
            async with group.lock:
                for other in list(group.conns):
                    if (
                        self.track == "off"
                        or other.dirty & WROTE
                        or (group.dirty and (self.track == "fast" or other.dirty & READ))
                    ):
                        await other.next.flush(flags)
                        other.dirty = 0
                group.dirty = False
            return
        if self.track != "off" and not group.dirty:
            return  # nothing written since the last flush that counted for all
        await next.flush(flags)
        if self.track == "fast":
            group.dirty = False
        elif self.track == "connection":
            if await next.can_multi_conn():
                for other in group.conns:
                    other.dirty = 0
                group.dirty = False
            else:
                h.dirty = 0


FILTER = MultiConnFilter
