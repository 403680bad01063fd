"""Pure readers of on-disk formats (tar member maps, ext2/3/4, partition tables, zip,
gzip, xz, zstd, ISO 9660).

Every reader takes an async ``pread(offset, length) -> bytes`` callable, so it works
on anything: a layer of the chain, an in-memory image in a test, a local file.
Readers never import Trio and never touch the network. What they
share is here: the :class:`FormatError` they raise, :func:`read_exactly` (a checked
``pread``), :func:`map_range` (a byte range of a file or member stored in runs),
:class:`Offload` (how decompressing readers let a caller move their CPU work to a
worker thread) and :func:`compression_of` (which compressor made a file, by its magic).
"""

from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

Pread = Callable[[int, int], Awaitable[bytes]]
"""``await pread(offset, length)`` returns exactly ``length`` bytes at ``offset``."""

BlockingRead = Callable[[int, int], bytes]
"""``read(offset, length)``: ``pread`` for a reader built on a blocking library
(``tarfile``): it runs in a worker thread whose reads await a ``pread`` in Trio."""


_T = TypeVar("_T")


class Offload(Protocol):
    """Runs a synchronous function and returns its result: a reader that decompresses
    takes one for its CPU work (a filter passes ``trio.to_thread.run_sync``)."""

    def __call__(self, fn: Callable[[], _T], /) -> Awaitable[_T]: ...


async def run_inline(fn: Callable[[], _T]) -> _T:
    """The :class:`Offload` that runs the function right here (the default)."""
    return fn()


class FormatError(Exception):
    """The bytes do not form a valid (or supported) structure.

    The message names what was wrong and where (a byte offset, an inode number),
    so the user can tell a corrupt image from an unsupported feature.
    """


async def read_exactly(pread: Pread, offset: int, length: int, what: str) -> bytes:
    """``await pread(offset, length)`` as ``bytes``; an answer of another length is a
    :class:`FormatError` naming ``what`` was being read and where."""
    data = await pread(offset, length)
    if len(data) != length:
        raise FormatError(
            f"short read of {what}: asked for {length} bytes at offset {offset}, got {len(data)}"
        )
    return bytes(data)


_Segment = TypeVar("_Segment")


def map_range(
    starts: Sequence[int],
    ends: Sequence[int],
    sources: Sequence[int],
    offset: int,
    end: int,
    segment: Callable[[int, int, int | None], _Segment],
) -> list[_Segment]:
    """Cover bytes ``[offset, end)`` of a file or member stored in runs, in order.

    Run ``i`` holds bytes ``[starts[i], ends[i])``, stored from ``sources[i]`` on; the runs
    are sorted and do not overlap, and the bytes outside them are holes. Returns
    ``segment(offset, length, source)`` for each piece, ``source`` None for a hole; a
    reader's lookup (``FileMap.lookup``, ``TarMember.segments``) passes its ``Segment``.
    Costs O(log r + k) for r runs and k pieces.
    """
    out: list[_Segment] = []
    count = len(starts)
    i = bisect_right(starts, offset) - 1
    if i < 0 or ends[i] <= offset:
        i += 1  # offset is in the hole before run i
    pos = offset
    while pos < end:
        if i < count and starts[i] <= pos:
            stop = min(end, ends[i])
            out.append(segment(pos, stop - pos, sources[i] + pos - starts[i]))
            i += 1
        else:
            stop = min(end, starts[i]) if i < count else end
            out.append(segment(pos, stop - pos, None))
        pos = stop
    return out


COMPRESSION_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
)
"""The first bytes of files made by each compressor."""
MAGIC_LENGTH = max(len(magic) for magic, _ in COMPRESSION_MAGIC)


def compression_of(head: bytes) -> str | None:
    """The compressor whose magic ``head`` (a file's first :data:`MAGIC_LENGTH` bytes or
    more) starts with: ``"gzip"``, ``"xz"``, ``"zstd"``, ``"bzip2"``; None for none."""
    for magic, name in COMPRESSION_MAGIC:
        if head.startswith(magic):
            return name
    return None


__all__ = [
    "MAGIC_LENGTH",
    "BlockingRead",
    "FormatError",
    "Offload",
    "Pread",
    "compression_of",
    "map_range",
    "read_exactly",
    "run_inline",
]
