"""Pure readers of on-disk formats (tar member maps, ext2/3/4, partition tables).

Every reader takes an async ``pread(offset, length) -> bytes`` callable, so it works
on anything: a layer of the chain, an in-memory image in a test, a local file.
Readers never import Trio's socket machinery and never touch the network.
"""

from collections.abc import Awaitable, Callable

Pread = Callable[[int, int], Awaitable[bytes]]
"""``await pread(offset, length)`` returns exactly ``length`` bytes at ``offset``."""


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


__all__ = ["FormatError", "Pread", "read_exactly"]
