"""Partition tables: MBR (primary, extended and logical partitions) and GPT.

:func:`read_partition_table` reads the table of a disk through an async
``pread(offset, length)`` callable and returns a :class:`PartitionTable`. It is the
reader behind ``--filter=partition partition=N`` and follows nbdkit's numbering:

* **MBR**: numbers 1-4 are the four primary slots of the MBR; 5 and up are the logical
  partitions, in the order of the EBR chain of the extended partition. Every EBR of the
  chain takes one number, even when its data entry is empty (nbdkit counts the same way).
  The extended partition itself is listed under its primary number (its type is
  ``0x05``, ``0x0f`` or ``0x85``; see :attr:`Partition.is_extended`).
* **GPT**: N is the 1-based index in the partition entry array; unused entries (type GUID
  all zero) are not partitions, so the numbers may have gaps.

Guarantees:

* Every listed partition lies inside the disk, and no two listed partitions overlap
  (logical partitions lie inside their extended partition and do not overlap each other
  or any EBR; primaries do not overlap each other or the MBR; GPT partitions lie inside
  the header's usable LBA range). Anything else is a :class:`FormatError` naming the
  partition, so a filter never serves bytes from a table that contradicts itself.
* Reads never go past ``disk_size``; the amount read is bounded by the named limits
  :data:`MAX_LOGICAL_PARTITIONS`, :data:`MAX_GPT_ENTRIES` and :data:`MAX_GPT_ENTRY_SIZE`.
* Malformed input gives :class:`FormatError`, never another exception. Errors raised by
  ``pread`` itself (I/O errors) propagate unchanged.

Choices and limits:

* A GPT is recognised by a protective MBR: the ``0x55AA`` signature and a primary entry
  of type ``0xEE`` (a hybrid MBR counts too; the GPT wins). The MBR entries are then
  ignored.
* GPT integrity: header CRC32, partition entry array CRC32, header size, entry size
  (at least 128, a multiple of 8, at most :data:`MAX_GPT_ENTRY_SIZE`), number of entries
  (1..:data:`MAX_GPT_ENTRIES`), usable LBAs and entry array inside the disk. **If the
  primary header (LBA 1) or its entry array fails these checks, the backup header at the
  last LBA of the disk is used instead**, and :attr:`PartitionTable.gpt_header` says
  ``"backup"`` so a caller can warn. Only when both fail is the table refused; the error
  gives both reasons. A header whose checksums hold but whose partitions overlap or lie
  outside the usable range is refused without trying the backup: the table was written
  that way on purpose, and guessing would hide the problem.
* The backup header is not required to sit at the primary's "alternate LBA" or at the
  end of the disk when the primary is good (images grown with ``qemu-img resize`` move
  the end); partitions are still checked against the actual disk size.
* Sector size: 512 bytes. A GPT whose header is found at byte 4096 instead of 512 is
  read with 4096-byte sectors (4Kn disks); the backup fallback of such a disk is tried
  only when the primary's signature is intact. MBRs are always read with 512-byte
  sectors.
* An MBR entry is unused when its type is 0 or its length is zero. A sector with the
  ``0x55AA`` signature whose boot indicators are not 0x00/0x80 is not an MBR (it is
  usually a FAT boot sector of an unpartitioned disk), as in Linux.
* Only one extended partition per MBR is supported. CHS fields are ignored.
"""

import struct
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from trionbd.formats import FormatError, Pread, read_exactly

__all__ = [
    "GPT_SECTOR_SIZE_4K",
    "MAX_GPT_ENTRIES",
    "MAX_GPT_ENTRY_SIZE",
    "MAX_LOGICAL_PARTITIONS",
    "MBR_EXTENDED_TYPES",
    "MIN_GPT_ENTRY_SIZE",
    "SECTOR_SIZE",
    "Partition",
    "PartitionTable",
    "read_partition_table",
]

SECTOR_SIZE = 512
"""Sector size of every MBR and of GPTs found at byte 512."""

GPT_SECTOR_SIZE_4K = 4096
"""Sector size used when the GPT header is found at byte 4096 (4Kn disks)."""

MAX_LOGICAL_PARTITIONS = 128
"""Most EBRs (hence logical partitions) followed in an MBR extended partition."""

MAX_GPT_ENTRIES = 4096
"""Largest accepted number of GPT partition entries (tools write 128 by default)."""

MIN_GPT_ENTRY_SIZE = 128
"""Smallest GPT partition entry size allowed by the UEFI specification."""

