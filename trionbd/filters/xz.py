"""xz: serve the decompressed bytes of an xz file, read-only, with random access.

The layer below holds an xz file (one or more streams, as ``cat a.xz b.xz`` makes,
optionally with zero padding). An xz file ends in an index of its blocks, which gives
the decompressed size and where each block starts without decompressing anything: the
server starts at once. A read decompresses the block(s) it falls in, whole, and keeps
the most recently used ones (``xz-max-depth``, per connection); concurrent requests for
the same block wait for one decompression of it. Each block's check (CRC-32, CRC-64 or
SHA-256) is verified when it is decompressed; a damaged block fails the reads that
need it with EIO and a message naming its offset, and the other blocks are served.

Random access is only as good as the blocks are small. ``xz -T0`` (threads) and ``xz
--block-size=16MiB`` write many blocks; plain ``xz`` writes the whole file as one
block. That works, but a read that misses the cache decompresses the whole file (kept
in memory while it stays in the cache): a file of one block larger than 16 MiB is
logged as slow for random reads.

A file that is not xz (or is truncated: the index is at the end) stops the server at
start-up with exit status 1 and a message naming the byte offset, as does a block
larger than ``xz-max-block``. When the layer below lists several exports (``file
dir=DIR``) each is decompressed on its own and the export list is the one below,
unchanged; an export's index is read when a client first opens it, and one that is
not valid xz is refused with the message while the others are served.

Read-only: writes fail with EROFS. Multi-conn is advertised; block status reports
everything as data. Memory: up to xz-max-block × xz-max-depth per connection (as
nbdkit's xz filter), usually far less (``xz -T0`` blocks hold 24 MiB at preset 6).

Examples:
  trionbd file disk.img.xz --filter=xz
  trionbd file dir=/srv/images --filter=xz xz-max-depth=4
  trionbd file backup.tar.xz --filter=tar --filter=xz
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from ..chain import ConfigError, Param, parse_int, parse_size
from ..formats import Offload, Pread
from ..formats.xz import DEFAULT_MAX_BLOCK, DEFAULT_MAX_DEPTH, XzIndex, XzReader, read_xz_index
from ._compressed import Decompressed, DecompressFilter, Progress, Reader, size_text

log = logging.getLogger(__name__)

SLOW_BLOCK = 16 << 20
"""A file that is one block larger than this is logged: random reads will be slow
(nbdkit's xz filter manual suggests blocks of 16 MiB)."""


@dataclass(frozen=True, slots=True)
class Xz:
    """The block index of an xz file; each connection reads it through an XzReader."""

    index: XzIndex
    max_block: int
    max_depth: int
    offload: Offload

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def description(self) -> str:
        blocks = len(self.index.blocks)
        return (
            f"{self.size} bytes, xz-compressed ({blocks} block{'s' if blocks != 1 else ''}, "
            f"the largest {size_text(self.index.largest_block)})"
        )

    def reader(self, pread: Pread) -> Reader:
        return XzReader(
            pread, self.index, max_block=self.max_block, max_depth=self.max_depth,
            offload=self.offload, lock=trio.Lock,
        )  # fmt: skip


class XzFilter(DecompressFilter):
    """Serve the decompressed bytes of the xz file(s) below."""

    name = "xz"
    process_safe = True  # each worker reads the file's block index; the caches are per connection
    params = (
        Param(
            "xz-max-block",
            "refuse files with a block larger than SIZE when decompressed",
            parse_size,
            default="512M",
        ),
        Param("xz-max-depth", "blocks kept decompressed per connection", parse_int, default="8"),
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
        self.max_depth = xz_max_depth

    async def load(
        self, export: str, pread: Pread, size: int, label: str, progress: Progress
    ) -> Decompressed:
        index = await read_xz_index(pread, size)
        xz = Xz(index, self.max_block, self.max_depth, self.offload)
        xz.reader(pread)  # refuses blocks larger than xz-max-block
        if len(index.blocks) == 1 and index.size > SLOW_BLOCK:
            log.warning(
                "xz: %s is a single block of %s: random reads will be slow (each cache miss "
                "decompresses from its start); xz -T0 or --block-size=16MiB writes many blocks",
                label,
                size_text(index.size),
            )
        return xz


FILTER = XzFilter
