"""Test-only filters, one per shape of export list, loadable by the real command as
``--filter=tests.chain.shape_filters:ClassName``.

The own-list and product filters read a small *directory* stored at the start of an
export of the layer below: UTF-8 lines ``NAME OFFSET SIZE`` (NAME may contain spaces
and ``/``; the last two fields are numbers), ended by an empty line, within the first
``DIRECTORY_SIZE`` bytes. Each entry serves the bytes ``OFFSET .. OFFSET+SIZE`` of that
export as an export of its own.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import trio

from trionbd.chain import (
    BuildOnce,
    CacheMode,
    Export,
    Filter,
    Layer,
    NBDError,
    Next,
    Param,
    ProductNames,
    parse_int,
)
from trionbd.nursery import Lifetime

log = logging.getLogger(__name__)

DIRECTORY_SIZE = 4096
"""Bytes at the start of an export that may hold its directory."""


@dataclass(frozen=True)
class Entry:
    offset: int
    size: int


def format_directory(entries: Iterable[tuple[str, int, int]]) -> bytes:
    """The directory block for ``(name, offset, size)`` entries, padded to DIRECTORY_SIZE."""
    text = "".join(f"{name} {offset} {size}\n" for name, offset, size in entries) + "\n"
    raw = text.encode()
    if len(raw) > DIRECTORY_SIZE:
        raise ValueError(f"directory of {len(raw)} bytes does not fit in {DIRECTORY_SIZE}")
    return raw.ljust(DIRECTORY_SIZE, b"\0")


async def read_directory(
    pread: Callable[[int, int], Awaitable[bytes]], size: int, where: str
) -> dict[str, Entry]:
    """Parse the directory of an export of ``size`` bytes; ``NBDError(EIO)`` if invalid."""
    raw = await pread(min(size, DIRECTORY_SIZE), 0)
    text, sep, _ = raw.partition(b"\n\n")
    if not sep:
        raise NBDError(errno.EIO, f"{where}: no directory (no empty line in the first block)")
    entries: dict[str, Entry] = {}
    for number, line in enumerate(text.decode("utf-8", "replace").split("\n"), 1):
        fields = line.rsplit(" ", 2)
        if len(fields) != 3 or not fields[1].isdigit() or not fields[2].isdigit():
            raise NBDError(errno.EIO, f"{where}: directory line {number} is not NAME OFFSET SIZE")
        name, offset, length = fields[0], int(fields[1]), int(fields[2])
        if offset + length > size:
            raise NBDError(errno.EIO, f"{where}: entry {name!r} ends beyond {size} bytes")
        entries[name] = Entry(offset, length)
    return entries


class SliceFilter(Filter):
    """Serves one ``Entry`` (the handle) of the context below, read-only."""

    async def get_size(self, next: Next, h: Entry) -> int:
        return h.size

    async def can_write(self, next: Next, h: Any) -> bool:
        return False

    async def can_extents(self, next: Next, h: Any) -> bool:
        return False

    async def can_cache(self, next: Next, h: Any) -> CacheMode:
        return CacheMode.NONE

    async def pread(self, next: Next, h: Entry, count: int, offset: int, flags: int) -> bytes:
        if offset + count > h.size:
            raise NBDError(errno.EINVAL, f"{self.name}: read beyond the end of the entry")
        return await next.pread(count, h.offset + offset, flags)


class Passthrough(Filter):
    """Shape 1: the base class's behaviour, unchanged (the export list passes through)."""

    name = "passthrough"


class Directory(SliceFilter):
    """Shape 2 (own list): the entries of the directory of one export below.

    The directory is read in ``after_fork`` through a lifetime context, before any
    client connects; every client's reads go through that same context.
    """

    name = "directory"
    params = (
        Param("start-export", "the export below holding the directory (default: its default)"),
    )

    def __init__(self, start_export: str | None = None):
        self.start_export = start_export
        self.below_name = ""
        self.context: Next | None = None
        self.entries: dict[str, Entry] = {}

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        name = self.start_export
        if name is None:
            name = await below.default_export(True, False)
        self.below_name = name
        self.context = await lifetime.open_context(below, name, readonly=True)
        size = await self.context.get_size()
        self.entries = await read_directory(self.context.pread, size, f"export {name!r}")

    async def list_exports(self, below: Layer, readonly: bool, is_tls: bool) -> list[Export]:
        return [
            Export(n, f"bytes {e.offset}-{e.offset + e.size} of {self.below_name!r}")
            for n, e in self.entries.items()
        ]

    async def default_export(self, below: Layer, readonly: bool, is_tls: bool) -> str:
        return next(iter(self.entries), "")

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        entry = self.entries.get(export_name)
        if entry is None:
            raise NBDError(errno.ENOENT, f"directory: no entry named {export_name!r}")
        assert self.context is not None
        return self.context, entry


class DirectoryProduct(SliceFilter):
    """Shape 3 (product): every entry of the directory of every export below, named
    ``BELOW/ENTRY`` (just ``ENTRY`` over a single unnamed export)."""

    name = "dirproduct"

    def __init__(self) -> None:
        self.below: Layer | None = None
        self.directories: BuildOnce[str, dict[str, Entry]] = BuildOnce(self._read)

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        self.below = below

    async def _read(self, below_export: str) -> dict[str, Entry]:
        assert self.below is not None
        ctx = await self.below.open(True, below_export)
        try:
            size = await ctx.get_size()
            return await read_directory(ctx.pread, size, f"export {below_export!r}")
        finally:
            with trio.CancelScope(shield=True):
                await ctx.close()

    async def list_exports(self, below: Layer, readonly: bool, is_tls: bool) -> list[Export]:
        names = await ProductNames.of(below, readonly, is_tls)
        out = []
        for below_name in names.below:
            try:
                entries = await self.directories.get(below_name)
            except NBDError as e:
                log.warning("dirproduct: not listing export %r: %s", below_name, e)
                continue
            out += [Export(names.join(below_name, item)) for item in entries]
        return out

    async def default_export(self, below: Layer, readonly: bool, is_tls: bool) -> str:
        exports = await self.list_exports(below, readonly, is_tls)
        return exports[0].name if exports else ""

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        names = await ProductNames.of(below, readonly, is_tls)
        below_name, item = names.split(export_name)
        entry = (await self.directories.get(below_name)).get(item)
        if entry is None:
            raise NBDError(errno.ENOENT, f"dirproduct: {below_name!r} has no entry {item!r}")
        return await below.open(True, below_name, is_tls), entry


class ManyNames(Filter):
    """``names=N`` exports ``name-000000`` .. ; each serves the default export below.
    The list is a generator, so the server streams it without building it first."""

    name = "manynames"
    params = (Param("names", "how many exports to list", parse_int, required=True),)

    def __init__(self, names: int):
        self.count = names

    async def list_exports(self, below: Layer, readonly: bool, is_tls: bool) -> Iterator[Export]:
        return (Export(f"name-{i:06d}") for i in range(self.count))

    async def default_export(self, below: Layer, readonly: bool, is_tls: bool) -> str:
        return "name-000000"

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        number = export_name.removeprefix("name-")
        if not (number.isdigit() and len(number) == 6 and int(number) < self.count):
            raise NBDError(errno.ENOENT, f"manynames: no export named {export_name!r}")
        name = await below.default_export(readonly, is_tls)
        return await below.open(readonly, name, is_tls), None
