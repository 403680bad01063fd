"""The ext2/3/4 superblock: feature flags (as e2fsprogs names them), which of them this
reader can read, and the geometry every other part of the reader works from."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag

from .. import FormatError
from .checksums import M32, ext4_crc32c
from .errors import Ext2ChecksumError, Ext2Unsupported

MIN_LOG_BLOCK_SIZE, MAX_LOG_BLOCK_SIZE = 0, 6
"""Block sizes from 1 KiB (1024 << 0) to 64 KiB (1024 << 6)."""

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT2_MAGIC = 0xEF53
ROOT_INO = 2
GOOD_OLD_INODE_SIZE = 128
GOOD_OLD_FIRST_INO = 11

# Superblock s_flags
_FLAG_UNSIGNED_HASH = 0x2
# Superblock s_state
_STATE_ERRORS = 0x2


def u16(buf: bytes, off: int) -> int:
    """The little-endian 16-bit field at ``buf[off]``."""
    return int.from_bytes(buf[off : off + 2], "little")


def u32(buf: bytes, off: int) -> int:
    """The little-endian 32-bit field at ``buf[off]``."""
    return int.from_bytes(buf[off : off + 4], "little")


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


def _describe_bits(value: int, names: dict[int, str], prefix: str) -> str:
    return ", ".join(_bit_names(value, names, prefix))


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


@dataclass(frozen=True, slots=True)
class Superblock:
    """What the reader needs from a validated superblock. Build with :meth:`parse`."""

    features: Features
    needs_recovery: bool
    """The journal holds transactions not yet replayed (``needs_recovery``)."""
    read_only_reason: str | None
    """Why the filesystem must not be written through, or None."""
    metadata_csum: bool
    """crc32c checksums on all metadata (``metadata_csum``)."""
    gdt_csum: bool
    """crc16 checksums on group descriptors (``uninit_bg`` without ``metadata_csum``)."""
    csum_seed: int
    uuid: bytes
    volume_name: str
    block_size: int
    is64: bool
    blocks_count: int
    inodes_count: int
    first_data_block: int
    blocks_per_group: int
    inodes_per_group: int
    inode_size: int
    first_ino: int
    desc_size: int
    groups_count: int
    itable_blocks: int
    """Blocks taken by one group's inode table."""
    first_meta_bg: int
    backup_bgs: tuple[int, int]
    hash_seed: tuple[int, int, int, int]
    unsigned_hash: bool
    """Directory hashes treat name bytes as unsigned chars (superblock s_flags)."""
    filetype: bool
    """Directory entries carry a file type byte (``filetype``)."""

    @property
    def group_csum(self) -> bool:
        """Group descriptors carry a checksum (and valid flags and unused-inode counts)."""
        return self.metadata_csum or self.gdt_csum

    @classmethod
    def parse(cls, sb: bytes, image_size: int, allow_needs_recovery: bool) -> Superblock:
        """Validate the superblock bytes ``sb`` of an image of ``image_size`` bytes.

        Raises :class:`Ext2Unsupported` for a feature that prevents reading,
        :class:`Ext2ChecksumError` for a checksum mismatch and FormatError otherwise.
        """
        where = f"superblock at byte offset {SUPERBLOCK_OFFSET}"
        magic = u16(sb, 0x38)
        if magic != EXT2_MAGIC:
            raise FormatError(
                f"bad superblock magic {magic:#06x} at byte offset {SUPERBLOCK_OFFSET + 0x38} "
                f"(expected {EXT2_MAGIC:#06x}): not an ext2/ext3/ext4 filesystem"
            )
        compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
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
        needs_recovery = bool(incompat & Incompat.RECOVER)
        if needs_recovery and not allow_needs_recovery:
            raise Ext2Unsupported(
                "feature needs_recovery: the journal holds transactions that were never "
                "replayed, so the filesystem may be inconsistent; run e2fsck, or open it "
                "read-only with allow_needs_recovery=True"
            )
        metadata_csum = bool(ro_compat & RoCompat.METADATA_CSUM)
        if metadata_csum:
            if sb[0x175] != 1:
                raise Ext2Unsupported(
                    f"{where}: metadata_csum with checksum type {sb[0x175]} (only 1, crc32c, "
                    "exists)"
                )
            stored = u32(sb, 0x3FC)
            computed = ext4_crc32c(M32, sb[:0x3FC])
            if stored != computed:
                raise Ext2ChecksumError(
                    f"{where}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
        uuid = sb[0x68:0x78]
        if incompat & Incompat.CSUM_SEED:
            csum_seed = u32(sb, 0x270)
        else:
            csum_seed = ext4_crc32c(M32, uuid)

        log_bs = u32(sb, 0x18)
        if not MIN_LOG_BLOCK_SIZE <= log_bs <= MAX_LOG_BLOCK_SIZE:
            raise FormatError(
                f"{where}: s_log_block_size {log_bs} is out of range "
                f"({MIN_LOG_BLOCK_SIZE}..{MAX_LOG_BLOCK_SIZE}, i.e. 1 KiB..64 KiB blocks)"
            )
        bs = 1024 << log_bs
        is64 = bool(incompat & Incompat.BIT64)
        blocks = u32(sb, 0x4)
        if is64:
            blocks |= u32(sb, 0x150) << 32
        inodes_count = u32(sb, 0x0)
        fdb = u32(sb, 0x14)
        bpg = u32(sb, 0x20)
        ipg = u32(sb, 0x28)
        rev = u32(sb, 0x4C)
        if rev > 1:
            raise Ext2Unsupported(f"{where}: unknown revision level {rev} (known: 0, 1)")
        if rev == 0:
            isz, first_ino = GOOD_OLD_INODE_SIZE, GOOD_OLD_FIRST_INO
        else:
            isz, first_ino = u16(sb, 0x58), u32(sb, 0x54)
        if isz < GOOD_OLD_INODE_SIZE or isz > bs or isz & (isz - 1):
            raise FormatError(
                f"{where}: inode size {isz} is not a power of two between "
                f"{GOOD_OLD_INODE_SIZE} and the block size {bs}"
            )
        if is64:
            ds = u16(sb, 0xFE)
            if ds < 64 or ds > 1024 or ds & (ds - 1):
                raise FormatError(
                    f"{where}: group descriptor size {ds} is not a power of two between "
                    f"64 and 1024 (64bit feature)"
                )
        else:
            ds = 32
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
        if blocks * bs > image_size:
            raise FormatError(
                f"{where}: the filesystem has {blocks} blocks of {bs} bytes "
                f"({blocks * bs} bytes) but the image has only {image_size} bytes (truncated?)"
            )
        groups_count = -(-(blocks - fdb) // bpg)
        if not ROOT_INO <= inodes_count <= groups_count * ipg:
            raise FormatError(
                f"{where}: inode count {inodes_count} does not fit "
                f"{groups_count} groups of {ipg} inodes"
            )
        backup = struct.unpack_from("<II", sb, 0x24C)
        seed = struct.unpack_from("<IIII", sb, 0xEC)

        reasons = []
        unknown_ro = ro_compat & ~_RO_COMPAT_KNOWN
        if unknown_ro:
            names = _describe_bits(unknown_ro, _RO_COMPAT_NAMES, "R")
            reasons.append(f"unknown read-only-compatible feature(s) {names}")
        for ro_bit in (RoCompat.READONLY, RoCompat.SHARED_BLOCKS, RoCompat.HAS_SNAPSHOT):
            if ro_compat & ro_bit:
                reasons.append(f"feature {_RO_COMPAT_NAMES[ro_bit]} forbids writes")
        if needs_recovery:
            reasons.append("the journal needs recovery (feature needs_recovery)")
        if u16(sb, 0x3A) & _STATE_ERRORS:  # s_state
            reasons.append("the filesystem is marked as having errors (run e2fsck)")

        return cls(
            features=Features(compat, incompat, ro_compat),
            needs_recovery=needs_recovery,
            read_only_reason="; ".join(reasons) or None,
            metadata_csum=metadata_csum,
            gdt_csum=bool(ro_compat & RoCompat.GDT_CSUM) and not metadata_csum,
            csum_seed=csum_seed,
            uuid=uuid,
            volume_name=sb[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", "replace"),
            block_size=bs,
            is64=is64,
            blocks_count=blocks,
            inodes_count=inodes_count,
            first_data_block=fdb,
            blocks_per_group=bpg,
            inodes_per_group=ipg,
            inode_size=isz,
            first_ino=first_ino,
            desc_size=ds,
            groups_count=groups_count,
            itable_blocks=-(-(ipg * isz) // bs),
            first_meta_bg=u32(sb, 0x104),
            backup_bgs=(backup[0], backup[1]),
            hash_seed=(seed[0], seed[1], seed[2], seed[3]),
            unsigned_hash=bool(u32(sb, 0x160) & _FLAG_UNSIGNED_HASH),
            filetype=bool(incompat & Incompat.FILETYPE),
        )

    def has_super(self, group: int) -> bool:
        """Whether block group ``group`` holds a superblock (and group descriptor) copy."""
        if group == 0:
            return True
        if self.features.compat & Compat.SPARSE_SUPER2:
            return group in self.backup_bgs
        if group <= 1 or not self.features.ro_compat & RoCompat.SPARSE_SUPER:
            return True
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def group_first_block(self, group: int) -> int:
        return self.first_data_block + group * self.blocks_per_group
