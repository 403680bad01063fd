"""Read-only reader of ext2, ext3 and ext4 filesystem images.

:class:`Ext2FS` parses an image through an async ``pread(offset, length)`` callable (see
:data:`trionbd.formats.Pread`): the superblock, group descriptors, inodes, block maps
(direct, indirect, double and triple indirect), extent trees of any depth, inline data,
symbolic links, and linear and hash-indexed (htree) directories.  It resolves paths,
lists every regular file, and gives each file's logical-to-physical map
(:class:`FileMap`) so a caller can serve the file's bytes straight from the image.

Guarantees:

* Every problem with the image raises :class:`~trionbd.formats.FormatError` (or one of the
  subclasses below) whose message names the structure, the inode number, the block or
  byte offset and, for an unsupported feature, the feature's name.  Nothing else escapes
  from parsing (a failing ``pread`` itself propagates unchanged; a negative offset or
  length passed to :meth:`FileMap.lookup` or :meth:`Ext2FS.read` is a ValueError).  No
  read is ever issued outside ``[0, size)``, and corrupt pointers cannot make the reader
  loop or grow without bound: tree depths are bounded, directory cycles are detected,
  and a file whose map uses more blocks than the file system has is refused.
* Features that change how data must be read and that this reader does not implement
  (unknown INCOMPAT bits, compression, encryption, ``dirdata``, a journal that still
  needs recovery unless explicitly allowed) are refused at :meth:`Ext2FS.open` with
  :class:`Ext2Unsupported`.  Features that only matter to writers (unknown RO_COMPAT
  bits, ...) are reported in :attr:`Ext2FS.read_only_reason`.
* With ``metadata_csum`` the crc32c of every superblock, group descriptor, inode, extent
  tree block and directory block (leaf tail and htree tail) that is read is verified;
  with ``uninit_bg`` (``gdt_csum``) the crc16 of each group descriptor is verified.
  A mismatch raises :class:`Ext2ChecksumError`.
* Reads are batched: inode tables are read in chunks of :data:`ITABLE_CHUNK_BYTES`,
  directories in runs of up to :data:`MAX_PREAD_BYTES`, and the blocks of one level of an
  extent tree or block map with one ``pread`` per physically contiguous run.  Metadata is
  cached in bounded LRU caches, so memory stays bounded on any image.
* A lookup in a hash-indexed directory reads the htree root, its interior nodes and the
  leaf (or leaves, on a hash collision) it needs, never the whole directory.  Linear
  directories are scanned, and small ones (:data:`DIR_CACHE_MAX_BYTES`) remembered.

Limitations: the journal is never replayed (a ``needs_recovery`` image opened with
``allow_needs_recovery=True`` shows the pre-journal state); extended attributes other than
the in-inode ``system.data`` are not read; in a casefolded directory a name is found only
by its exact bytes (linear scan, no Unicode folding); SipHash-indexed directories
(casefold + encrypt) are scanned linearly.

The reader is plain ``async def`` code with no Trio imports and no threads.

Example::

    fs = await Ext2FS.open(pread, size)
    inode = await fs.resolve_regular("/images/disk.img")
    fmap = await fs.extents(inode.ino)
    for seg in fmap.lookup(0, 65536):
        ...   # seg.physical is a byte offset in the image, or None for zeros
"""

from __future__ import annotations

import stat
import struct
from array import array
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Generic, NamedTuple, TypeVar

import crc32c

from trionbd.formats import FormatError, Pread, map_range, read_exactly

__all__ = [
    "MAX_SYMLINK_FOLLOWS",
    "DirEntry",
    "Ext2ChecksumError",
    "Ext2FS",
    "Ext2NotADirectory",
    "Ext2NotFound",
    "Ext2NotRegularFile",
    "Ext2SymlinkLoop",
    "Ext2Unsupported",
    "Features",
    "FileMap",
    "HashVersion",
    "Inode",
    "Segment",
    "dx_hash",
]


# --------------------------------------------------------------------------------------
# Errors


class Ext2NotFound(FormatError):
    """A path (or one of its components) does not exist."""


class Ext2NotADirectory(Ext2NotFound):
    """A path component other than the last is not a directory."""


class Ext2NotRegularFile(FormatError):
    """A path resolves to a directory, device, FIFO, socket or symlink, not a regular file."""


class Ext2SymlinkLoop(FormatError):
    """Resolving a path followed more than :data:`MAX_SYMLINK_FOLLOWS` symbolic links."""


class Ext2Unsupported(FormatError):
    """The image uses a feature this reader cannot read (named in the message)."""


class Ext2ChecksumError(FormatError):
    """A metadata checksum does not match: the named structure is corrupt."""


# --------------------------------------------------------------------------------------
# Limits and on-disk constants

MAX_SYMLINK_FOLLOWS = 40
"""Symbolic links followed while resolving one path before giving up (as Linux does)."""

MAX_PREAD_BYTES = 4 << 20
"""Largest single ``pread`` issued for bulk data (directory runs, extent levels, file data)."""

ITABLE_CHUNK_BYTES = 256 << 10
"""Inode tables are read and cached in aligned chunks of this many bytes."""

GDT_CHUNK_BYTES = 1 << 20
"""The group descriptor table is read and cached in aligned chunks of this many bytes."""

GDT_CACHE_CHUNKS = 64
"""Raw group descriptor table chunks kept in the LRU cache (64 x 1 MiB)."""

INODE_CACHE_ENTRIES = 131072
"""Parsed inodes kept in the LRU cache."""

ITABLE_CACHE_CHUNKS = 128
"""Raw inode-table chunks kept in the LRU cache (128 x 256 KiB)."""

READ_GAP_BYTES = 64 << 10
"""Directory runs separated on disk by at most this many bytes are read in one pread."""

BLOCK_CACHE_BLOCKS = 4096
"""Metadata blocks (htree nodes, directory leaves read by lookups, symlink blocks) cached."""

MAP_CACHE_ENTRIES = 4096
"""File maps kept in the LRU cache."""

DIR_CACHE_MAX_BYTES = 32 << 10
"""Linear directories up to this size keep a name -> inode cache after the first lookup."""

DIR_CACHE_ENTRIES = 256
"""Directories kept in that cache."""

MAX_EXTENT_DEPTH = 5
"""Deepest extent tree the kernel builds; deeper trees are corrupt."""

MAX_NAME_LEN = 255
"""Longest directory entry name."""

MAX_SYMLINK_LEN = 4096
"""Longest symbolic link target read (Linux's PATH_MAX)."""

MIN_LOG_BLOCK_SIZE, MAX_LOG_BLOCK_SIZE = 0, 6
"""Block sizes from 1 KiB (1024 << 0) to 64 KiB (1024 << 6)."""

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT2_MAGIC = 0xEF53
ROOT_INO = 2
GOOD_OLD_INODE_SIZE = 128
GOOD_OLD_FIRST_INO = 11
N_BLOCKS_BYTES = 60  # i_block: 15 x le32
NDIR_BLOCKS = 12
EXTENT_MAGIC = 0xF30A
EXT_INIT_MAX_LEN = 32768
XATTR_MAGIC = 0xEA020000
XATTR_INDEX_SYSTEM = 7
DIR_TAIL_SIZE = 12
DIR_TAIL_FT = 0xDE
DX_HASH_EOF = 0x7FFFFFFF

_M32 = 0xFFFFFFFF

# Superblock s_flags
_FLAG_UNSIGNED_HASH = 0x2
# Superblock s_state
_STATE_ERRORS = 0x2
# Group descriptor bg_flags
_BG_INODE_UNINIT = 0x1

# Inode i_flags
_FL_COMPR = 0x4
_FL_ENCRYPT = 0x800
_FL_INDEX = 0x1000
_FL_HUGE_FILE = 0x40000
_FL_EXTENTS = 0x80000
_FL_INLINE_DATA = 0x10000000
_FL_CASEFOLD = 0x40000000

# Directory entry file types (with the filetype feature)
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)

_KIND = {
    stat.S_IFREG: "regular file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symbolic link",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
}


class Compat(IntFlag):
    """COMPAT features: safe to ignore for reading and writing."""

    DIR_PREALLOC = 0x1
    IMAGIC_INODES = 0x2
    HAS_JOURNAL = 0x4
    EXT_ATTR = 0x8
    RESIZE_INODE = 0x10
    DIR_INDEX = 0x20
    LAZY_BG = 0x40
    EXCLUDE_BITMAP = 0x100
    SPARSE_SUPER2 = 0x200
    FAST_COMMIT = 0x400
    STABLE_INODES = 0x800
    ORPHAN_FILE = 0x1000


class Incompat(IntFlag):
    """INCOMPAT features: a reader that does not know one must refuse the filesystem."""

    COMPRESSION = 0x1
    FILETYPE = 0x2
    RECOVER = 0x4
    JOURNAL_DEV = 0x8
    META_BG = 0x10
    EXTENTS = 0x40
    BIT64 = 0x80
    MMP = 0x100
    FLEX_BG = 0x200
    EA_INODE = 0x400
    DIRDATA = 0x1000
    CSUM_SEED = 0x2000
    LARGEDIR = 0x4000
    INLINE_DATA = 0x8000
    ENCRYPT = 0x10000
    CASEFOLD = 0x20000


