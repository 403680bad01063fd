"""What the reader tests share: an image in memory behind an async ``pread``, and source
files (plain, or sparse with random data regions) with their SEEK_DATA/SEEK_HOLE map."""

from __future__ import annotations

import os
import random
from pathlib import Path

import trio


class MemoryImage:
    """Bytes in memory (``data``, editable in place) behind an async ``pread`` that, like
    a disk, refuses to read outside them, yields to Trio as a real read does, and records
    every call in ``reads``."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)
        self.reads: list[tuple[int, int]] = []

    async def pread(self, offset: int, length: int) -> bytes:
        assert 0 <= offset and 0 < length and offset + length <= len(self.data), (offset, length)
        self.reads.append((offset, length))
        await trio.lowlevel.checkpoint()
        return bytes(self.data[offset : offset + length])


def write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path``, creating its directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_sparse(path: Path, size: int, regions: list[tuple[int, int]], rng: random.Random) -> None:
    """A file of ``size`` bytes, a hole except for random bytes at each (offset, length)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in regions:
            f.seek(offset)
            f.write(rng.randbytes(length))


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of a file that hold data, from SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out
