"""The file-system facade, :class:`Ext2FS`: open an image, resolve paths, list and read
files. The parts it stands on (superblock, volume, maps, directories) are its own
modules in this package."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable

from .. import FormatError, Pread, read_exactly
from .directories import FT_DIR, FT_REG, FT_UNKNOWN, Directories, DirEntry
from .errors import Ext2NotADirectory, Ext2NotFound, Ext2NotRegularFile, Ext2SymlinkLoop
from .inodes import MAX_PREAD_BYTES, Inode, Volume
from .maps import FileMap, Maps
from .superblock import ROOT_INO, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Features, Superblock

MAX_SYMLINK_FOLLOWS = 40
"""Symbolic links followed while resolving one path before giving up (as Linux does)."""

MAX_SYMLINK_LEN = 4096
"""Longest symbolic link target read (Linux's PATH_MAX)."""


class Ext2FS:
    """An ext2/3/4 filesystem read through an async ``pread``.  Build with :meth:`open`.

    All methods are safe to call concurrently from several tasks: they share caches but
    hold no state across awaits that another call could corrupt.
    """

    block_size: int
    """Filesystem block size in bytes (1 KiB .. 64 KiB)."""
    needs_recovery: bool
    """The journal holds transactions not yet replayed (``needs_recovery`` feature); the
    image may then be inconsistent.  Only possible with ``allow_needs_recovery=True``."""
    read_only_reason: str | None
    """Why the filesystem must not be written through (unknown RO_COMPAT features, a
    journal needing recovery, ...), or None."""
    metadata_csum: bool
    features: Features
    uuid: bytes
    volume_name: str
    blocks_count: int
    inodes_count: int
    inode_size: int
    groups_count: int

    def __init__(self, pread: Pread, size: int, sb: bytes, allow_needs_recovery: bool) -> None:
        """Use :meth:`open`; this parses and validates the superblock bytes ``sb``."""
        parsed = Superblock.parse(sb, size, allow_needs_recovery)
        self.block_size = parsed.block_size
        self.needs_recovery = parsed.needs_recovery
        self.read_only_reason = parsed.read_only_reason
        self.metadata_csum = parsed.metadata_csum
        self.features = parsed.features
        self.uuid = parsed.uuid
        self.volume_name = parsed.volume_name
        self.blocks_count = parsed.blocks_count
        self.inodes_count = parsed.inodes_count
        self.inode_size = parsed.inode_size
        self.groups_count = parsed.groups_count
        self._vol = Volume(pread, size, parsed)
        self._maps = Maps(self._vol)
        self._dirs = Directories(self._vol, self._maps)

    @classmethod
    async def open(cls, pread: Pread, size: int, *, allow_needs_recovery: bool = False) -> Ext2FS:
        """Read and validate the superblock, group descriptor 0 and the root inode.

        ``size`` is the image size in bytes; nothing outside it is ever read.  Raises
        :class:`Ext2Unsupported` for a feature that prevents reading (named in the
        message), :class:`Ext2ChecksumError` for a checksum mismatch and
        :class:`FormatError` for anything else wrong.
        """
        if size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE:
            raise FormatError(
                f"image of {size} bytes is too small for an ext2/3/4 filesystem "
                f"(the superblock ends at byte {SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE})"
            )
        sb = await read_exactly(pread, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, "the superblock")
        fs = cls(pread, size, sb, allow_needs_recovery)
        root = await fs.inode(ROOT_INO)
        if not root.is_dir:
            raise FormatError(f"root inode {ROOT_INO} is a {root.kind}, not a directory")
        return fs

    def __repr__(self) -> str:
        return (
            f"<Ext2FS {self.blocks_count} blocks of {self.block_size} bytes, "
            f"features: {self.features}>"
        )

    async def check_group_descriptors(self) -> None:
        """Read and validate every group descriptor (checksum, inode table location);
        raise FormatError for the first damaged one.  Lookups read only the descriptors
        they need: this finds damage anywhere in the table at once."""
        for g in range(self.groups_count):
            await self._vol.group(g)

    async def inode(self, ino: int) -> Inode:
        """The parsed inode ``ino`` (cached).  Raises FormatError if it is out of range,
        not in use, or corrupt."""
        return await self._vol.inode(ino)

    async def extents(self, ino: int) -> FileMap:
        """The file's logical-to-physical map (cached).

        For an inline-data file or a fast symlink, :attr:`FileMap.inline` holds the bytes.
        Devices, FIFOs and sockets have an empty map.  Raises :class:`Ext2Unsupported`
        for an encrypted inode and FormatError for a corrupt map.
        """
        return await self._maps.get(ino)

    # ---------------------------------------------------------------- file data

    async def read(self, ino: int, offset: int, length: int) -> bytes:
        """File data of inode ``ino`` at ``offset``: at most ``length`` bytes, fewer only
        at the end of the file.  Holes and uninitialized extents read as zeros."""
        fmap = await self.extents(ino)
        if offset < 0 or length < 0:
            raise ValueError(f"negative range: offset {offset}, length {length}")
        if fmap.inline is not None:
            return fmap.inline[offset : offset + length]
        parts: list[bytes] = []
        for seg in fmap.lookup(offset, length):
            if seg.physical is None:
                parts.append(bytes(seg.length))
                continue
            done = 0
            while done < seg.length:
                n = min(MAX_PREAD_BYTES, seg.length - done)
                parts.append(await self._vol.read(seg.physical + done, n,
                                                  f"inode {ino}: data at file offset "
                                                  f"{seg.offset + done}"))  # fmt: skip
                done += n
        return b"".join(parts)

    async def readlink(self, ino: int) -> str:
        """The target of symbolic link ``ino`` (decoded as UTF-8, surrogateescape)."""
        inode = await self.inode(ino)
        if not inode.is_symlink:
            raise FormatError(f"inode {ino} is a {inode.kind}, not a symbolic link")
        return (await self._link_target(inode)).decode("utf-8", "surrogateescape")

    async def _link_target(self, inode: Inode) -> bytes:
        if inode.size > MAX_SYMLINK_LEN:
            raise FormatError(f"symbolic link inode {inode.ino}: target length "
                              f"{inode.size} exceeds {MAX_SYMLINK_LEN}")  # fmt: skip
        fmap = await self.extents(inode.ino)
        if fmap.inline is not None:
            target = fmap.inline
        else:
            target = b""
            for seg in fmap.lookup(0, inode.size):
                if seg.physical is None:
                    raise FormatError(f"symbolic link inode {inode.ino}: target block "
                                      f"is a hole")  # fmt: skip
                target += await self._vol.read(seg.physical, seg.length,
                                               f"symbolic link inode {inode.ino}")  # fmt: skip
        if b"\0" in target:
            raise FormatError(f"symbolic link inode {inode.ino}: target contains a NUL byte")
        return target

    # ---------------------------------------------------------------- directories and paths

    async def readdir(self, ino: int) -> list[DirEntry]:
        """The entries of directory ``ino`` (without '.' and '..') in on-disk order."""
        inode = await self.inode(ino)
        return [
            DirEntry(name.decode("utf-8", "surrogateescape"), d_ino, ft)
            for name, d_ino, ft in await self._dirs.entries(inode)
            if name not in (b".", b"..")
        ]

    async def lookup(self, path: str, *, follow: bool = True) -> int:
        """Inode number of ``path`` (absolute, or relative to the root).

        Symbolic links in the middle of the path are always followed; the last component
        is followed when ``follow`` is true.  '.' and '..' work as in POSIX ('..' of the
        root is the root).  Raises :class:`Ext2NotFound` (or :class:`Ext2NotADirectory`)
        if the path does not exist, :class:`Ext2SymlinkLoop` after
        :data:`MAX_SYMLINK_FOLLOWS` links.
        """
        return (await self._resolve(path, follow)).ino

    async def resolve_regular(self, path: str) -> Inode:
        """The inode of the regular file at ``path`` (following symlinks), or raise
        :class:`Ext2NotRegularFile` naming what it is instead."""
        inode = await self._resolve(path, True)
        if not inode.is_reg:
            raise Ext2NotRegularFile(f"{path!r} is a {inode.kind} (inode {inode.ino}), "
                                     f"not a regular file")  # fmt: skip
        return inode

    async def _resolve(self, path: str, follow: bool) -> Inode:
        root = await self.inode(ROOT_INO)
        stack = [root]
        names = ["/"]
        remaining = deque(path.split("/"))
        links = 0
        while remaining:
            comp = remaining.popleft()
            here = "/" + "/".join(names[1:])
            current = stack[-1]
            if not current.is_dir:  # 'file/x', 'file/..', 'file/' all fail, as in POSIX
                raise Ext2NotADirectory(f"{path!r}: {here!r} is a {current.kind}, "
                                        f"not a directory")  # fmt: skip
            if comp in ("", "."):
                continue
            if comp == "..":
                if len(stack) > 1:
                    stack.pop()
                    names.pop()
                continue
            raw = comp.encode("utf-8", "surrogateescape")
            child_ino = await self._dirs.find(current, raw)
            if child_ino is None:
                raise Ext2NotFound(f"{path!r}: no entry {comp!r} in directory {here!r} "
                                   f"(inode {current.ino})")  # fmt: skip
            child = await self.inode(child_ino)
            if child.is_symlink and (remaining or follow):
                links += 1
                if links > MAX_SYMLINK_FOLLOWS:
                    raise Ext2SymlinkLoop(f"{path!r}: too many levels of symbolic links "
                                          f"(more than {MAX_SYMLINK_FOLLOWS})")  # fmt: skip
                target = (await self._link_target(child)).decode("utf-8", "surrogateescape")
                if not target:
                    raise Ext2NotFound(f"{path!r}: symbolic link {comp!r} is empty")
                if target.startswith("/"):
                    stack, names = [root], ["/"]
                remaining.extendleft(reversed(target.split("/")))
                continue
            stack.append(child)
            names.append(comp)
        return stack[-1]

    async def iter_files(
        self, on_error: Callable[[str, FormatError], None] | None = None
    ) -> AsyncIterator[tuple[str, Inode]]:
        """Every regular file as ``(absolute path, inode)``, depth first, names sorted.

        A hard-linked file appears once per path.  Symbolic links are not followed.
        Directories are read whole (in large preads) and their inodes fetched in
        inode-table chunks.  A damaged directory or inode (or a directory reachable
        twice) raises FormatError; with ``on_error`` it is passed to
        ``on_error(path, error)`` instead and skipped (a directory with everything below
        it), and the rest of the tree is still listed.
        """

        def skip(path: str, error: FormatError) -> None:
            if on_error is None:
                raise error
            on_error(path, error)

        root = await self.inode(ROOT_INO)
        visited = {ROOT_INO}
        stack: list[tuple[str, Inode]] = [("", root)]
        while stack:
            prefix, directory = stack.pop()
            try:
                entries = await self._dirs.entries(directory)
            except FormatError as e:
                skip(prefix or "/", e)
                continue
            entries.sort()
            subdirs: list[tuple[str, Inode]] = []
            for name, d_ino, ftype in entries:
                if name in (b".", b"..") or ftype not in (FT_UNKNOWN, FT_REG, FT_DIR):
                    continue
                path = prefix + "/" + name.decode("utf-8", "surrogateescape")
                try:
                    child = await self.inode(d_ino)
                except FormatError as e:
                    skip(path, e)
                    continue
                if child.is_reg:
                    yield path, child
                elif child.is_dir:
                    if d_ino in visited:
                        cycle = f"directory inode {d_ino} is reachable twice (again as {path!r})"
                        skip(path, FormatError(f"{cycle}: directory cycle"))
                        continue
                    visited.add(d_ino)
                    subdirs.append((path, child))
            stack.extend(reversed(subdirs))