MAX_GPT_ENTRY_SIZE = 1024
"""Largest accepted GPT partition entry size (tools write 128)."""

MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
"""MBR partition types that hold an EBR chain of logical partitions."""

_MBR_EXTENDED_TYPE_NAMES = frozenset(f"0x{t:02x}" for t in MBR_EXTENDED_TYPES)
_MBR_SIGNATURE = b"\x55\xaa"
_MBR_ENTRIES_OFFSET = 446
_MBR_ENTRY = struct.Struct("<B3sB3sII")
_MBR_PROTECTIVE_TYPE = 0xEE
_GPT_SIGNATURE = b"EFI PART"
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_HEADER_MIN_SIZE = 92
_GPT_ENTRY_FIXED = struct.Struct("<16s16sQQQ")
_GPT_NAME_OFFSET = 56
_GPT_NAME_SIZE = 72
_GPT_ATTR_LEGACY_BIOS_BOOTABLE = 1 << 2
_ZERO_GUID = bytes(16)


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition: where it is on the disk, in bytes, and what the table says of it."""

    number: int
    """1-based number (see the module docstring for MBR and GPT numbering)."""
    offset: int
    """Byte offset of the first byte of the partition on the disk."""
    length: int
    """Length in bytes (always > 0)."""
    type: str
    """MBR: ``"0x83"`` style (two lower-case hex digits); GPT: type GUID, upper case."""
    name: str | None = None
    """GPT partition name (``""`` when unnamed); ``None`` for MBR."""
    bootable: bool = False
    """MBR: boot indicator 0x80. GPT: the "legacy BIOS bootable" attribute (bit 2)."""
    uuid: str | None = None
    """GPT unique partition GUID, upper case; ``None`` for MBR."""

    @property
    def end(self) -> int:
        """Byte offset just past the last byte of the partition."""
        return self.offset + self.length

    @property
    def is_extended(self) -> bool:
        """True for an MBR extended partition (the container of logical partitions)."""
        return self.type in _MBR_EXTENDED_TYPE_NAMES


@dataclass(frozen=True, slots=True)
class PartitionTable:
    """A validated partition table."""

    scheme: Literal["mbr", "gpt"]
    partitions: tuple[Partition, ...]
    """The partitions, sorted by number."""
    sector_size: int
    disk_id: str
    """MBR: disk signature as ``"0x1234abcd"``; GPT: disk GUID, upper case."""
    gpt_header: Literal["primary", "backup"] | None = None
    """Which GPT header was used (``"backup"`` means the primary is damaged)."""

    def get(self, number: int) -> Partition:
        """Return partition ``number`` or raise :class:`FormatError` listing what exists."""
        for partition in self.partitions:
            if partition.number == number:
                return partition
        if self.partitions:
            have = "table has: " + ", ".join(str(p.number) for p in self.partitions)
        else:
            have = "table has no partitions"
        if number < 1:
            have = "partition numbers start at 1; " + have
        raise FormatError(f"partition {number} not found ({have})")


async def read_partition_table(pread: Pread, disk_size: int) -> PartitionTable:
    """Read and validate the MBR or GPT partition table of a disk of ``disk_size`` bytes.

    Raises :class:`FormatError` when there is no table ("no MBR or GPT partition table
    found"), when it is damaged beyond the fallbacks described in the module docstring,
    or when its partitions fall outside the disk or overlap.
    """
    if disk_size < 0:
        raise ValueError(f"disk_size must not be negative, got {disk_size}")
    if disk_size < SECTOR_SIZE:
        raise FormatError(
            f"no MBR or GPT partition table found (the disk is {disk_size} bytes, "
            f"smaller than one {SECTOR_SIZE}-byte sector)"
        )
    mbr = await read_exactly(pread, 0, SECTOR_SIZE, "the MBR at sector 0")
    if mbr[510:512] != _MBR_SIGNATURE:
        hint = ""
        if disk_size >= 2 * SECTOR_SIZE:
            if await read_exactly(pread, SECTOR_SIZE, 8, "LBA 1") == _GPT_SIGNATURE:
                hint = " (a GPT header is at LBA 1, but there is no protective MBR)"
        raise FormatError(f"no MBR or GPT partition table found{hint}")
    entries = [_MbrEntry.parse(mbr, i) for i in range(4)]
    for slot, entry in enumerate(entries, 1):
        if entry.status not in (0x00, 0x80):
            raise FormatError(
                "no MBR or GPT partition table found (sector 0 ends in 0x55AA, but MBR "
                f"entry {slot} has boot indicator 0x{entry.status:02x}, not 0x00 or 0x80; "
                "a filesystem boot sector?)"
            )
    if any(e.type == _MBR_PROTECTIVE_TYPE for e in entries):
        return await _read_gpt(pread, disk_size)
    return await _read_mbr(pread, disk_size, mbr, entries)


# -- helpers ----------------------------------------------------------------------------


class _Extent(NamedTuple):
    """A half-open range of sectors [start, end) with a label for error messages."""

    start: int
    end: int
    label: str


def _check_disjoint(extents: Iterable[_Extent], scheme: str) -> None:
    ordered = sorted(extents)
    widest: _Extent | None = None
    for extent in ordered:
        if widest is not None and extent.start < widest.end:
            raise FormatError(
                f"{scheme} {extent.label} (sectors {extent.start}..{extent.end - 1}) "
                f"overlaps {widest.label} (sectors {widest.start}..{widest.end - 1})"
            )
        if widest is None or extent.end > widest.end:
            widest = extent


# -- MBR --------------------------------------------------------------------------------


class _MbrEntry(NamedTuple):
    status: int
    type: int
    start: int
    sectors: int

    @classmethod
    def parse(cls, sector: bytes, index: int) -> "_MbrEntry":
        status, _chs_first, ptype, _chs_last, start, sectors = _MBR_ENTRY.unpack_from(
            sector, _MBR_ENTRIES_OFFSET + 16 * index
        )
        return cls(status, ptype, start, sectors)

    @property
    def used(self) -> bool:
        return self.type != 0 and self.sectors != 0


def _mbr_partition(number: int, entry: _MbrEntry, start: int) -> Partition:
    return Partition(
        number=number,
        offset=start * SECTOR_SIZE,
        length=entry.sectors * SECTOR_SIZE,
        type=f"0x{entry.type:02x}",
        bootable=entry.status == 0x80,
    )


async def _read_mbr(
    pread: Pread, disk_size: int, mbr: bytes, entries: list[_MbrEntry]
) -> PartitionTable:
    disk_sectors = disk_size // SECTOR_SIZE
    partitions: list[Partition] = []
    primaries = [_Extent(0, 1, "the MBR at sector 0")]
    extended: list[tuple[int, _MbrEntry]] = []
    for number, entry in enumerate(entries, 1):
        if not entry.used:
            continue
        end = entry.start + entry.sectors
        if end > disk_sectors:
            raise FormatError(
                f"MBR partition {number} (sectors {entry.start}..{end - 1}) extends beyond "
                f"the end of the disk ({disk_size} bytes, {disk_sectors} sectors)"
            )
        primaries.append(_Extent(entry.start, end, f"partition {number}"))
        partitions.append(_mbr_partition(number, entry, entry.start))
        if entry.type in MBR_EXTENDED_TYPES:
            extended.append((number, entry))
    _check_disjoint(primaries, "MBR")
    if len(extended) > 1:
        numbers = " and ".join(str(n) for n, _ in extended)
        raise FormatError(
            f"MBR has {len(extended)} extended partitions ({numbers}); only one is supported"
        )
    if extended:
        partitions.extend(await _read_logical(pread, *extended[0]))
    (disk_signature,) = struct.unpack_from("<I", mbr, 440)
    return PartitionTable(
        scheme="mbr",
        partitions=tuple(partitions),
        sector_size=SECTOR_SIZE,
        disk_id=f"0x{disk_signature:08x}",
    )


async def _read_logical(pread: Pread, container: int, extended: _MbrEntry) -> list[Partition]:
    """Follow the EBR chain of the extended partition in primary slot ``container``."""
    ext_start = extended.start
    ext_end = extended.start + extended.sectors
    where = f"extended partition {container} (sectors {ext_start}..{ext_end - 1})"
    partitions: list[Partition] = []
    extents: list[_Extent] = []
    visited: set[int] = set()
    ebr_lba = ext_start
    number = 5
    while True:
        if ebr_lba in visited:
            raise FormatError(
                f"MBR EBR chain of {where} loops back to the EBR at sector {ebr_lba} "
                f"(after {len(visited)} EBRs)"
            )
        if len(visited) >= MAX_LOGICAL_PARTITIONS:
            raise FormatError(
                f"MBR {where} has more than {MAX_LOGICAL_PARTITIONS} logical partitions "
                f"(MAX_LOGICAL_PARTITIONS = {MAX_LOGICAL_PARTITIONS})"
            )
        if not ext_start <= ebr_lba < ext_end:
            raise FormatError(
                f"MBR EBR of partition {number} at sector {ebr_lba} lies outside {where}"
            )
        visited.add(ebr_lba)
        ebr = await read_exactly(
            pread, ebr_lba * SECTOR_SIZE, SECTOR_SIZE, f"the EBR at sector {ebr_lba}"
        )
        if ebr[510:512] != _MBR_SIGNATURE:
            raise FormatError(
                f"MBR EBR of partition {number} at sector {ebr_lba} has no 0x55AA signature"
            )
        extents.append(_Extent(ebr_lba, ebr_lba + 1, f"the EBR at sector {ebr_lba}"))
        data = _MbrEntry.parse(ebr, 0)
        if data.used:
            start = ebr_lba + data.start
            end = start + data.sectors
            if start < ext_start or end > ext_end:
                raise FormatError(
                    f"MBR partition {number} (sectors {start}..{end - 1}) lies outside {where}"
                )
            extents.append(_Extent(start, end, f"partition {number}"))
            partitions.append(_mbr_partition(number, data, start))
        link = _MbrEntry.parse(ebr, 1)
        if not link.used:
            break
        ebr_lba = ext_start + link.start
        number += 1
    _check_disjoint(extents, "MBR")
    return partitions


# -- GPT --------------------------------------------------------------------------------


class _GptHeader(NamedTuple):
    disk_guid: bytes
    num_entries: int
    entry_size: int
    first_usable: int
    last_usable: int


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw)).upper()


async def _read_gpt(pread: Pread, disk_size: int) -> PartitionTable:
    sector_size = SECTOR_SIZE
    if disk_size >= 2 * SECTOR_SIZE and (
        await read_exactly(pread, SECTOR_SIZE, 8, "LBA 1") != _GPT_SIGNATURE
        and disk_size >= 2 * GPT_SECTOR_SIZE_4K
        and await read_exactly(pread, GPT_SECTOR_SIZE_4K, 8, "4K LBA 1") == _GPT_SIGNATURE
    ):
        sector_size = GPT_SECTOR_SIZE_4K
    disk_sectors = disk_size // sector_size
    which: Literal["primary", "backup"] = "primary"
    try:
        header, array = await _load_gpt_header(pread, sector_size, 1, disk_sectors)
    except FormatError as primary_error:
        backup_lba = disk_sectors - 1
        if backup_lba <= 1:
            raise FormatError(
                f"GPT protective MBR found, but no valid GPT header: primary header at "
                f"LBA 1: {primary_error}; the disk has no room for a backup header"
            ) from None
        try:
            header, array = await _load_gpt_header(pread, sector_size, backup_lba, disk_sectors)
        except FormatError as backup_error:
            raise FormatError(
                f"GPT protective MBR found, but no valid GPT header: primary header at "
                f"LBA 1: {primary_error}; backup header at LBA {backup_lba}: {backup_error}"
            ) from None
        which = "backup"

    partitions: list[Partition] = []
    extents: list[_Extent] = []
    for index in range(header.num_entries):
        raw = array[index * header.entry_size : (index + 1) * header.entry_size]
        type_guid, unique_guid, first, last, attributes = _GPT_ENTRY_FIXED.unpack_from(raw)
        if type_guid == _ZERO_GUID:
            continue
        number = index + 1
        if last < first:
            raise FormatError(
                f"GPT partition {number} ends (LBA {last}) before it starts (LBA {first})"
            )
        if first < header.first_usable or last > header.last_usable:
            beyond = " and beyond the end of the disk" if last >= disk_sectors else ""
            raise FormatError(
                f"GPT partition {number} (LBAs {first}..{last}) lies outside the usable "
                f"LBAs {header.first_usable}..{header.last_usable}{beyond}"
            )
        name_bytes = raw[_GPT_NAME_OFFSET : _GPT_NAME_OFFSET + _GPT_NAME_SIZE]
        name = name_bytes.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        extents.append(_Extent(first, last + 1, f"partition {number}"))
        partitions.append(
            Partition(
                number=number,
                offset=first * sector_size,
                length=(last - first + 1) * sector_size,
                type=_guid(type_guid),
                name=name,
                bootable=bool(attributes & _GPT_ATTR_LEGACY_BIOS_BOOTABLE),
                uuid=_guid(unique_guid),
            )
        )
    _check_disjoint(extents, "GPT")
    return PartitionTable(
        scheme="gpt",
        partitions=tuple(partitions),
        sector_size=sector_size,
        disk_id=_guid(header.disk_guid),
        gpt_header=which,
    )


async def _load_gpt_header(
    pread: Pread, sector_size: int, lba: int, disk_sectors: int
) -> tuple[_GptHeader, bytes]:
    """Read and check the GPT header at ``lba`` and its entry array.

    Raises :class:`FormatError` with a reason (without the location, which the caller
    adds) when anything fails.
    """
    if lba >= disk_sectors:
        raise FormatError(f"the disk ({disk_sectors} sectors) is too small to hold it")
    sector = await read_exactly(
        pread, lba * sector_size, sector_size, f"the GPT header at LBA {lba}"
    )
    (
        signature,
        _revision,
        header_size,
        stored_crc,
        _reserved,
        my_lba,
        alternate_lba,
        first_usable,
        last_usable,
        disk_guid,
        entries_lba,
        num_entries,
        entry_size,
        entries_crc,
    ) = _GPT_HEADER.unpack_from(sector)
    if signature != _GPT_SIGNATURE:
        raise FormatError(f"no 'EFI PART' signature (found {signature!r})")
    if not _GPT_HEADER_MIN_SIZE <= header_size <= sector_size:
        raise FormatError(
            f"header size {header_size} is not in {_GPT_HEADER_MIN_SIZE}..{sector_size}"
        )
    computed = zlib.crc32(sector[:16] + bytes(4) + sector[20:header_size])
    if computed != stored_crc:
        raise FormatError(
            f"header CRC32 mismatch (stored 0x{stored_crc:08x}, computed 0x{computed:08x})"
        )
    if my_lba != lba:
        raise FormatError(f"header says it is at LBA {my_lba}, but it was read from LBA {lba}")
    if entry_size < MIN_GPT_ENTRY_SIZE or entry_size % 8 != 0 or entry_size > MAX_GPT_ENTRY_SIZE:
        raise FormatError(
            f"partition entry size {entry_size} is not a multiple of 8 in "
            f"{MIN_GPT_ENTRY_SIZE}..{MAX_GPT_ENTRY_SIZE} (MAX_GPT_ENTRY_SIZE)"
        )
    if not 1 <= num_entries <= MAX_GPT_ENTRIES:
        raise FormatError(
            f"number of partition entries {num_entries} is not in 1..{MAX_GPT_ENTRIES} "
            f"(MAX_GPT_ENTRIES)"
        )
    if not 0 < first_usable <= last_usable < disk_sectors:
        raise FormatError(
            f"usable LBAs {first_usable}..{last_usable} are not within the disk "
            f"(LBAs 0..{disk_sectors - 1})"
        )
    if first_usable <= lba <= last_usable:
        raise FormatError(f"usable LBAs {first_usable}..{last_usable} include the header")
    if first_usable <= alternate_lba <= last_usable:
        raise FormatError(
            f"usable LBAs {first_usable}..{last_usable} include the other header "
            f"(alternate LBA {alternate_lba})"
        )
    array_bytes = num_entries * entry_size
    array_end = entries_lba + -(-array_bytes // sector_size)  # exclusive, in sectors
    if entries_lba < 1 or array_end > disk_sectors:
        raise FormatError(
            f"partition entry array (LBAs {entries_lba}..{array_end - 1}) is not within "
            f"the disk (LBAs 1..{disk_sectors - 1})"
        )
    if entries_lba <= lba < array_end:
        raise FormatError(
            f"partition entry array (LBAs {entries_lba}..{array_end - 1}) includes the header"
        )
    if entries_lba <= last_usable and first_usable < array_end:
        raise FormatError(
            f"partition entry array (LBAs {entries_lba}..{array_end - 1}) overlaps the "
            f"usable LBAs {first_usable}..{last_usable}"
        )
    array = await read_exactly(
        pread,
        entries_lba * sector_size,
        array_bytes,
        f"the GPT partition entry array at LBA {entries_lba}",
    )
    computed = zlib.crc32(array)
    if computed != entries_crc:
        raise FormatError(
            f"partition entry array CRC32 mismatch (stored 0x{entries_crc:08x}, "
            f"computed 0x{computed:08x})"
        )
    header = _GptHeader(disk_guid, num_entries, entry_size, first_usable, last_usable)
    return header, array