class RoCompat(IntFlag):
    """RO_COMPAT features: a reader may ignore one it does not know, a writer may not."""

    SPARSE_SUPER = 0x1
    LARGE_FILE = 0x2
    BTREE_DIR = 0x4
    HUGE_FILE = 0x8
    GDT_CSUM = 0x10
    DIR_NLINK = 0x20
    EXTRA_ISIZE = 0x40
    HAS_SNAPSHOT = 0x80
    QUOTA = 0x100
    BIGALLOC = 0x200
    METADATA_CSUM = 0x400
    REPLICA = 0x800
    READONLY = 0x1000
    PROJECT = 0x2000
    SHARED_BLOCKS = 0x4000
    VERITY = 0x8000
    ORPHAN_PRESENT = 0x10000


# Feature names as e2fsprogs prints them (mke2fs -O, dumpe2fs).
_COMPAT_NAMES: dict[int, str] = {
    Compat.DIR_PREALLOC: "dir_prealloc", Compat.IMAGIC_INODES: "imagic_inodes",
    Compat.HAS_JOURNAL: "has_journal", Compat.EXT_ATTR: "ext_attr",
    Compat.RESIZE_INODE: "resize_inode", Compat.DIR_INDEX: "dir_index",
    Compat.LAZY_BG: "lazy_bg", Compat.EXCLUDE_BITMAP: "snapshot_bitmap",
    Compat.SPARSE_SUPER2: "sparse_super2", Compat.FAST_COMMIT: "fast_commit",
    Compat.STABLE_INODES: "stable_inodes", Compat.ORPHAN_FILE: "orphan_file",
}  # fmt: skip
_INCOMPAT_NAMES: dict[int, str] = {
    Incompat.COMPRESSION: "compression", Incompat.FILETYPE: "filetype",
    Incompat.RECOVER: "needs_recovery", Incompat.JOURNAL_DEV: "journal_dev",
    Incompat.META_BG: "meta_bg", Incompat.EXTENTS: "extent", Incompat.BIT64: "64bit",
    Incompat.MMP: "mmp", Incompat.FLEX_BG: "flex_bg", Incompat.EA_INODE: "ea_inode",
    Incompat.DIRDATA: "dirdata", Incompat.CSUM_SEED: "metadata_csum_seed",
    Incompat.LARGEDIR: "large_dir", Incompat.INLINE_DATA: "inline_data",
    Incompat.ENCRYPT: "encrypt", Incompat.CASEFOLD: "casefold",
}  # fmt: skip
_RO_COMPAT_NAMES: dict[int, str] = {
    RoCompat.SPARSE_SUPER: "sparse_super", RoCompat.LARGE_FILE: "large_file",
    RoCompat.BTREE_DIR: "btree_dir", RoCompat.HUGE_FILE: "huge_file",
    RoCompat.GDT_CSUM: "uninit_bg", RoCompat.DIR_NLINK: "dir_nlink",
    RoCompat.EXTRA_ISIZE: "extra_isize", RoCompat.HAS_SNAPSHOT: "snapshot",
    RoCompat.QUOTA: "quota", RoCompat.BIGALLOC: "bigalloc",
    RoCompat.METADATA_CSUM: "metadata_csum", RoCompat.REPLICA: "replica",
    RoCompat.READONLY: "read-only", RoCompat.PROJECT: "project",
    RoCompat.SHARED_BLOCKS: "shared_blocks", RoCompat.VERITY: "verity",
    RoCompat.ORPHAN_PRESENT: "orphan_present",
}  # fmt: skip

_INCOMPAT_READABLE = (
    Incompat.FILETYPE | Incompat.RECOVER | Incompat.META_BG | Incompat.EXTENTS
    | Incompat.BIT64 | Incompat.MMP | Incompat.FLEX_BG | Incompat.EA_INODE
    | Incompat.CSUM_SEED | Incompat.LARGEDIR | Incompat.INLINE_DATA | Incompat.CASEFOLD
)  # fmt: skip
"""INCOMPAT features this reader implements (RECOVER only with allow_needs_recovery)."""

_INCOMPAT_REFUSED = {
    Incompat.COMPRESSION: "file data is compressed, which this reader does not decode",
    Incompat.JOURNAL_DEV: "this is an external journal device, not a filesystem",
    Incompat.DIRDATA: "directory entries carry extra data (Lustre), not supported",
    Incompat.ENCRYPT: "file contents and names may be encrypted, which cannot be read",
}

_RO_COMPAT_KNOWN = sum(bit.value for bit in RoCompat if bit is not RoCompat.BTREE_DIR)
"""RO_COMPAT bits this reader knows (an int: ``~`` of a flag would drop unknown bits);
btree_dir was never implemented anywhere."""


def _bit_names(value: int, names: dict[int, str], prefix: str) -> list[str]:
    out = []
    for bit in range(32):
        mask = 1 << bit
        if value & mask:
            out.append(names.get(mask, f"FEATURE_{prefix}{bit}"))
    return out


@dataclass(frozen=True, slots=True)
class Features:
    """The three feature words of the superblock; ``str()`` lists them as e2fsprogs does."""

    compat: int
    incompat: int
    ro_compat: int

    @property
    def names(self) -> tuple[str, ...]:
        """Every feature flag set, by its e2fsprogs name (unknown bits as FEATURE_I17...)."""
        return tuple(
            _bit_names(self.compat, _COMPAT_NAMES, "C")
            + _bit_names(self.incompat, _INCOMPAT_NAMES, "I")
            + _bit_names(self.ro_compat, _RO_COMPAT_NAMES, "R")
        )

    def __str__(self) -> str:
        return " ".join(self.names)


def _describe_bits(value: int, names: dict[int, str], prefix: str) -> str:
    return ", ".join(_bit_names(value, names, prefix))


# --------------------------------------------------------------------------------------
# Checksums


def _crc32c(seed: int, data: bytes | bytearray | memoryview) -> int:
    """ext4's crc32c: the raw CRC register, seeded with ``seed``, without final inversion."""
    return int(crc32c.crc32c(data, value=seed ^ _M32)) ^ _M32


def _make_crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC16_TABLE = _make_crc16_table()


def _crc16(crc: int, data: bytes) -> int:
    """CRC-16/ARC (reflected polynomial 0xA001) as used for ``uninit_bg`` descriptors."""
    for byte in data:
        crc = (crc >> 8) ^ _CRC16_TABLE[(crc ^ byte) & 0xFF]
    return crc


# --------------------------------------------------------------------------------------
# Directory index hashes


class HashVersion(IntEnum):
    """``dx_root.info.hash_version`` values (``*_UNSIGNED`` chosen by superblock s_flags)."""

    LEGACY = 0
    HALF_MD4 = 1
    TEA = 2
    LEGACY_UNSIGNED = 3
    HALF_MD4_UNSIGNED = 4
    TEA_UNSIGNED = 5
    SIPHASH = 6


_DEFAULT_HASH_SEED = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_TEA_DELTA = 0x9E3779B9
_MD4_K2 = 0x5A827999
_MD4_K3 = 0x6ED9EBA1
# (input word index, rotation) for the three rounds of the halved MD4 transform
_MD4_ROUNDS = (
    ((0, 3), (1, 7), (2, 11), (3, 19), (4, 3), (5, 7), (6, 11), (7, 19)),
    ((1, 3), (3, 5), (5, 9), (7, 13), (0, 3), (2, 5), (4, 9), (6, 13)),
    ((3, 3), (7, 9), (2, 11), (6, 15), (1, 3), (5, 9), (0, 11), (4, 15)),
)


def _char(c: int, signed: bool) -> int:
    return c - 256 if signed and c >= 128 else c


def _legacy_hash(name: bytes, signed: bool) -> int:
    h0, h1 = 0x12A3FE2D, 0x37ABE8F9
    for c in name:
        h = (h1 + (h0 ^ ((_char(c, signed) * 7152373) & _M32))) & _M32
        if h & 0x80000000:
            h = (h - 0x7FFFFFFF) & _M32
        h1, h0 = h0, h
    return (h0 << 1) & _M32


def _str2hashbuf(msg: bytes, num: int, signed: bool) -> list[int]:
    """Pack up to ``4 * num`` bytes of ``msg`` into ``num`` words, padded by its length."""
    pad = len(msg) | (len(msg) << 8)
    pad = (pad | (pad << 16)) & _M32
    val = pad
    words: list[int] = []
    for i in range(min(len(msg), num * 4)):
        val = (_char(msg[i], signed) + (val << 8)) & _M32
        if i % 4 == 3:
            words.append(val)
            val = pad
    if len(words) < num:
        words.append(val)
    while len(words) < num:
        words.append(pad)
    return words


def _rol32(x: int, s: int) -> int:
    return ((x << s) | (x >> (32 - s))) & _M32


def _half_md4_transform(buf: list[int], data: list[int]) -> None:
    v = list(buf)
    for rnd, schedule in enumerate(_MD4_ROUNDS):
        for step, (idx, shift) in enumerate(schedule):
            t = (0, 3, 2, 1)[step % 4]  # targets a, d, c, b in turn
            x, y, z = v[(t + 1) % 4], v[(t + 2) % 4], v[(t + 3) % 4]
            if rnd == 0:
                f, k = z ^ (x & (y ^ z)), 0
            elif rnd == 1:
                f, k = (x & y) + ((x ^ y) & z), _MD4_K2
            else:
                f, k = x ^ y ^ z, _MD4_K3
            v[t] = _rol32((v[t] + f + data[idx] + k) & _M32, shift)
    for i in range(4):
        buf[i] = (buf[i] + v[i]) & _M32


