"""xz: serve the decompressed bytes of an xz file, read-only, with random access.

The layer below holds an xz file (one or more streams, as ``cat a.xz b.xz`` makes,
optionally with zero padding). An xz file ends in an index of its blocks, which gives
the decompressed size and where each block starts without decompressing anything: the
server starts at once. A read decompresses the block(s) it falls in, whole, once: each
block decompressed is kept in a temporary file shared by all connections (in
``$TMPDIR``, default ``/var/tmp``; sparse, at most the decompressed size), so reading
it again is a ``pread`` of that file; concurrent requests for the same block wait for
one decompression of it. Each block's check (CRC-32, CRC-64 or
SHA-256) is verified when it is decompressed; a damaged block fails the reads that
need it with EIO and a message naming its offset, and the other blocks are served.

Random access is only as good as the blocks are small. ``xz -T0`` (threads) and ``xz
--block-size=16MiB`` write many blocks; plain ``xz`` writes the whole file as one
block. That works, but the first read decompresses the whole file (in memory, then
into the temporary file): a file of one block larger than 16 MiB is logged as slow
for random reads.

A file that is not xz (or is truncated: the index is at the end) stops the server at
start-up with exit status 1 and a message naming the byte offset, as does a block
larger than ``xz-max-block``. When the layer below lists several exports (``file
dir=DIR``) each is decompressed on its own and the export list is the one below,
unchanged; an export's index is read when a client first opens it, and one that is
not valid xz is refused with the message while the others are served.

Read-only: writes fail with EROFS. Multi-conn is advertised; block status reports
everything as data. Memory: a block being decompressed (at most xz-max-block; ``xz
-T0`` blocks hold 24 MiB at preset 6) per request that needs one. ``xz-max-depth``
(nbdkit's blocks kept in memory per connection) is accepted and has no effect: every
block is kept in the file.

Examples:
  trionbd file disk.img.xz --filter=xz
  trionbd file dir=/srv/images --filter=xz
  trionbd file backup.tar.xz --filter=tar --filter=xz
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..chain import ConfigError, Param, parse_int, parse_size
from ..formats import Offload, Pread
from ..formats.blocks import BlockFile
from ..formats.xz import DEFAULT_MAX_BLOCK, DEFAULT_MAX_DEPTH, XzIndex, XzReader, read_xz_index
from ._compressed import Blocks, Decompressed, DecompressFilter, Progress, count_text, size_text

log = logging.getLogger(__name__)

SLOW_BLOCK = 16 << 20
"""A file that is one block larger than this is logged: random reads will be slow
(nbdkit's xz filter manual suggests blocks of 16 MiB)."""


@dataclass(frozen=True, slots=True)
class Xz:
    """The block index of an xz file; each connection reads it through an XzReader."""

    index: XzIndex
    max_block: int
    offload: Offload
    filled = False

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def description(self) -> str:
        blocks = count_text(len(self.index.blocks), "block")
        largest = size_text(self.index.largest_block)
        return f"{self.size} bytes, xz-compressed ({blocks}, the largest {largest})"

    def reader(self, pread: Pread) -> Blocks:
        return XzReader(pread, self.index, max_block=self.max_block, offload=self.offload)


class XzFilter(DecompressFilter):
    """Serve the decompressed bytes of the xz file(s) below."""

    name = "xz"
    process_safe = True  # each worker reads the block index and keeps its own decompressed file
    params = (
        Param(
            "xz-max-block",
            "refuse files with a block larger than SIZE when decompressed",
            parse_size,
            default="512M",
        ),
        Param(
            "xz-max-depth",
            "accepted for nbdkit's command lines; no effect (blocks are kept in a file)",
            parse_int,
            default="8",
        ),
    )

    def __init__(
        self, xz_max_block: int = DEFAULT_MAX_BLOCK, xz_max_depth: int = DEFAULT_MAX_DEPTH
    ):
        super().__init__()
        if xz_max_block < 1:
            raise ConfigError(f"xz: xz-max-block must be at least 1, not {xz_max_block}")
        if xz_max_depth < 1:
            raise ConfigError(f"xz: xz-max-depth must be at least 1, not {xz_max_depth}")
        self.max_block = xz_max_block

    async def load(
        self, export: str, pread: Pread, size: int, label: str, progress: Progress,
        file: BlockFile,
    ) -> Decompressed:  # fmt: skip
        index = await read_xz_index(pread, size)
        xz = Xz(index, self.max_block, self.offload)
        xz.reader(pread)  # refuses blocks larger than xz-max-block
        if len(index.blocks) == 1 and index.size > SLOW_BLOCK:
            log.warning(
                "xz: %s is a single block of %s: the first read will be slow (it decompresses "
                "all of it); xz -T0 or --block-size=16MiB writes many blocks",
                label,
                size_text(index.size),
            )
        return xz


FILTER = XzFilter
