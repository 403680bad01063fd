"""The errors of the ext2/3/4 reader: every one is a :class:`~trionbd.formats.FormatError`."""

from __future__ import annotations

from .. import FormatError


class Ext2NotFound(FormatError):
    """A path (or one of its components) does not exist."""


class Ext2NotADirectory(Ext2NotFound):
    """A path component other than the last is not a directory."""


class Ext2NotRegularFile(FormatError):
    """A path resolves to a directory, device, FIFO, socket or symlink, not a regular file."""


class Ext2SymlinkLoop(FormatError):
    """Resolving a path followed more than ``MAX_SYMLINK_FOLLOWS`` symbolic links."""


class Ext2Unsupported(FormatError):
    """The image uses a feature this reader cannot read (named in the message)."""


class Ext2ChecksumError(FormatError):
    """A metadata checksum does not match: the named structure is corrupt."""