def _tea_transform(buf: list[int], data: list[int]) -> None:
    s = 0
    b0, b1 = buf[0], buf[1]
    a, b, c, d = data
    for _ in range(16):
        s = (s + _TEA_DELTA) & _M32
        b0 = (b0 + ((((b1 << 4) + a) & _M32) ^ ((b1 + s) & _M32) ^ ((b1 >> 5) + b))) & _M32
        b1 = (b1 + ((((b0 << 4) + c) & _M32) ^ ((b0 + s) & _M32) ^ ((b0 >> 5) + d))) & _M32
    buf[0] = (buf[0] + b0) & _M32
    buf[1] = (buf[1] + b1) & _M32


def dx_hash(
    name: bytes, version: int, seed: tuple[int, int, int, int] = (0, 0, 0, 0)
) -> tuple[int, int]:
    """Return ``(major, minor)`` directory-index hash of ``name`` as ext4 computes it.

    ``version`` is a :class:`HashVersion` (0-5; the unsigned variants treat name bytes as
    unsigned chars).  An all-zero ``seed`` means the default MD4 seed.  The major hash has
    its low bit clear (the collision bit).  Raises :class:`Ext2Unsupported` for SipHash
    (casefolded encrypted directories) and :class:`FormatError` for unknown versions.
    """
    if version in (HashVersion.LEGACY, HashVersion.LEGACY_UNSIGNED):
        major, minor = _legacy_hash(name, version == HashVersion.LEGACY), 0
    elif version in (HashVersion.HALF_MD4, HashVersion.HALF_MD4_UNSIGNED,
                     HashVersion.TEA, HashVersion.TEA_UNSIGNED):  # fmt: skip
        signed = version in (HashVersion.HALF_MD4, HashVersion.TEA)
        buf = list(seed) if any(seed) else list(_DEFAULT_HASH_SEED)
        md4 = version in (HashVersion.HALF_MD4, HashVersion.HALF_MD4_UNSIGNED)
        step = 32 if md4 else 16
        for pos in range(0, len(name), step):
            if md4:
                _half_md4_transform(buf, _str2hashbuf(name[pos:], 8, signed))
            else:
                _tea_transform(buf, _str2hashbuf(name[pos:], 4, signed))
        major, minor = (buf[1], buf[2]) if md4 else (buf[0], buf[1])
    elif version == HashVersion.SIPHASH:
        raise Ext2Unsupported("directory hash version 6 (siphash, casefolded encrypted "
                              "directories) is not supported")  # fmt: skip
    else:
        raise FormatError(f"unknown directory hash version {version}")
    major &= ~1 & _M32
    if major == (DX_HASH_EOF << 1) & _M32:
        major = ((DX_HASH_EOF - 1) << 1) & _M32
    return major, minor


# --------------------------------------------------------------------------------------
# Public value types


@dataclass(frozen=True, slots=True)
class Inode:
    """One parsed inode.  Times are seconds since the epoch (extended to 34 bits)."""

    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    links: int
    atime: int
    ctime: int
    mtime: int
    mtime_nsec: int
    flags: int
    generation: int
    blocks: int
    """``i_blocks``: 512-byte sectors (filesystem blocks if the inode has HUGE_FILE)."""
    file_acl: int
    i_block: bytes = field(repr=False, compare=False)
    """The raw 60-byte ``i_block`` area (block map, extent root, inline data or link)."""
    inline_xattr: bytes | None = field(default=None, repr=False, compare=False)
    """Value of the in-inode ``system.data`` attribute (inline data beyond 60 bytes)."""
    csum_seed: int = field(default=0, repr=False, compare=False)

    @property
    def file_type(self) -> int:
        """The ``S_IFMT`` bits of :attr:`mode`."""
        return stat.S_IFMT(self.mode)

    @property
    def kind(self) -> str:
        """Human-readable file type: "regular file", "directory", "FIFO", ..."""
        return _KIND.get(self.file_type, f"file of type {self.file_type:#o}")

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def inline_data(self) -> bool:
        """The file's data lives in the inode (``inline_data`` feature)."""
        return bool(self.flags & _FL_INLINE_DATA)

    @property
    def uses_extents(self) -> bool:
        return bool(self.flags & _FL_EXTENTS)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & _FL_ENCRYPT)


class Segment(NamedTuple):
    """``length`` bytes of a file at ``offset``: at byte ``physical`` of the image, or
    zeros when ``physical`` is None (a hole or an uninitialized extent).  A named tuple:
    made once or more per read, it costs half of what a frozen dataclass does."""

    offset: int
    length: int
    physical: int | None


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One directory entry.  ``name`` is decoded as UTF-8 with ``surrogateescape``."""

    name: str
    ino: int
    file_type: int
    """The entry's FT_* code (0 when the filesystem lacks the ``filetype`` feature)."""


class FileMap:
    """A file's logical-to-physical map: sorted, non-overlapping runs of whole blocks
    (the last one cut at the file's size).

    Runs of adjacent blocks that are also physically adjacent are merged.  Holes and
    uninitialized extents are absent from the runs and read as zeros.  For an inline-data
    file (or a fast symlink) :attr:`inline` holds the bytes and there are no runs.
    """

    __slots__ = ("_ends", "_phys", "_starts", "depth", "inline", "size")

    def __init__(
        self,
        size: int,
        block_size: int,
        runs: list[tuple[int, int, int]] | None = None,
        *,
        inline: bytes | None = None,
        depth: int = 0,
    ) -> None:
        """``runs`` are ``(logical block, blocks, physical block)``; they are kept in bytes,
        clipped to ``size``."""
        self.size = size
        """File size in bytes; :meth:`lookup` clips to it."""
        self.inline = inline
        """The file's bytes when they live in the inode, else None."""
        self.depth = depth
        """Extent tree depth (0 for block maps and inline files)."""
        self._starts = array("q")
        self._ends = array("q")
        self._phys = array("q")
        for lblk, length, pblk in runs or ():
            start = lblk * block_size
            end = min((lblk + length) * block_size, size)
            if end > start:
                self._starts.append(start)
                self._ends.append(end)
                self._phys.append(pblk * block_size)

    def __len__(self) -> int:
        """Number of mapped runs."""
        return len(self._starts)

    def __repr__(self) -> str:
        kind = "inline" if self.inline is not None else f"{len(self)} runs"
        return f"<FileMap size={self.size} {kind}>"

    def runs(self) -> Iterator[Segment]:
        """The mapped runs in order, as byte segments."""
        for start, end, phys in zip(self._starts, self._ends, self._phys, strict=True):
            yield Segment(start, end - start, phys)

    def data_ranges(self) -> list[tuple[int, int]]:
        """``(offset, end)`` byte ranges holding data, adjacent runs merged (SEEK_DATA)."""
        out: list[tuple[int, int]] = []
        if self.inline is not None:
            return [(0, self.size)] if self.size else []
        for seg in self.runs():
            if out and out[-1][1] == seg.offset:
                out[-1] = (out[-1][0], seg.offset + seg.length)
            else:
                out.append((seg.offset, seg.offset + seg.length))
        return out

    def lookup(self, offset: int, length: int) -> list[Segment]:
        """Segments covering ``[offset, offset + length)`` exactly, clipped to the size.

        Runs in O(log n + k) for n runs and k segments returned.  Raises ValueError for a
        negative range or for an inline file (use :attr:`inline` there).
        """
        if offset < 0 or length < 0:
            raise ValueError(f"negative range: offset {offset}, length {length}")
        if self.inline is not None:
            raise ValueError("inline-data file: its bytes are in FileMap.inline")
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        physical = self.physical(offset, end - offset)
        if physical is not None:
            return [Segment(offset, end - offset, physical)]
        return map_range(self._starts, self._ends, self._phys, offset, end, Segment)

    def physical(self, offset: int, length: int) -> int | None:
        """Where bytes ``[offset, offset + length)`` are stored when they lie inside one
        run (the common read or write of a few blocks), else None (:meth:`lookup` then
        says what they are). Makes no list: the filter asks it for every request."""
        end = offset + length
        if offset < 0 or length <= 0 or end > self.size:
            return None
        starts = self._starts
        i = bisect_right(starts, offset) - 1
        if i < 0 or end > self._ends[i]:
            return None
        return self._phys[i] + offset - starts[i]


# --------------------------------------------------------------------------------------
# Internals: LRU cache, superblock, group descriptors

_K = TypeVar("_K")
_V = TypeVar("_V")


class _LRU(Generic[_K, _V]):
    __slots__ = ("_data", "_max")

    def __init__(self, max_entries: int) -> None:
        self._data: OrderedDict[_K, _V] = OrderedDict()
        self._max = max_entries

    def get(self, key: _K) -> _V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)


@dataclass(frozen=True, slots=True)
class _Group:
    inode_table: int
    flags: int
    itable_unused: int


def _dx_index(entries: list[tuple[int, int]], target: int) -> int:
    """Index of the last htree entry whose hash is <= target (entry 0 counts as hash 0)."""
    lo, hi = 1, len(entries)
    while lo < hi:
        mid = (lo + hi) // 2
        if entries[mid][0] <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


def _u16(buf: bytes, off: int) -> int:
    return int.from_bytes(buf[off : off + 2], "little")


def _u32(buf: bytes, off: int) -> int:
    return int.from_bytes(buf[off : off + 4], "little")


