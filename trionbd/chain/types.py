"""Small value types of the chain API."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from ..protocol.constants import BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, BLOCK_SIZE_PREFERRED


@dataclass(frozen=True, slots=True)
class Export:
    """One entry of an export list: the name a client asks for, and a description."""

    name: str
    description: str = ""


def describe_file(
    size: int,
    *,
    mode: int | None = None,
    mtime: float | None = None,
    detail: str = "",
    kind: str = "regular file",
) -> str:
    """The description of an export that is a file, the same for every plugin and filter:
    ``regular file, 1048576 bytes, mode 0644, mtime 2024-05-01T12:00:00Z`` (mode and
    mtime when known; ``detail`` follows the size, e.g. `` (sparse, 4096 stored)``)."""
    text = f"{kind}, {size} byte{'' if size == 1 else 's'}{detail}"
    if mode is not None:
        text += f", mode {mode & 0o7777:04o}"
    if mtime is not None:
        try:
            when = datetime.fromtimestamp(int(mtime), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, ValueError, OSError):
            when = repr(mtime)
        text += f", mtime {when}"
    return text


ExportList = Iterable[Export] | AsyncIterable[Export]
"""What ``list_exports`` returns: any iterable of exports, or an async iterable for a list
fetched page by page (the s3 plugin's keys), so that long lists reach the client as they
come. Consumers iterate either kind with :func:`each_export`."""


async def each_export(exports: ExportList) -> AsyncIterator[Export]:
    """The exports of a ``list_exports`` answer, whichever kind of iterable it is."""
    if isinstance(exports, AsyncIterable):
        async for export in exports:
            yield export
    else:
        for export in exports:
            yield export


class Extent(NamedTuple):
    """A run of bytes with the same ``base:allocation`` state.

    ``flags`` is a combination of ``State.HOLE`` and ``State.ZERO`` (0 = data).
    """

    offset: int
    length: int
    flags: int


class Sparse(bytes):
    """Read data that knows where its holes are.

    A ``pread`` may return this instead of plain ``bytes``; the server then sends the
    holes as ``OFFSET_HOLE`` chunks to clients that negotiated structured replies.
    ``holes`` holds sorted, non-overlapping ``(offset, length)`` pairs relative to the
    start of the data; the bytes there are zero. Slicing gives plain ``bytes``.
    """

    holes: tuple[tuple[int, int], ...]

    def __new__(cls, data: bytes, holes: tuple[tuple[int, int], ...]) -> Sparse:
        obj = super().__new__(cls, data)
        obj.holes = holes
        return obj


class Concurrency(enum.IntEnum):
    """How much concurrency a plugin or filter tolerates (nbdkit's thread models).

    Lower values are stricter; the server honours the strictest layer.
    """

    SERIALIZE_CONNECTIONS = 0
    """One client at a time; others wait until it disconnects."""
    SERIALIZE_ALL_REQUESTS = 1
    """One request at a time across all clients."""
    SERIALIZE_REQUESTS = 2
    """One request at a time per context (connection); clients run concurrently."""
    PARALLEL = 3
    """Requests run concurrently, also within one connection."""


class FuaMode(enum.IntEnum):
    """``can_fua`` answers: how a layer handles Force Unit Access."""

    NONE = 0
    EMULATE = 1
    """FUA is emulated by a flush after the write."""
    NATIVE = 2


class ZeroMode(enum.IntEnum):
    """``can_zero`` answers."""

    NONE = 0
    EMULATE = 1
    """Zeroing is emulated by writing zeroes."""
    NATIVE = 2


class CacheMode(enum.IntEnum):
    """``can_cache`` answers."""

    NONE = 0
    EMULATE = 1
    """Cache requests are emulated by reading and discarding."""
    NATIVE = 2


class BlockSize(NamedTuple):
    """Block size constraints advertised with ``NBD_INFO_BLOCK_SIZE``."""

    minimum: int = BLOCK_SIZE_MIN
    preferred: int = BLOCK_SIZE_PREFERRED
    maximum: int = BLOCK_SIZE_MAX


DEFAULT_BLOCK_SIZE = BlockSize()
