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


__all__ = ["FormatError", "Pread"]
