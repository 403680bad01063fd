"""zstd: serve the decompressed bytes of a Zstandard file, read-only.

The layer below holds a zstd file. Two kinds are served:

* Seekable files (zstd's seekable format: independent frames and a seek table at
  the end, as ``t2sz``, zstd's ``contrib/seekable_format`` and pyzstd's
  ``SeekableZstdFile`` write them) give random access: the seek table says where each
  frame starts, so the server starts at once, and a read decompresses the frame(s) it
  falls in and keeps it in a temporary file shared by all connections (see below), so
  it is decompressed once (concurrent requests for the same frame wait for one
  decompression of it). A damaged frame fails the reads
  that need it with EIO and a message naming its offset.
* Plain files (what the ``zstd`` command writes: no seek table) cannot be read at
  an offset without decompressing everything before it. Such a file is decompressed
  once, at start-up, into an unlinked temporary file in ``$TMPDIR`` (default
  ``/var/tmp``, as nbdkit's gzip filter; it needs room for the whole decompressed
  data), and served from there; the log says so, and shows progress for large files.
  Frames with a content checksum (the ``zstd`` command writes one) are verified then.

A file that is not zstd, or whose seek table does not match its frames, or (plain) is
truncated or damaged, stops the server at start-up with exit status 1 and a message
naming the byte offset. When the layer below lists several exports (``file dir=DIR``)
each is decompressed on its own and the export list is the one below, unchanged; an
export is read when a client first opens it and kept for the server's life, and one
that is not valid zstd is refused with the message while the others are served.

Read-only: writes fail with EROFS. Multi-conn is advertised; block status reports
everything as data.

Examples:
  trionbd file disk.img.zst --filter=zstd
  trionbd file backup.tar.zst --filter=tar --filter=zstd
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..formats import FormatError, Offload, Pread
from ..formats.blocks import BlockFile
from ..formats.zstd import ZstdIndex, ZstdReader, decompress_all, read_zstd_index
from ._compressed import Blocks, Decompressed, DecompressFilter, Progress, count_text, size_text

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Seekable:
    """A seekable zstd file's seek table; each connection reads it through a ZstdReader."""

    index: ZstdIndex
    offload: Offload
    filled = False

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def description(self) -> str:
        frames = count_text(len(self.index.frames), "frame")
        return f"{self.size} bytes, seekable zstd ({frames})"

    def reader(self, pread: Pread) -> Blocks:
        return ZstdReader(pread, self.index, offload=self.offload)


@dataclass(frozen=True, slots=True)
class Unpacked:
    """A plain zstd file, decompressed whole into the filter's file at start-up: one
    block, never decompressed again."""

    size: int
    input_size: int
    filled = True

    @property
    def description(self) -> str:
        return f"{self.size} bytes, zstd-compressed ({size_text(self.input_size)})"

    def reader(self, pread: Pread) -> Blocks:
        return self

    @property
    def starts(self) -> tuple[int]:
        return (0,)

    @property
    def sizes(self) -> tuple[int]:
        return (self.size,)

    async def load(self, i: int) -> bytes:
        raise AssertionError("the whole output is in the file")


class ZstdFilter(DecompressFilter):
    """Serve the decompressed bytes of the zstd file(s) below."""

    name = "zstd"
    # each worker process would decompress a plain file again, into
    # its own temporary file
    process_safe = False

    async def load(
        self, export: str, pread: Pread, size: int, label: str, progress: Progress,
        file: BlockFile,
    ) -> Decompressed:  # fmt: skip
        index = await read_zstd_index(pread, size)
        if index is not None:
            return Seekable(index, self.offload)
        log.info(
            "zstd: %s has no seek table: decompressing it once into an unlinked temporary "
            "file in %s",
            label,
            file.file.name,
        )
        end = 0

        def write(data: bytes) -> None:
            nonlocal end
            if not file.write(end, data):
                raise FormatError(
                    f"cannot write the decompressed data to a temporary file: {file.error}"
                )
            end += len(data)

        total = await decompress_all(pread, size, write, progress=progress, offload=self.offload)
        return Unpacked(total, size)


FILTER = ZstdFilter