_INODE_BASE = struct.Struct("<HHIIIIIHHIII60sIIIIHHHHHH")  # the 128-byte base inode
_INODE_EXTRA = struct.Struct("<HHIII")  # i_extra_isize, i_checksum_hi, c/m/atime_extra
_INO_GEN = struct.Struct("<II")
_DIRENT = struct.Struct("<IHBB")
_EXTENT_HDR = struct.Struct("<HHHHI")
_EXTENT = struct.Struct("<IHHI")
_EXTENT_IDX = struct.Struct("<IIHH")
_XATTR_ENTRY = struct.Struct("<BBHIII")


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
    features: Features
    uuid: bytes
    volume_name: str
    blocks_count: int
    inodes_count: int
    inode_size: int
    groups_count: int

    def __init__(self, pread: Pread, size: int, sb: bytes, allow_needs_recovery: bool) -> None:
        """Use :meth:`open`; this parses and validates the superblock bytes ``sb``."""
        self._pread = pread
        self._size = size
        self._parse_superblock(sb, allow_needs_recovery)
        self._groups: dict[int, _Group] = {}
        self._gdt_chunks: _LRU[int, bytes] = _LRU(GDT_CACHE_CHUNKS)
        self._itable: _LRU[tuple[int, int], bytes] = _LRU(ITABLE_CACHE_CHUNKS)
        self._inodes: _LRU[int, Inode] = _LRU(INODE_CACHE_ENTRIES)
        self._blocks: _LRU[int, bytes] = _LRU(BLOCK_CACHE_BLOCKS)
        self._maps: _LRU[int, FileMap] = _LRU(MAP_CACHE_ENTRIES)
        self._dir_names: _LRU[int, dict[bytes, int]] = _LRU(DIR_CACHE_ENTRIES)

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

    # ---------------------------------------------------------------- superblock

    def _parse_superblock(self, sb: bytes, allow_needs_recovery: bool) -> None:
        where = f"superblock at byte offset {SUPERBLOCK_OFFSET}"
        magic = _u16(sb, 0x38)
        if magic != EXT2_MAGIC:
            raise FormatError(
                f"bad superblock magic {magic:#06x} at byte offset {SUPERBLOCK_OFFSET + 0x38} "
                f"(expected {EXT2_MAGIC:#06x}): not an ext2/ext3/ext4 filesystem"
            )
        compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
        self.features = Features(compat, incompat, ro_compat)
        unknown = incompat & ~(_INCOMPAT_READABLE | sum(_INCOMPAT_REFUSED))
        if unknown:
            raise Ext2Unsupported(
                f"unknown incompatible feature(s) "
                f"{_describe_bits(unknown, _INCOMPAT_NAMES, 'I')} (bits {unknown:#x}): "
                f"this filesystem cannot be read safely"
            )
        for bit, why in _INCOMPAT_REFUSED.items():
            if incompat & bit:
                name = _INCOMPAT_NAMES[bit]
                raise Ext2Unsupported(f"unsupported feature {name}: {why}")
        self.needs_recovery = bool(incompat & Incompat.RECOVER)
        if self.needs_recovery and not allow_needs_recovery:
            raise Ext2Unsupported(
                "feature needs_recovery: the journal holds transactions that were never "
                "replayed, so the filesystem may be inconsistent; run e2fsck, or open it "
                "read-only with allow_needs_recovery=True"
            )
        self._incompat = incompat
        self._ro_compat = ro_compat
        self._compat = compat
        self.metadata_csum = bool(ro_compat & RoCompat.METADATA_CSUM)
        self._gdt_csum = bool(ro_compat & RoCompat.GDT_CSUM) and not self.metadata_csum
        self._group_csum = self.metadata_csum or self._gdt_csum
        if self.metadata_csum:
            if sb[0x175] != 1:
                raise Ext2Unsupported(
                    f"{where}: metadata_csum with checksum type {sb[0x175]} (only 1, crc32c, "
                    "exists)"
                )
            stored = _u32(sb, 0x3FC)
            computed = _crc32c(_M32, sb[:0x3FC])
            if stored != computed:
                raise Ext2ChecksumError(
                    f"{where}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
        self.uuid = sb[0x68:0x78]
        self.volume_name = sb[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", "replace")
        if incompat & Incompat.CSUM_SEED:
            self._csum_seed = _u32(sb, 0x270)
        else:
            self._csum_seed = _crc32c(_M32, self.uuid)

        log_bs = _u32(sb, 0x18)
        if not MIN_LOG_BLOCK_SIZE <= log_bs <= MAX_LOG_BLOCK_SIZE:
            raise FormatError(
                f"{where}: s_log_block_size {log_bs} is out of range "
                f"({MIN_LOG_BLOCK_SIZE}..{MAX_LOG_BLOCK_SIZE}, i.e. 1 KiB..64 KiB blocks)"
            )
        bs = self.block_size = 1024 << log_bs
        self._is64 = bool(incompat & Incompat.BIT64)
        blocks = _u32(sb, 0x4)
        if self._is64:
            blocks |= _u32(sb, 0x150) << 32
        self.blocks_count = blocks
        self.inodes_count = _u32(sb, 0x0)
        self._first_data_block = _u32(sb, 0x14)
        self._blocks_per_group = _u32(sb, 0x20)
        self._inodes_per_group = _u32(sb, 0x28)
        rev = _u32(sb, 0x4C)
        if rev > 1:
            raise Ext2Unsupported(f"{where}: unknown revision level {rev} (known: 0, 1)")
        if rev == 0:
            self.inode_size, self._first_ino = GOOD_OLD_INODE_SIZE, GOOD_OLD_FIRST_INO
        else:
            self.inode_size, self._first_ino = _u16(sb, 0x58), _u32(sb, 0x54)
        isz = self.inode_size
        if isz < GOOD_OLD_INODE_SIZE or isz > bs or isz & (isz - 1):
            raise FormatError(
                f"{where}: inode size {isz} is not a power of two between "
                f"{GOOD_OLD_INODE_SIZE} and the block size {bs}"
            )
        if self._is64:
            self._desc_size = _u16(sb, 0xFE)
            ds = self._desc_size
            if ds < 64 or ds > 1024 or ds & (ds - 1):
                raise FormatError(
                    f"{where}: group descriptor size {ds} is not a power of two between "
                    f"64 and 1024 (64bit feature)"
                )
        else:
            self._desc_size = 32
        ipg, bpg, fdb = self._inodes_per_group, self._blocks_per_group, self._first_data_block
        if not 1 <= ipg <= 8 * bs:
            raise FormatError(f"{where}: {ipg} inodes per group (must be 1..{8 * bs})")
        if bpg < 1:
            raise FormatError(f"{where}: {bpg} blocks per group (must be at least 1)")
        if not ro_compat & RoCompat.BIGALLOC and bpg > 8 * bs:
            raise FormatError(f"{where}: {bpg} blocks per group (must be at most {8 * bs})")
        if fdb > 1 or fdb >= blocks:
            raise FormatError(
                f"{where}: first data block {fdb} is invalid for {blocks} blocks of {bs} bytes"
            )
        if blocks * bs > self._size:
            raise FormatError(
                f"{where}: the filesystem has {blocks} blocks of {bs} bytes "
                f"({blocks * bs} bytes) but the image has only {self._size} bytes (truncated?)"
            )
        self.groups_count = -(-(blocks - fdb) // bpg)
        if not ROOT_INO <= self.inodes_count <= self.groups_count * ipg:
            raise FormatError(
                f"{where}: inode count {self.inodes_count} does not fit "
                f"{self.groups_count} groups of {ipg} inodes"
            )
        self._itable_blocks = -(-(ipg * isz) // bs)
        self._first_meta_bg = _u32(sb, 0x104)
        self._backup_bgs = struct.unpack_from("<II", sb, 0x24C)
        seed = struct.unpack_from("<IIII", sb, 0xEC)
        self._hash_seed: tuple[int, int, int, int] = (seed[0], seed[1], seed[2], seed[3])
        self._s_flags = _u32(sb, 0x160)
        self._filetype = bool(incompat & Incompat.FILETYPE)

        reasons = []
        unknown_ro = ro_compat & ~_RO_COMPAT_KNOWN
        if unknown_ro:
            names = _describe_bits(unknown_ro, _RO_COMPAT_NAMES, "R")
            reasons.append(f"unknown read-only-compatible feature(s) {names}")
        for ro_bit in (RoCompat.READONLY, RoCompat.SHARED_BLOCKS, RoCompat.HAS_SNAPSHOT):
            if ro_compat & ro_bit:
                reasons.append(f"feature {_RO_COMPAT_NAMES[ro_bit]} forbids writes")
        if self.needs_recovery:
            reasons.append("the journal needs recovery (feature needs_recovery)")
        if _u16(sb, 0x3A) & _STATE_ERRORS:  # s_state
            reasons.append("the filesystem is marked as having errors (run e2fsck)")
        self.read_only_reason = "; ".join(reasons) or None

    # ---------------------------------------------------------------- raw I/O

    async def _read(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at ``offset``, refusing anything outside the image."""
        if offset < 0 or length < 0 or offset + length > self._size:
            raise FormatError(
                f"{what}: bytes {offset}..{offset + length} lie outside the image "
                f"({self._size} bytes)"
            )
        return await read_exactly(self._pread, offset, length, what)

    def _check_block(self, blk: int, count: int, what: str) -> None:
        if blk < self._first_data_block or blk + count > self.blocks_count or count < 0:
            raise FormatError(
                f"{what}: block {blk} (+{count}) lies outside the filesystem "
                f"(blocks {self._first_data_block}..{self.blocks_count - 1})"
            )

    def _check_used(self, used: int, what: str) -> None:
        """A file cannot use more blocks than the file system has: a map that does (its
        blocks pointing back at each other) would otherwise grow without bound."""
        if used > self.blocks_count:
            raise FormatError(
                f"{what}: the file uses more blocks than the file system has "
                f"({self.blocks_count}): a corrupt map, or blocks mapped more than once"
            )

    async def _block(self, blk: int, what: str) -> bytes:
        """One metadata block, cached."""
        data = self._blocks.get(blk)
        if data is None:
            self._check_block(blk, 1, what)
            data = await self._read(blk * self.block_size, self.block_size, what)
            self._blocks.put(blk, data)
        return data

    async def _read_block_set(self, blocks: list[int], what: str) -> dict[int, bytes]:
        """Read many (uncached) blocks, one pread per physically contiguous run."""
        bs = self.block_size
        out: dict[int, bytes] = {}
        wanted = sorted(set(blocks))
        max_run = max(MAX_PREAD_BYTES // bs, 1)
        i = 0
        while i < len(wanted):
            j = i + 1
            while j < len(wanted) and wanted[j] == wanted[j - 1] + 1 and j - i < max_run:
                j += 1
            start, count = wanted[i], j - i
            self._check_block(start, count, what)
            data = await self._read(start * bs, count * bs, what)
            for k in range(count):
                out[start + k] = data[k * bs : (k + 1) * bs]
            i = j
        return out

    # ---------------------------------------------------------------- groups

    def _has_super(self, group: int) -> bool:
        if group == 0:
            return True
        if self._compat & Compat.SPARSE_SUPER2:
            return group in self._backup_bgs
        if group <= 1 or not self._ro_compat & RoCompat.SPARSE_SUPER:
            return True
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def _group_first_block(self, group: int) -> int:
        return self._first_data_block + group * self._blocks_per_group

    async def _group(self, g: int) -> _Group:
        cached = self._groups.get(g)
        if cached is not None:
            return cached
        if not 0 <= g < self.groups_count:
            raise FormatError(f"block group {g} does not exist ({self.groups_count} groups)")
        bs, ds = self.block_size, self._desc_size
        per_block = bs // ds
        dblock = g // per_block
        meta_bg = bool(self._incompat & Incompat.META_BG)
        gdt_start = SUPERBLOCK_OFFSET // bs + 1  # the block after the superblock's
        if not meta_bg or dblock < self._first_meta_bg:
            # The classic contiguous table right after the superblock: read it in chunks.
            total = -(-self.groups_count // per_block)
            if meta_bg:
                total = min(total, self._first_meta_bg)
            chunk_blocks = max(GDT_CHUNK_BYTES // bs, 1)
            chunk = dblock // chunk_blocks
            raw = self._gdt_chunks.get(chunk)
            first = chunk * chunk_blocks
            if raw is None:
                count = min(chunk_blocks, total - first)
                what = f"group descriptor table blocks {gdt_start + first}..+{count}"
                self._check_block(gdt_start + first, count, what)
                raw = await self._read((gdt_start + first) * bs, count * bs, what)
                self._gdt_chunks.put(chunk, raw)
            desc_block = gdt_start + dblock
            off_in = (dblock - first) * bs + (g % per_block) * ds
        else:
            g0 = dblock * per_block
            desc_block = self._group_first_block(g0) + (1 if self._has_super(g0) else 0)
            if g0 == 0 and bs == 1024 and self._first_data_block == 0:
                desc_block += 1  # 1 KiB bigalloc: block 0 is the boot block, 1 the superblock
            raw = await self._block(desc_block, f"meta_bg group descriptor block {desc_block}")
            off_in = (g % per_block) * ds
        desc = raw[off_in : off_in + ds]
        offset = desc_block * bs + (g % per_block) * ds
        group = self._parse_group(g, desc, offset)
        self._groups[g] = group
        return group

    def _parse_group(self, g: int, desc: bytes, offset: int) -> _Group:
        where = f"group descriptor {g} at byte offset {offset}"
        stored = _u16(desc, 0x1E)
        if self.metadata_csum:
            c = _crc32c(self._csum_seed, g.to_bytes(4, "little"))
            c = _crc32c(c, desc[:0x1E] + b"\0\0" + desc[0x20:])
            if stored != c & 0xFFFF:
                raise Ext2ChecksumError(f"{where}: checksum mismatch (stored {stored:#06x}, "
                                        f"computed {c & 0xFFFF:#06x})")  # fmt: skip
        elif self._gdt_csum:
            c = _crc16(0xFFFF, self.uuid + g.to_bytes(4, "little") + desc[:0x1E])
            c = _crc16(c, desc[0x20:])
            if stored != c:
                raise Ext2ChecksumError(f"{where}: checksum mismatch (stored {stored:#06x}, "
                                        f"computed {c:#06x})")  # fmt: skip
        table = _u32(desc, 0x8)
        flags = _u16(desc, 0x12)
        unused = _u16(desc, 0x1C)
        if self._is64:
            table |= _u32(desc, 0x28) << 32
            unused |= _u16(desc, 0x32) << 16
        if not self._group_csum:
            flags, unused = 0, 0
        if unused > self._inodes_per_group:
            raise FormatError(f"{where}: {unused} unused inodes but only "
                              f"{self._inodes_per_group} per group")  # fmt: skip
        self._check_block(table, self._itable_blocks, f"{where}: inode table")
        return _Group(table, flags, unused)

    async def check_group_descriptors(self) -> None:
        """Read and validate every group descriptor (checksum, inode table location);
        raise FormatError for the first damaged one.  Lookups read only the descriptors
        they need: this finds damage anywhere in the table at once."""
        for g in range(self.groups_count):
            await self._group(g)

    # ---------------------------------------------------------------- inodes

    async def inode(self, ino: int) -> Inode:
        """The parsed inode ``ino`` (cached).  Raises FormatError if it is out of range,
        not in use, or corrupt."""
        cached = self._inodes.get(ino)
        if cached is not None:
            return cached
        if not 1 <= ino <= self.inodes_count:
            raise FormatError(f"inode number {ino} is out of range (1..{self.inodes_count})")
        g, idx = divmod(ino - 1, self._inodes_per_group)
        group = await self._group(g)
        used = self._inodes_per_group - group.itable_unused
        if group.flags & _BG_INODE_UNINIT or idx >= used:
            raise FormatError(
                f"inode {ino} is referenced but lies in the never-used part of group {g}'s "
                f"inode table (INODE_UNINIT or beyond the {used} initialized inodes)"
            )
        isz = self.inode_size
        byte = idx * isz
        chunk = byte // ITABLE_CHUNK_BYTES
        raw = self._itable.get((g, chunk))
        if raw is None:
            start = chunk * ITABLE_CHUNK_BYTES
            length = min(ITABLE_CHUNK_BYTES, used * isz - start)
            raw = await self._read(
                group.inode_table * self.block_size + start, length,
                f"inode table of group {g}",
            )  # fmt: skip
            self._itable.put((g, chunk), raw)
        off = byte - chunk * ITABLE_CHUNK_BYTES
        offset = group.inode_table * self.block_size + byte
        inode = self._parse_inode(ino, raw, off, offset)
        self._inodes.put(ino, inode)
        return inode

    def _parse_inode(self, ino: int, buf: bytes, off: int, offset: int) -> Inode:
        isz = self.inode_size
        (mode, uid, size, atime, ctime, mtime, dtime, gid, links, blocks, flags, _osd1,
         i_block, gen, acl, size_hi, _faddr, blocks_hi, acl_hi, uid_hi, gid_hi, csum_lo,
         _res) = _INODE_BASE.unpack_from(buf, off)  # fmt: skip
        extra = csum_hi = ctime_x = mtime_x = atime_x = 0
        if isz > GOOD_OLD_INODE_SIZE:
            extra = buf[off + 0x80] | (buf[off + 0x81] << 8)
            if extra % 4 or GOOD_OLD_INODE_SIZE + extra > isz:
                raise FormatError(f"inode {ino} at byte offset {offset}: i_extra_isize "
                                  f"{extra} is invalid for {isz}-byte inodes")  # fmt: skip
            if extra >= 16:
                _e, csum_hi, ctime_x, mtime_x, atime_x = _INODE_EXTRA.unpack_from(buf, off + 0x80)
            elif extra:
                words = _INODE_EXTRA.unpack_from(buf[off : off + 0x80 + extra] + bytes(16), 0x80)
                csum_hi, ctime_x, mtime_x = words[1], words[2], words[3]
        seed = 0
        if self.metadata_csum:
            seed = _crc32c(self._csum_seed, _INO_GEN.pack(ino, gen))
            raw = bytearray(buf[off : off + isz])
            raw[0x7C:0x7E] = b"\0\0"
            if extra >= 4:
                raw[0x82:0x84] = b"\0\0"
                stored, computed = csum_lo | (csum_hi << 16), _crc32c(seed, raw)
            else:
                stored, computed = csum_lo, _crc32c(seed, raw) & 0xFFFF
            if stored != computed:
                if not any(buf[off : off + isz]):
                    raise FormatError(f"inode {ino} is referenced but not in use "
                                      f"(all zero at byte offset {offset})")  # fmt: skip
                raise Ext2ChecksumError(f"inode {ino} at byte offset {offset}: checksum "
                                        f"mismatch (stored {stored:#x}, computed "
                                        f"{computed:#x})")  # fmt: skip
        if mode == 0 or (links == 0 and dtime and ino >= self._first_ino):
            raise FormatError(f"inode {ino} is referenced but not in use (mode {mode:#o}, "
                              f"{links} links) at byte offset {offset}")  # fmt: skip
        if mode & 0o170000 not in _KIND:
            raise FormatError(f"inode {ino} at byte offset {offset}: invalid file type "
                              f"{mode & 0o170000:#o} in mode {mode:#o}")  # fmt: skip
        inline_xattr = None
        if flags & _FL_INLINE_DATA:
            where = f"inode {ino} at byte offset {offset}"
            if not self._incompat & Incompat.INLINE_DATA:
                raise FormatError(f"{where}: has the inline-data flag but the filesystem "
                                  f"lacks the inline_data feature")  # fmt: skip
            inline_xattr = self._system_data(ino, buf[off : off + isz], extra, where)
        # 32-bit signed seconds, extended by two epoch bits from the *_extra fields
        return Inode(
            ino, mode, uid | (uid_hi << 16), gid | (gid_hi << 16), size | (size_hi << 32),
            links,
            atime - ((atime & 0x80000000) << 1) + ((atime_x & 3) << 32),
            ctime - ((ctime & 0x80000000) << 1) + ((ctime_x & 3) << 32),
            mtime - ((mtime & 0x80000000) << 1) + ((mtime_x & 3) << 32),
            mtime_x >> 2, flags, gen, blocks | (blocks_hi << 32), acl | (acl_hi << 32),
            i_block, inline_xattr, seed,
        )  # fmt: skip

    def _system_data(self, ino: int, raw: bytes, extra: int, where: str) -> bytes:
        """The value of the in-inode ``system.data`` extended attribute."""
        start = GOOD_OLD_INODE_SIZE + extra
        end = len(raw)
        if start + 4 <= end and _u32(raw, start) == XATTR_MAGIC:
            base = start + 4
            pos = base
            while pos + 4 <= end and _u32(raw, pos) != 0:
                if pos + _XATTR_ENTRY.size > end:
                    break
                name_len, index, value_offs, value_inum, value_size, _h = _XATTR_ENTRY.unpack_from(
                    raw, pos
                )
                name = raw[pos + 16 : pos + 16 + name_len]
                if pos + 16 + name_len > end:
                    raise FormatError(f"{where}: in-inode extended attribute at +{pos} "
                                      f"runs past the inode")  # fmt: skip
                if index == XATTR_INDEX_SYSTEM and name == b"data":
                    if value_inum:
                        raise FormatError(
                            f"{where}: system.data stored in inode {value_inum} "
                            f"(inline data must be in-inode)"
                        )
                    vstart = base + value_offs
                    if vstart + value_size > end:
                        raise FormatError(
                            f"{where}: system.data value ({value_size} bytes at +{vstart}) "
                            f"runs past the {end}-byte inode"
                        )
                    return raw[vstart : vstart + value_size]
                pos += (16 + name_len + 3) & ~3
        raise FormatError(f"{where}: has the inline-data flag but no system.data attribute")

    # ---------------------------------------------------------------- file maps

    async def extents(self, ino: int) -> FileMap:
        """The file's logical-to-physical map (cached).

        For an inline-data file or a fast symlink, :attr:`FileMap.inline` holds the bytes.
        Devices, FIFOs and sockets have an empty map.  Raises :class:`Ext2Unsupported`
        for an encrypted inode and FormatError for a corrupt map.
        """
        fmap = self._maps.get(ino)
        if fmap is None:
            fmap = await self._build_map(await self.inode(ino))
            self._maps.put(ino, fmap)
        return fmap

    def _is_fast_symlink(self, inode: Inode) -> bool:
        if not inode.is_symlink or inode.flags & (_FL_EXTENTS | _FL_INLINE_DATA):
            return False
        ea_blocks = self.block_size // 512 if inode.file_acl else 0
        sectors = inode.blocks * (self.block_size // 512 if inode.flags & _FL_HUGE_FILE else 1)
        return inode.size < N_BLOCKS_BYTES and sectors - ea_blocks <= 0

    async def _build_map(self, inode: Inode) -> FileMap:
        ino, bs, size = inode.ino, self.block_size, inode.size
        if inode.encrypted:
            raise Ext2Unsupported(f"inode {ino} is encrypted (flag encrypt): its data "
                                  f"cannot be read")  # fmt: skip
        if inode.file_type in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            return FileMap(0, bs)
        if inode.inline_data:
            data = inode.i_block + (inode.inline_xattr or b"")
            if size > len(data):
                raise FormatError(f"inode {ino}: inline data holds {len(data)} bytes but "
                                  f"the size is {size}")  # fmt: skip
            return FileMap(size, bs, inline=data[:size])
        if self._is_fast_symlink(inode):
            return FileMap(size, bs, inline=inode.i_block[:size])
        nblocks = -(-size // bs)
        if inode.flags & _FL_EXTENTS:
            limit = 1 << 32
            if nblocks > limit:
                raise FormatError(f"inode {ino}: size {size} exceeds the extent-mapped "
                                  f"maximum of {limit * bs} bytes")  # fmt: skip
            runs, depth = await self._extent_runs(inode, nblocks)
        else:
            a = bs // 4
            limit = NDIR_BLOCKS + a + a * a + a * a * a
            if nblocks > limit:
                raise FormatError(f"inode {ino}: size {size} exceeds the block-mapped "
                                  f"maximum of {limit * bs} bytes")  # fmt: skip
            runs, depth = await self._blockmap_runs(inode, nblocks), 0
        return FileMap(size, bs, self._merge_runs(ino, runs, nblocks), depth=depth)

    @staticmethod
    def _merge_runs(
        ino: int, runs: list[tuple[int, int, int]], nblocks: int
    ) -> list[tuple[int, int, int]]:
        runs.sort()
        out: list[tuple[int, int, int]] = []
        for lblk, length, pblk in runs:
            if out:
                plblk, plen, _ = out[-1]
                if lblk < plblk + plen:
                    raise FormatError(f"inode {ino}: logical block {lblk} is mapped twice "
                                      f"(overlapping extents or block map entries)")  # fmt: skip
            if lblk >= nblocks:
                continue  # preallocated beyond the end of file
            length = min(length, nblocks - lblk)
            if out and out[-1][0] + out[-1][1] == lblk and out[-1][2] + out[-1][1] == pblk:
                out[-1] = (out[-1][0], out[-1][1] + length, out[-1][2])
            else:
                out.append((lblk, length, pblk))
        return out

    async def _extent_runs(
        self, inode: Inode, nblocks: int
    ) -> tuple[list[tuple[int, int, int]], int]:
        ino, bs = inode.ino, self.block_size
        runs: list[tuple[int, int, int]] = []
        used = 0  # blocks mapped by initialized extents
        root_where = f"inode {ino}: extent tree root in i_block"
        magic, _entries, _max, root_depth, _gen = _EXTENT_HDR.unpack_from(inode.i_block, 0)
        if root_depth > MAX_EXTENT_DEPTH:
            raise FormatError(f"{root_where}: depth {root_depth} exceeds the maximum "
                              f"{MAX_EXTENT_DEPTH}")  # fmt: skip
        # One level at a time: (node bytes, where, expected depth, logical lo, hi)
        level: list[tuple[bytes, str, int, int, int]] = [
            (inode.i_block, root_where, root_depth, 0, 1 << 32)
        ]
        while level:
            children: list[tuple[int, int, int, int]] = []  # (pblk, depth, lo, hi)
            for node, where, depth, lo, hi in level:
                is_root = node is inode.i_block
                capacity = (len(node) - 12) // 12
                magic, entries, emax, ndepth, _gen = _EXTENT_HDR.unpack_from(node, 0)
                if magic != EXTENT_MAGIC:
                    raise FormatError(f"{where}: bad extent header magic {magic:#06x} "
                                      f"(expected {EXTENT_MAGIC:#06x})")  # fmt: skip
                if ndepth != depth:
                    raise FormatError(f"{where}: extent node depth {ndepth}, expected {depth}")
                if emax > capacity or entries > emax:
                    raise FormatError(f"{where}: extent header has {entries} entries, max "
                                      f"{emax} (room for {capacity})")  # fmt: skip
                if self.metadata_csum and not is_root:
                    tail = 12 + 12 * emax
                    if tail + 4 > bs:
                        raise FormatError(f"{where}: no room for the extent block checksum")
                    stored = _u32(node, tail)
                    computed = _crc32c(inode.csum_seed, node[:tail])
                    if stored != computed:
                        raise Ext2ChecksumError(
                            f"{where}: extent block checksum mismatch (stored "
                            f"{stored:#010x}, computed {computed:#010x})"
                        )
                prev_end = lo
                for e in range(entries):
                    pos = 12 + 12 * e
                    if depth == 0:
                        lblk, elen, start_hi, start_lo = _EXTENT.unpack_from(node, pos)
                        uninit = elen > EXT_INIT_MAX_LEN
                        length = elen - EXT_INIT_MAX_LEN if uninit else elen
                        pblk = start_lo | (start_hi << 32)
                        if length == 0 or lblk < prev_end or lblk + length > hi:
                            raise FormatError(
                                f"{where}: extent {e} (logical block {lblk}, length {length}) "
                                f"is empty, unsorted or outside its index range {lo}..{hi}"
                            )
                        self._check_block(pblk, length, f"{where}: extent {e}")
                        prev_end = lblk + length
                        if not uninit and lblk < nblocks:
                            runs.append((lblk, length, pblk))
                            used += length
                            self._check_used(used, f"{where}: extent {e}")
                    else:
                        lblk, leaf_lo, leaf_hi, _unused = _EXTENT_IDX.unpack_from(node, pos)
                        if lblk < prev_end or lblk >= hi:
                            raise FormatError(
                                f"{where}: extent index {e} (logical block {lblk}) is "
                                f"unsorted or outside {lo}..{hi}"
                            )
                        lblk_lo = lo if e == 0 else lblk  # the first child covers from lo
                        next_lblk = _u32(node, pos + 12) if e + 1 < entries else hi
                        children.append((leaf_lo | (leaf_hi << 32), depth - 1, lblk_lo, next_lblk))
                        prev_end = lblk + 1
                if depth and entries == 0 and not is_root:
                    raise FormatError(f"{where}: empty extent index node")
            wanted = [c for c in children if c[2] < nblocks]
            if not wanted:  # a leaf root: the common case, no read
                break
            blocks = await self._read_block_set(
                [c[0] for c in wanted], f"inode {ino}: extent tree blocks"
            )
            level = [
                (blocks[pblk], f"inode {ino}: extent block {pblk} (depth {d})", d, clo, chi)
                for pblk, d, clo, chi in wanted
            ]
        return runs, root_depth

    async def _blockmap_runs(self, inode: Inode, nblocks: int) -> list[tuple[int, int, int]]:
        ino, bs = inode.ino, self.block_size
        a = bs // 4
        ptrs = struct.unpack("<15I", inode.i_block)
        runs: list[tuple[int, int, int]] = []
        for i in range(min(NDIR_BLOCKS, nblocks)):
            if ptrs[i]:
                self._check_block(ptrs[i], 1, f"inode {ino}: direct block {i}")
                runs.append((i, 1, ptrs[i]))
        # (pointer block, level, first logical block it covers)
        pending: list[tuple[int, int, int]] = []
        base = NDIR_BLOCKS
        for level, ptr in ((1, ptrs[12]), (2, ptrs[13]), (3, ptrs[14])):
            if ptr and base < nblocks:
                pending.append((ptr, level, base))
            base += a**level
        used = len(runs) + len(pending)  # data and indirect blocks of the file
        fmt = struct.Struct(f"<{a}I")
        while pending:
            what = f"inode {ino}: indirect blocks"
            for ptr, level, base in pending:
                self._check_block(ptr, 1, f"inode {ino}: level-{level} indirect block "
                                          f"for logical block {base}")  # fmt: skip
            blocks = await self._read_block_set([p[0] for p in pending], what)
            nxt: list[tuple[int, int, int]] = []
            for ptr, level, base in pending:
                vals = fmt.unpack(blocks[ptr])
                if level == 1:
                    used += self._add_leaf_pointers(ino, ptr, vals, base, nblocks, runs)
                else:
                    queued = len(nxt)
                    span = a ** (level - 1)
                    for i, v in enumerate(vals):
                        lb = base + i * span
                        if lb >= nblocks:
                            break
                        if v:
                            nxt.append((v, level - 1, lb))
                    used += len(nxt) - queued
                self._check_used(used, f"inode {ino}: indirect block {ptr}")
            pending = nxt
        return runs

    def _add_leaf_pointers(
        self, ino: int, ptr: int, vals: tuple[int, ...], base: int, nblocks: int,
        runs: list[tuple[int, int, int]],
    ) -> int:  # fmt: skip
        """Add the data blocks of a level-1 indirect block to ``runs``; return their number."""
        n = min(len(vals), nblocks - base)
        v0 = vals[0]
        if (
            v0
            and vals[n - 1] == v0 + n - 1
            and array("I", vals[:n]) == array("I", range(v0, v0 + n))
        ):
            self._check_block(v0, n, f"inode {ino}: indirect block {ptr} entries")
            runs.append((base, n, v0))
            return n
        for i in range(n):
            v = vals[i]
            if v:
                if not self._first_data_block <= v < self.blocks_count:
                    self._check_block(v, 1, f"inode {ino}: indirect block {ptr} entry {i}")
                if (
                    runs
                    and runs[-1][0] + runs[-1][1] == base + i
                    and (runs[-1][2] + runs[-1][1] == v)
                ):
                    last = runs[-1]
                    runs[-1] = (last[0], last[1] + 1, last[2])
                else:
                    runs.append((base + i, 1, v))
        return n - vals[:n].count(0)

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
                parts.append(await self._read(seg.physical + done, n,
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
                target += await self._read(seg.physical, seg.length,
                                           f"symbolic link inode {inode.ino}")  # fmt: skip
        if b"\0" in target:
            raise FormatError(f"symbolic link inode {inode.ino}: target contains a NUL byte")
        return target

    # ---------------------------------------------------------------- directories

    def _is_dx(self, inode: Inode) -> bool:
        return (
            bool(inode.flags & _FL_INDEX)
            and bool(self._compat & Compat.DIR_INDEX)
            and (not inode.inline_data)
        )

    def _rec_len(self, raw: int) -> int:
        if self.block_size < 65536:
            return raw
        if raw in (0, 65535):
            return self.block_size
        return (raw & 65532) | ((raw & 3) << 16)

    def _parse_dirents(
        self, buf: bytes, start: int, end: int, where: str,
        out: list[tuple[bytes, int, int]],
    ) -> None:  # fmt: skip
        """Append (name, inode, file type) of the live entries in ``buf[start:end]``."""
        pos = start
        unpack = _DIRENT.unpack_from
        ft_ok = self._filetype
        max_ino = self.inodes_count
        while pos < end:
            if pos + 8 > end:
                raise FormatError(f"{where}: truncated directory entry at +{pos}")
            d_ino, rec_len, name_len, ftype = unpack(buf, pos)
            if not ft_ok:
                name_len |= ftype << 8
                ftype = 0
            rec_len = self._rec_len(rec_len)
            if rec_len < 8 or rec_len % 4 or pos + rec_len > end:
                raise FormatError(f"{where}: directory entry at +{pos} has invalid "
                                  f"record length {rec_len}")  # fmt: skip
            if d_ino:
                if 8 + name_len > rec_len or name_len == 0:
                    raise FormatError(f"{where}: directory entry at +{pos} has name length "
                                      f"{name_len} but record length {rec_len}")  # fmt: skip
                if d_ino > max_ino:
                    raise FormatError(f"{where}: directory entry at +{pos} points to inode "
                                      f"{d_ino} (only {max_ino} exist)")  # fmt: skip
                name = buf[pos + 8 : pos + 8 + name_len]
                if b"/" in name or b"\0" in name:
                    raise FormatError(f"{where}: directory entry at +{pos} has a name "
                                      f"containing '/' or NUL: {name!r}")  # fmt: skip
                out.append((name, d_ino, ftype))
            pos += rec_len

    def _verify_leaf(self, inode: Inode, block: bytes, where: str) -> int:
        """Check a leaf block's checksum tail; return where the entries end."""
        bs = self.block_size
        if not self.metadata_csum:
            return bs
        t = bs - DIR_TAIL_SIZE
        d_ino, rec_len, name_len, ftype = _DIRENT.unpack_from(block, t)
        if d_ino or rec_len != DIR_TAIL_SIZE or name_len or ftype != DIR_TAIL_FT:
            raise FormatError(f"{where}: directory block has no checksum tail "
                              f"(metadata_csum)")  # fmt: skip
        stored = _u32(block, bs - 4)
        computed = _crc32c(inode.csum_seed, block[:t])
        if stored != computed:
            raise Ext2ChecksumError(f"{where}: directory block checksum mismatch (stored "
                                    f"{stored:#010x}, computed {computed:#010x})")  # fmt: skip
        return t

    def _dx_entries(
        self, inode: Inode, block: bytes, count_off: int, where: str
    ) -> list[tuple[int, int]]:
        """Validate an htree root or node; return its (hash, logical block) entries."""
        bs = self.block_size
        limit, count = struct.unpack_from("<HH", block, count_off)
        room = (bs - count_off) // 8 - (1 if self.metadata_csum else 0)
        if limit != room or not 1 <= count <= limit:
            raise FormatError(f"{where}: htree node has count {count}, limit {limit} "
                              f"(expected limit {room})")  # fmt: skip
        if self.metadata_csum:
            tail = count_off + limit * 8
            stored = _u32(block, tail + 4)
            c = _crc32c(inode.csum_seed, block[: count_off + count * 8])
            c = _crc32c(c, block[tail : tail + 4] + b"\0\0\0\0")  # checksum field as zero
            if stored != c:
                raise Ext2ChecksumError(f"{where}: htree node checksum mismatch (stored "
                                        f"{stored:#010x}, computed {c:#010x})")  # fmt: skip
        nblocks = inode.size // bs
        entries = [(0, _u32(block, count_off + 4))]
        for i in range(1, count):
            h, blk = struct.unpack_from("<II", block, count_off + 8 * i)
            if h < entries[-1][0]:
                raise FormatError(f"{where}: htree hashes are not sorted at entry {i}")
            entries.append((h, blk))
        for _h, blk in entries:
            if blk >= nblocks:
                raise FormatError(f"{where}: htree entry points to block {blk} beyond the "
                                  f"directory's {nblocks} blocks")  # fmt: skip
        return entries

    def _dx_root_dots(self, block: bytes, where: str) -> list[tuple[bytes, int, int]]:
        """The '.' and '..' entries that open an htree root block."""
        out = []
        for pos, name in ((0, b"."), (12, b"..")):
            d_ino, _rec_len, name_len, ftype = _DIRENT.unpack_from(block, pos)
            if not self._filetype:
                name_len |= ftype << 8
                ftype = 0
            if block[pos + 8 : pos + 8 + name_len] != name or not 0 < d_ino <= self.inodes_count:
                raise FormatError(f"{where}: htree root lacks its {name.decode()!r} entry at "
                                  f"+{pos}")  # fmt: skip
            out.append((name, d_ino, ftype))
        if self._rec_len(_u16(block, 4)) != 12:
            raise FormatError(f"{where}: htree root '.' entry has record length "
                              f"{self._rec_len(_u16(block, 4))}, expected 12")  # fmt: skip
        return out

    def _is_dx_node(self, block: bytes) -> bool:
        d_ino, rec_len, name_len, _ft = _DIRENT.unpack_from(block, 0)
        return d_ino == 0 and self._rec_len(rec_len) == self.block_size and name_len == 0

    async def _dir_raw_entries(self, inode: Inode) -> list[tuple[bytes, int, int]]:
        """Every live entry of directory ``inode``, '.' and '..' included."""
        ino, bs = inode.ino, self.block_size
        if not inode.is_dir:
            raise Ext2NotADirectory(f"inode {ino} is a {inode.kind}, not a directory")
        fmap = await self.extents(ino)
        out: list[tuple[bytes, int, int]] = []
        if fmap.inline is not None:
            data = inode.i_block + (inode.inline_xattr or b"")
            out.append((b".", ino, FT_DIR))
            out.append((b"..", _u32(data, 0), FT_DIR))
            where = f"directory inode {ino} inline data"
            self._parse_dirents(data, 4, N_BLOCKS_BYTES, where, out)
            if len(data) > N_BLOCKS_BYTES:
                self._parse_dirents(data, N_BLOCKS_BYTES, len(data), where, out)
            return out
        if inode.size % bs:
            raise FormatError(f"directory inode {ino}: size {inode.size} is not a multiple "
                              f"of the block size {bs}")  # fmt: skip
        dx = self._is_dx(inode)
        async for lblk, phys, block in self._read_runs(fmap, f"directory inode {ino}"):
            where = f"directory inode {ino} block {lblk} (byte offset {phys})"
            if dx and lblk == 0:
                out.extend(self._dx_root_dots(block, where))
                self._dx_entries(inode, block, 0x20, where)
                continue
            if dx and self._is_dx_node(block):
                if self.metadata_csum:
                    self._dx_entries(inode, block, 8, where)
                continue
            end = self._verify_leaf(inode, block, where)
            self._parse_dirents(block, 0, end, where, out)
        return out

    async def _read_runs(self, fmap: FileMap, what: str) -> AsyncIterator[tuple[int, int, bytes]]:
        """Yield ``(logical block, byte offset, block bytes)`` for every mapped block.

        Runs closer than :data:`READ_GAP_BYTES` on disk share one pread (the gap is read
        and dropped: cheaper than another call), up to :data:`MAX_PREAD_BYTES` each.
        """
        bs = self.block_size
        pieces: list[tuple[int, int, int]] = []  # (logical block, physical byte, length)
        for seg in fmap.runs():
            assert seg.physical is not None  # runs() only yields mapped runs
            for k in range(0, seg.length, MAX_PREAD_BYTES):
                n = min(MAX_PREAD_BYTES, seg.length - k)
                pieces.append(((seg.offset + k) // bs, seg.physical + k, -(-n // bs) * bs))
        i = 0
        while i < len(pieces):
            start = pieces[i][1]
            end = start + pieces[i][2]
            j = i + 1
            while j < len(pieces):
                nxt = pieces[j]
                if not 0 <= nxt[1] - end <= READ_GAP_BYTES or nxt[1] + nxt[2] - start > (
                    MAX_PREAD_BYTES
                ):
                    break
                end = nxt[1] + nxt[2]
                j += 1
            data = await self._read(start, end - start, what)
            for lblk, phys, length in pieces[i:j]:
                base = phys - start
                for k in range(0, length, bs):
                    yield lblk + k // bs, phys + k, data[base + k : base + k + bs]
            i = j

    async def readdir(self, ino: int) -> list[DirEntry]:
        """The entries of directory ``ino`` (without '.' and '..') in on-disk order."""
        inode = await self.inode(ino)
        return [
            DirEntry(name.decode("utf-8", "surrogateescape"), d_ino, ft)
            for name, d_ino, ft in await self._dir_raw_entries(inode)
            if name not in (b".", b"..")
        ]

    async def _dir_block(self, inode: Inode, fmap: FileMap, lblk: int) -> tuple[bytes, str]:
        segs = fmap.lookup(lblk * self.block_size, self.block_size)
        if not segs or segs[0].physical is None:
            raise FormatError(f"directory inode {inode.ino} has a hole at block {lblk}")
        phys = segs[0].physical
        where = f"directory inode {inode.ino} block {lblk} (byte offset {phys})"
        return await self._block(phys // self.block_size, where), where

    async def _find_entry(self, inode: Inode, name: bytes) -> int | None:
        """Inode number of ``name`` in directory ``inode``, or None."""
        if not inode.is_dir:
            raise Ext2NotADirectory(f"inode {inode.ino} is a {inode.kind}, not a directory")
        if inode.encrypted:
            raise Ext2Unsupported(f"directory inode {inode.ino} is encrypted")
        if self._is_dx(inode) and not inode.flags & _FL_CASEFOLD:
            return await self._dx_find(inode, name)
        return await self._linear_find(inode, name)

    async def _dx_find(self, inode: Inode, name: bytes) -> int | None:
        fmap = await self.extents(inode.ino)
        root, where = await self._dir_block(inode, fmap, 0)
        self._dx_root_dots(root, where)
        _zero, version, info_len, levels, _flags = struct.unpack_from("<IBBBB", root, 0x18)
        max_levels = 3 if self._incompat & Incompat.LARGEDIR else 2
        if info_len != 8 or levels >= max_levels:
            raise FormatError(f"{where}: htree root info length {info_len}, {levels + 1} "
                              f"levels (at most {max_levels})")  # fmt: skip
        if version <= HashVersion.TEA and self._s_flags & _FLAG_UNSIGNED_HASH:
            version += 3
        if version == HashVersion.SIPHASH:
            return await self._linear_find(inode, name)
        if version > HashVersion.SIPHASH:
            raise FormatError(f"{where}: unknown directory hash version {version}")
        target = dx_hash(name, version, self._hash_seed)[0]
        entries = self._dx_entries(inode, root, 0x20, where)
        path: list[tuple[list[tuple[int, int]], int]] = []
        visited: set[int] = set()

        async def descend(
            entries: list[tuple[int, int]], idx: int, depth: int, leftmost: bool
        ) -> int:
            """Walk from ``entries[idx]`` at ``depth`` down to a leaf, recording the path.
            Below the first node, take the entry for the target hash, or the leftmost one
            when continuing into the next leaf after a hash collision."""
            while True:
                path.append((entries, idx))
                blk = entries[idx][1]
                if depth == levels:
                    return blk
                node, nwhere = await self._dir_block(inode, fmap, blk)
                if not self._is_dx_node(node):
                    raise FormatError(f"{nwhere}: expected an htree index node")
                entries = self._dx_entries(inode, node, 8, nwhere)
                idx = 0 if leftmost else _dx_index(entries, target)
                depth += 1

        leaf = await descend(entries, _dx_index(entries, target), 0, False)
        while True:
            if leaf in visited:
                raise FormatError(f"directory inode {inode.ino}: htree visits leaf block "
                                  f"{leaf} twice")  # fmt: skip
            visited.add(leaf)
            block, lwhere = await self._dir_block(inode, fmap, leaf)
            if self._is_dx_node(block) and self.metadata_csum:
                raise FormatError(f"{lwhere}: htree leaf is an index node")
            found: list[tuple[bytes, int, int]] = []
            self._parse_dirents(block, 0, self._verify_leaf(inode, block, lwhere), lwhere,
                                found)  # fmt: skip
            for entry_name, d_ino, _ft in found:
                if entry_name == name:
                    return d_ino
            # A hash collision may continue into the next leaf (its hash has bit 0 set).
            while path and path[-1][1] + 1 >= len(path[-1][0]):
                path.pop()
            if not path:
                return None
            entries, idx = path.pop()
            if entries[idx + 1][0] & ~1 != target:
                return None
            leaf = await descend(entries, idx + 1, len(path), True)

    async def _linear_find(self, inode: Inode, name: bytes) -> int | None:
        """Scan a directory without (usable) index; small ones are cached by name."""
        names = self._dir_names.get(inode.ino)
        if names is None:
            names = {}
            for entry_name, d_ino, _ft in await self._dir_raw_entries(inode):
                names.setdefault(entry_name, d_ino)
            if inode.size <= DIR_CACHE_MAX_BYTES:
                self._dir_names.put(inode.ino, names)
        return names.get(name)

    # ---------------------------------------------------------------- paths

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
            child_ino = None
            if len(raw) <= MAX_NAME_LEN:
                child_ino = await self._find_entry(current, raw)
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
                entries = await self._dir_raw_entries(directory)
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
