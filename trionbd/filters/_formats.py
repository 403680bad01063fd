"""What the filters built on the readers of :mod:`trionbd.formats` share (tar, ext2,
partition): the layer below as a reader's ``pread``, a blocking reader run in a worker
thread, and data stored piece by piece.

A tar member and a file of an ext2 image are both made of *pieces*: runs of their bytes
stored contiguously in the layer below, and holes that store nothing and read as
zeroes (``TarMember.segments`` and ``FileMap.lookup`` give the pieces of a request).
Both filters serve them the same way, here: one call below per stored piece, holes
answered without the layer below, and nothing written when a request needs bytes that a
hole cannot hold.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

from ..chain import NBDError, Next, Sparse
from ..formats import MAGIC_LENGTH, BlockingRead, Pread, compression_of
from ..protocol.constants import CmdFlag

Piece = tuple[int, int, int | None]
"""``(offset, length, below)``: ``length`` bytes at ``offset`` of the served data are at
offset ``below`` of the layer below, or in a hole (zeroes, nothing stored) when ``below``
is None. The pieces of a request are in order and cover it exactly. The readers'
``Segment`` named tuples are pieces as they are."""

Refuse = Callable[[Piece], NBDError]
"""The error for a request that needs bytes stored in the hole it is given."""


def reader(ctx: Next) -> Pread:
    """``ctx`` as the ``pread(offset, length)`` that the readers of trionbd.formats take."""

    async def pread(offset: int, length: int) -> bytes:
        return await ctx.pread(length, offset)

    return pread


T = TypeVar("T")


async def in_thread(
    scan: Callable[[BlockingRead], T], pread: Pread, limiter: trio.CapacityLimiter
) -> T:
    """``scan(read)`` in a worker thread of ``limiter``: a reader built on a blocking
    library (``tarfile``) whose ``read(offset, length)`` awaits ``pread`` in Trio
    (``trio.from_thread.run``). What ``pread`` raises reaches ``scan`` as it is; a
    cancelled caller waits for the thread, whose next read raises ``trio.Cancelled``
    (``scan`` may also call ``trio.from_thread.check_cancelled()`` between reads)."""

    def read(offset: int, length: int) -> bytes:
        return trio.from_thread.run(pread, offset, length)

    return await trio.to_thread.run_sync(scan, read, limiter=limiter)


async def read(next: Next, pieces: Sequence[Piece], offset: int, flags: int) -> bytes:
    """The bytes of ``pieces``, which start at ``offset``: one read below per stored piece
    (the answer for a lone one is returned as it is), zeroes for the holes, which a
    :class:`~trionbd.chain.Sparse` result marks so that they go out as hole chunks."""
    if len(pieces) == 1 and (below := pieces[0][2]) is not None:
        return await next.pread(pieces[0][1], below, flags)
    parts: list[bytes] = []
    holes: list[tuple[int, int]] = []
    for start, length, below in pieces:
        if below is None:
            parts.append(bytes(length))
            holes.append((start - offset, length))
        else:
            parts.append(await next.pread(length, below, flags))
    data = b"".join(parts)
    return Sparse(data, tuple(holes)) if holes else data


async def write(
    next: Next, pieces: Sequence[Piece], buf: bytes, offset: int, flags: int, refuse: Refuse
) -> None:
    """Write ``buf``, which starts at ``offset``, into the stored pieces. The bytes meant
    for a hole must be zeroes (it reads as zeroes already); otherwise ``refuse(hole)`` is
    raised before anything is written."""
    for piece in pieces:
        start, length, below = piece
        if below is None and buf.count(0, start - offset, start - offset + length) != length:
            raise refuse(piece)
    for start, length, below in pieces:
        if below is not None:
            at = start - offset
            await next.pwrite(buf if length == len(buf) else buf[at : at + length], below, flags)


async def zero(next: Next, pieces: Sequence[Piece], flags: int, refuse: Refuse) -> None:
    """Zero the stored pieces; the holes read as zeroes already. With NO_HOLE the client
    asks for allocated zeroes, which a hole cannot give: ``refuse(hole)`` is raised
    before anything is zeroed."""
    if flags & CmdFlag.NO_HOLE:
        for piece in pieces:
            if piece[2] is None:
                raise refuse(piece)
    await each_stored(next.zero, pieces, flags)


async def each_stored(
    call: Callable[[int, int, int], Awaitable[None]], pieces: Sequence[Piece], flags: int
) -> None:
    """``call(length, offset below, flags)`` for each stored piece (trim, zero, cache of
    the layer below); holes are skipped."""
    for _, length, below in pieces:
        if below is not None:
            await call(length, below, flags)


FILTER_FOR = {"gzip": "gzip", "xz": "xz", "zstd": "zstd"}
"""The filter that decompresses what each compressor makes."""


async def compression_hint(pread: Pread, size: int) -> str:
    """For a container that could not be read: ``"; this looks like gzip: add
    --filter=gzip"`` when its data starts with a compressor's magic, else ``""``."""
    if size < MAGIC_LENGTH:
        return ""
    kind = compression_of(await pread(0, MAGIC_LENGTH))
    if kind is None:
        return ""
    if kind in FILTER_FOR:
        return f"; this looks like {kind}: add --filter={FILTER_FOR[kind]}"
    return f"; this looks like {kind}, which trionbd cannot decompress: decompress it first"
