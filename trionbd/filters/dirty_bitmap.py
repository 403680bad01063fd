"""dirty-bitmap: changed-block tracking, offered to clients as qemu:dirty-bitmap:NAME.

Records which blocks of each export were written, zeroed or trimmed through this
filter, one bit per block of ``granularity`` bytes, and offers them to clients as the
metadata context ``qemu:dirty-bitmap:NAME`` beside ``base:allocation``: in its block
status, flag 1 (bit 0) marks dirty blocks and 0 clean ones, as qemu-nbd defines it. A
backup tool reads it to copy only what changed since the bitmap was last cleared:

  qemu-img map --output=json --image-opts \\
      driver=nbd,server.type=unix,server.path=SOCK,export=,x-dirty-bitmap=qemu:dirty-bitmap:NAME

(qemu reads the context through base:allocation's meaning: dirty blocks show as
``"data": false``), or libnbd's ``add_meta_context("qemu:dirty-bitmap:NAME")`` and
``block_status``. A block touched by a request in part is dirty as a whole. A request
that fails still marks its blocks: it may have changed some.

Each export has its own bitmap, named by ``bitmap=`` or, by default, after the export
(``default`` for the export named ""). Every connection to an export shares it. Put the
filter first (nearest the client): the filters above it do not pass its context up
(they may move or change the data), and it sees only the writes that pass through it.

Persistence: with ``state=FILE`` the bitmaps survive restarts. The file is written
whole and atomically (a new file renamed over the old one) before a flush is passed
down, before a FUA write, zero or trim is, and at unload; a flush or FUA request is
answered only once the bitmap covering it is in the file. A crash therefore loses at
most the marks of writes that were not flushed (nor FUA): like their data, they may or
may not have reached the disk, but their blocks may be missing from the bitmap. The
file says whether the server shut down cleanly: on loading one that was in use when
the server stopped, the filter warns that such blocks may be missing. Without
``state=`` the bitmaps live in memory only. A state file written for an export of
another size is resized: blocks beyond the old end count as dirty. ``reset=true``
starts with clean bitmaps (and rewrites the file).

Embedding: a Trio application holding the filter reads and clears the bitmaps while
serving (``DirtyBitmapFilter.bitmap(export)``): ``dirty()`` lists the dirty byte
ranges, ``take()`` lists them and clears the bitmap at once (writes from then on mark
it again), ``mark_ranges()`` puts them back (a backup that failed), ``clear()`` forgets
everything. A backup copies what ``take()`` returned; blocks written meanwhile are in
the next backup.

Examples:
  trionbd --filter=dirty-bitmap file disk.img state=disk.bitmap
  trionbd --filter=dirty-bitmap memory 1G bitmap=changes granularity=4K
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import trio

from ..chain import (
    ConfigError,
    Extent,
    Filter,
    Layer,
    Next,
    Param,
    StartupError,
    parse_bool,
    parse_size,
)
from ..protocol.constants import FUA_BIT

if TYPE_CHECKING:
    from ..nursery import Lifetime

log = logging.getLogger(__name__)

DEFAULT_GRANULARITY = 64 * 1024
MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
"""Granularities allowed: powers of two in this range (qemu's)."""
CONTEXT_PREFIX = "qemu:dirty-bitmap:"
DIRTY = 1
"""The block status flag of a dirty block (qemu's ``NBD_STATE_DIRTY``)."""
DEFAULT_NAME = "default"
"""The bitmap's name for the export named "" (a context name cannot end in ':')."""
MAGIC = b"trionbd dirty bitmaps 1\n"
"""The first line of a state file; a JSON line follows, then the bits of each bitmap."""

_NOT_SET = re.compile(rb"[^\xff]")
_NOT_CLEAR = re.compile(rb"[^\x00]")


def parse_granularity(text: str) -> int:
    value = parse_size(text)
    if not MIN_GRANULARITY <= value <= MAX_GRANULARITY or value & (value - 1):
        raise ValueError(
            f"{text!r} is not a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY}"
        )
    return value


class Bits:
    """A bit per block (bit ``i % 8`` of byte ``i // 8`` for block ``i``)."""

    def __init__(self, blocks: int, data: bytes | None = None):
        self.blocks = blocks
        self.data = bytearray((blocks + 7) // 8) if data is None else bytearray(data)

    def __getitem__(self, block: int) -> bool:
        return bool(self.data[block >> 3] >> (block & 7) & 1)

    def set_range(self, first: int, end: int, value: bool) -> bool:
        """Set blocks ``[first, end)`` to ``value``; whether any changed."""
        end = min(end, self.blocks)
        if first >= end or (self.next_change(first, end) >= end and self[first] == value):
            return False
        data = self.data
        while first < end and first & 7:
            self._set(first, value)
            first += 1
        while end > first and end & 7:
            end -= 1
            self._set(end, value)
        if first < end:
            data[first >> 3 : end >> 3] = (b"\xff" if value else b"\x00") * ((end - first) >> 3)
        return True

    def resized(self, blocks: int) -> Bits:
        """A copy for ``blocks`` blocks: the common ones as they are, new ones dirty."""
        out = Bits(blocks)
        out.data[:] = self.data[: len(out.data)].ljust(len(out.data), b"\0")
        out.set_range(min(blocks, self.blocks), blocks, True)
        if blocks & 7:  # bits past the last block stay clear
            out.data[-1] &= (1 << (blocks & 7)) - 1
        return out

    def _set(self, block: int, value: bool) -> None:
        if value:
            self.data[block >> 3] |= 1 << (block & 7)
        else:
            self.data[block >> 3] &= ~(1 << (block & 7)) & 0xFF

    def next_change(self, block: int, end: int) -> int:
        """The first block in ``(block, end)`` whose bit differs from ``block``'s, else
        ``end``."""
        value = self[block]
        i = block + 1
        while i < end and i & 7:
            if self[i] != value:
                return i
            i += 1
        if i >= end:
            return end
        found = (_NOT_SET if value else _NOT_CLEAR).search(self.data, i >> 3, (end + 7) >> 3)
        if found is None:
            return end
        i = found.start() << 3
        while i < end and self[i] == value:
            i += 1
        return min(i, end)

    def runs(self, first: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(start, stop, dirty)`` runs of equal blocks covering ``[first, end)``."""
        while first < end:
            stop = self.next_change(first, end)
            yield first, stop, self[first]
            first = stop


class DirtyBitmap:
    """The bitmap of one export: which of its blocks were written since it was cleared."""

    def __init__(
        self, owner: DirtyBitmapFilter, export: str, name: str, size: int, bits: Bits | None = None
    ):
        self.owner = owner
        self.export = export
        self.name = name
        self.size = size
        self.granularity = owner.granularity
        self.bits = Bits(-(-size // self.granularity)) if bits is None else bits

    @property
    def context(self) -> str:
        """Its metadata context's name."""
        return CONTEXT_PREFIX + self.name

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.granularity, -(-(offset + length) // self.granularity)

    def _changed(self) -> None:
        self.owner.generation += 1

    def mark(self, offset: int, length: int) -> None:
        """Mark the blocks that ``[offset, offset + length)`` touches dirty."""
        if self.bits.set_range(*self._blocks(offset, length), True):
            self._changed()

    def mark_ranges(self, ranges: list[tuple[int, int]]) -> None:
        """Mark ``(offset, length)`` ranges dirty (from :meth:`take`, after a failed
        backup)."""
        for offset, length in ranges:
            self.mark(offset, length)

    def clear(self, offset: int = 0, length: int | None = None) -> None:
        """Clear the blocks lying wholly inside ``[offset, offset + length)`` (all of
        them by default); a block the range covers in part stays dirty."""
        if length is None:
            length = self.size - offset
        first = -(-offset // self.granularity)
        end = (offset + length) // self.granularity
        if offset + length >= self.size:
            end = self.bits.blocks  # the last block may be shorter than the granularity
        if self.bits.set_range(first, end, False):
            self._changed()

    def dirty(self) -> list[tuple[int, int]]:
        """The dirty ``(offset, length)`` byte ranges, in order."""
        g = self.granularity
        return [
            (start * g, min(stop * g, self.size) - start * g)
            for start, stop, dirty in self.bits.runs(0, self.bits.blocks)
            if dirty
        ]

    def take(self) -> list[tuple[int, int]]:
        """The dirty ranges, and the bitmap cleared in the same step: writes from now
        on mark it again. Give the ranges back with :meth:`mark_ranges` if copying them
        failed."""
        ranges = self.dirty()
        self.clear()
        return ranges

    def extents(self, count: int, offset: int) -> list[Extent]:
        """Block status of ``[offset, offset + count)``: runs of dirty (flag 1) and clean
        (0) bytes, cut at the range's ends."""
        end = min(offset + count, self.size)
        out = []
        for start, stop, dirty in self.bits.runs(*self._blocks(offset, end - offset)):
            lo = max(start * self.granularity, offset)
            hi = min(stop * self.granularity, end)
            out.append(Extent(lo, hi - lo, DIRTY if dirty else 0))
        return out


class Stored(NamedTuple):
    """A bitmap read from the state file."""

    name: str
    size: int
    data: bytes


class DirtyBitmapFilter(Filter):
    """Record written blocks per export; offer them as qemu:dirty-bitmap:NAME."""

    name = "dirty-bitmap"
    # the bitmaps live in this process's memory (and one state
    # file per bitmap): a worker's marks would miss the others'
    process_safe = False
    params = (
        Param(
            "granularity",
            "bytes per bit: a power of two from 512 to 2G",
            parse_granularity,
            metavar="SIZE",
            default="64K",
        ),
        Param(
            "bitmap",
            'the bitmap\'s name (default: the export\'s; "default" for the export "")',
            metavar="NAME",
        ),
        Param("state", "keep the bitmaps in this file across restarts", metavar="FILE"),
        Param(
            "reset",
            "start with clean bitmaps, whatever the state file holds",
            parse_bool,
            metavar="BOOL",
            default="false",
        ),
    )
    nonblocking = False  # a flush or FUA request waits for the state file to be written

    def __init__(
        self,
        granularity: int = DEFAULT_GRANULARITY,
        bitmap: str | None = None,
        state: str | None = None,
        reset: bool = False,
    ):
        if bitmap is not None and (not bitmap or "\0" in bitmap):
            raise ConfigError("dirty-bitmap: bitmap= needs a name")
        self.granularity = granularity
        self.bitmap_name = bitmap
        self.state = os.path.abspath(state) if state is not None else None
        self.reset = reset
        self.bitmaps: dict[str, DirtyBitmap] = {}
        """Each export's bitmap, made when the export is first opened (or loaded)."""
        self.generation = 0
        """Counts changes to any bitmap: the state file is written only if it moved."""
        self._saved = 0
        self._lock: trio.Lock | None = None

    # --- the embedding API ------------------------------------------------------------------

    def bitmap(self, export: str = "") -> DirtyBitmap:
        """The bitmap of ``export`` (``LookupError`` if it was never opened nor loaded
        from the state file)."""
        found = self.bitmaps.get(export)
        if found is None:
            raise LookupError(f"dirty-bitmap: no bitmap for export {export!r} (not opened yet)")
        return found

    # --- lifecycle --------------------------------------------------------------------------

    def get_ready(self) -> None:
        if self.state is None or self.reset or not os.path.exists(self.state):
            return
        try:
            clean, stored = read_state(self.state, self.granularity)
        except (OSError, ValueError) as e:
            raise StartupError(f"dirty-bitmap: state file {self.state}: {e}") from None
        if not clean:
            log.warning(
                "dirty-bitmap: %s was in use when the server stopped: blocks written after "
                "the last flush before that may be missing from its bitmaps",
                self.state,
            )
        for export, s in stored.items():
            bits = Bits(-(-s.size // self.granularity), s.data)
            self.bitmaps[export] = DirtyBitmap(self, export, self._name(export), s.size, bits)

    def _name(self, export: str) -> str:
        return self.bitmap_name or export or DEFAULT_NAME

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        if self.state is not None:
            # In use from now on: a crash leaves a file saying so.
            self._lock = trio.Lock()
            await self._write(clean=False, force=True)

    def unload(self) -> None:
        if self.state is None:
            return
        try:
            write_state(self.state, self.granularity, self.bitmaps.values(), clean=True)
        except OSError as e:
            log.error("dirty-bitmap: cannot write %s at unload: %s", self.state, e)

    async def _write(self, clean: bool = False, force: bool = False) -> None:
        """Write the state file if a bitmap changed since it was last written."""
        if self.state is None or self._lock is None:
            return
        async with self._lock:
            generation = self.generation
            if generation == self._saved and not force:
                return
            path, granularity = self.state, self.granularity
            snapshot = [
                (b.export, b.name, b.size, bytes(b.bits.data)) for b in self.bitmaps.values()
            ]
            await trio.to_thread.run_sync(write_snapshot, path, granularity, snapshot, clean)
            self._saved = generation

    async def meta_contexts(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> Sequence[str]:
        name = export_name or await below.default_export(readonly, is_tls)  # as at open
        mine = CONTEXT_PREFIX + self._name(name)
        return [mine, *await below.meta_contexts(readonly, export_name, is_tls)]

    # --- per connection ---------------------------------------------------------------------

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, DirtyBitmap]:
        ctx = await below.open(readonly, export_name, is_tls)
        try:
            size = await ctx.get_size()
            bitmap = self.bitmaps.get(export_name)
            if bitmap is None:
                bitmap = DirtyBitmap(self, export_name, self._name(export_name), size)
                self.bitmaps[export_name] = bitmap
                self.generation += 1
            elif bitmap.size != size:
                log.warning(
                    "dirty-bitmap: export %r is %d bytes now, its bitmap was for %d: blocks "
                    "past the old end count as dirty",
                    export_name, size, bitmap.size,
                )  # fmt: skip
                # The old last block may have been short: it counts as dirty too. In
                # place: connections still open on the export mark the same bitmap.
                keep = min(size, bitmap.size) // self.granularity
                bitmap.bits = bitmap.bits.resized(keep).resized(-(-size // self.granularity))
                bitmap.size = size
                self.generation += 1
        except BaseException:
            with trio.CancelScope(shield=True):
                await ctx.close()
            raise
        return ctx, bitmap

    async def pwrite(self, next: Next, h: DirtyBitmap, buf: bytes, offset: int, flags: int) -> None:
        h.mark(offset, len(buf))
        if flags & FUA_BIT:
            await self._write()
        await next.pwrite(buf, offset, flags)

    async def zero(self, next: Next, h: DirtyBitmap, count: int, offset: int, flags: int) -> None:
        h.mark(offset, count)
        if flags & FUA_BIT:
            await self._write()
        await next.zero(count, offset, flags)

    async def trim(self, next: Next, h: DirtyBitmap, count: int, offset: int, flags: int) -> None:
        h.mark(offset, count)
        if flags & FUA_BIT:
            await self._write()
        await next.trim(count, offset, flags)

    async def flush(self, next: Next, h: DirtyBitmap, flags: int) -> None:
        await self._write()
        await next.flush(flags)

    async def meta_extents(
        self, next: Next, h: DirtyBitmap, context: str, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        if context == h.context:
            return h.extents(count, offset)
        return await next.meta_extents(context, count, offset, flags)


# --- the state file ---------------------------------------------------------------------


def read_state(path: str, granularity: int) -> tuple[bool, dict[str, Stored]]:
    """``(clean, bitmaps by export)`` from a state file; ``ValueError`` names what is
    wrong with it."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(MAGIC):
        raise ValueError("not a trionbd dirty bitmap file (bad first line)")
    header_end = data.find(b"\n", len(MAGIC))
    if header_end < 0:
        raise ValueError("truncated header")
    try:
        header = json.loads(data[len(MAGIC) : header_end])
        clean = bool(header["clean"])
        stored_granularity = int(header["granularity"])
        entries = [(str(e["export"]), str(e["name"]), int(e["size"])) for e in header["bitmaps"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"bad header ({e})") from None
    if stored_granularity != granularity:
        raise ValueError(
            f"written with granularity={stored_granularity}, not {granularity} "
            "(give that granularity, or reset=true to start over)"
        )
    pos = header_end + 1
    out = {}
    for export, name, size in entries:
        n = (-(-size // granularity) + 7) // 8
        if pos + n > len(data):
            raise ValueError(f"truncated: the bitmap of export {export!r} is incomplete")
        out[export] = Stored(name, size, data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} stray bytes at the end")
    return clean, out


def write_state(path: str, granularity: int, bitmaps: Iterable[DirtyBitmap], clean: bool) -> None:
    """Write ``bitmaps`` (``DirtyBitmap`` objects) to ``path`` atomically."""
    snapshot = [(b.export, b.name, b.size, bytes(b.bits.data)) for b in bitmaps]
    write_snapshot(path, granularity, snapshot, clean)


def write_snapshot(
    path: str, granularity: int, snapshot: list[tuple[str, str, int, bytes]], clean: bool
) -> None:
    """Write a new state file beside ``path``, make it durable, rename it over ``path``
    and make the rename durable: a crash leaves the old file or the new one."""
    header = {
        "clean": clean,
        "granularity": granularity,
        "bitmaps": [{"export": e, "name": n, "size": s} for e, n, s, _ in snapshot],
    }
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + json.dumps(header).encode() + b"\n")
        for *_, data in snapshot:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FILTER = DirtyBitmapFilter
