"""Tests of the MBR/GPT partition table reader (trionbd.formats.partition).

Real tables come from ``sfdisk`` driven by a script on stdin, on image files made with
``truncate``; the reader's answer is compared with ``sfdisk --json``. Damaged tables are
made by editing those images byte by byte (re-sealing GPT checksums where the test wants
a field check, not a CRC check, to fire) or written from scratch with small builders.
"""

import functools
import itertools
import json
import re
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings

from tests.formats.support import MemoryImage
from trionbd.formats import FormatError
from trionbd.formats.partition import (
    MAX_GPT_ENTRIES,
    MAX_LOGICAL_PARTITIONS,
    Partition,
    PartitionTable,
    read_partition_table,
)

pytestmark = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs sfdisk")

SECTOR = 512
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_FIELDS = (
    "signature revision header_size header_crc reserved my_lba alternate_lba first_usable "
    "last_usable disk_guid entries_lba num_entries entry_size entries_crc"
).split()


# -- helpers ----------------------------------------------------------------------------


async def read(data: bytes | bytearray) -> PartitionTable:
    return await read_partition_table(MemoryImage(data).pread, len(data))


def make_image(directory: Path, name: str, size: int, script: str) -> tuple[bytes, Any]:
    """Partition a fresh sparse file with sfdisk; return its bytes and ``sfdisk --json``."""
    path = directory / name
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
        input=script.encode(),
        check=True,
        capture_output=True,
    )
    dump = subprocess.run(["sfdisk", "--json", str(path)], check=True, capture_output=True).stdout
    return path.read_bytes(), json.loads(dump)["partitiontable"]


def sfdisk_number(table: Any, node: str) -> int:
    match = re.fullmatch(re.escape(table["device"]) + r"(\d+)", node)
    assert match is not None, node
    return int(match.group(1))


def gpt_header(img: bytes | bytearray, lba: int) -> dict[str, Any]:
    return dict(zip(GPT_FIELDS, GPT_HEADER.unpack_from(img, lba * SECTOR), strict=True))


def write_gpt_header(img: bytearray, lba: int, **changes: Any) -> None:
    """Change header fields at ``lba`` and recompute the header CRC32."""
    fields = gpt_header(img, lba) | changes
    fields["header_crc"] = 0
    GPT_HEADER.pack_into(img, lba * SECTOR, *(fields[f] for f in GPT_FIELDS))
    size = fields["header_size"]
    crc = zlib.crc32(img[lba * SECTOR : lba * SECTOR + size])
    struct.pack_into("<I", img, lba * SECTOR + 16, crc)


def reseal_gpt(img: bytearray, lba: int) -> None:
    """Recompute the entry array CRC32 and header CRC32 of the header at ``lba``."""
    h = gpt_header(img, lba)
    start = h["entries_lba"] * SECTOR
    array = img[start : start + h["num_entries"] * h["entry_size"]]
    write_gpt_header(img, lba, entries_crc=zlib.crc32(array))


def gpt_entry_offset(img: bytes | bytearray, lba: int, index: int) -> int:
    h = gpt_header(img, lba)
    return int(h["entries_lba"] * SECTOR + index * h["entry_size"])


def mbr_entry(status: int = 0, ptype: int = 0, start: int = 0, sectors: int = 0) -> bytes:
    return struct.pack("<B3sB3sII", status, bytes(3), ptype, bytes(3), start, sectors)


def boot_record(*entries: bytes) -> bytes:
    """A 512-byte MBR or EBR holding ``entries`` (up to 4) and the 0x55AA signature."""
    slots = b"".join(entries).ljust(64, b"\0")
    return bytes(446) + slots + b"\x55\xaa"


def raw_disk(sectors: int, records: dict[int, bytes]) -> bytearray:
    img = bytearray(sectors * SECTOR)
    for lba, record in records.items():
        img[lba * SECTOR : (lba + 1) * SECTOR] = record
    return img


def build_gpt(
    disk_sectors: int,
    sector_size: int,
    parts: list[tuple[int, int, int, str]],
    num_entries: int = 128,
) -> bytearray:
    """A GPT disk written from scratch: ``parts`` are (index, first LBA, last LBA, name)."""
    img = bytearray(disk_sectors * sector_size)
    array_sectors = -(-num_entries * 128 // sector_size)
    first_usable = 2 + array_sectors
    last_usable = disk_sectors - 2 - array_sectors
    array = bytearray(num_entries * 128)
    for index, first, last, name in parts:
        struct.pack_into(
            "<16s16sQQQ72s",
            array,
            index * 128,
            uuid.UUID(LINUX).bytes_le,
            uuid.uuid4().bytes_le,
            first,
            last,
            0,
            name.encode("utf-16-le"),
        )
    disk_guid = uuid.uuid4().bytes_le
    for my_lba, other_lba, entries_lba in (
        (1, disk_sectors - 1, 2),
        (disk_sectors - 1, 1, disk_sectors - 1 - array_sectors),
    ):
        img[entries_lba * sector_size : entries_lba * sector_size + len(array)] = array
        header = bytearray(
            GPT_HEADER.pack(
                b"EFI PART",
                0x10000,
                92,
                0,
                0,
                my_lba,
                other_lba,
                first_usable,
                last_usable,
                disk_guid,
                entries_lba,
                num_entries,
                128,
                zlib.crc32(array),
            )
        )
        struct.pack_into("<I", header, 16, zlib.crc32(header))
        img[my_lba * sector_size : my_lba * sector_size + 92] = header
    protective = mbr_entry(0, 0xEE, 1, min(disk_sectors - 1, 0xFFFFFFFF))
    img[:SECTOR] = boot_record(protective)
    return img


def check_invariants(table: PartitionTable, disk_size: int) -> None:
    """What every successfully read table promises."""
    numbers = [p.number for p in table.partitions]
    assert numbers == sorted(set(numbers))
    for p in table.partitions:
        assert p.number >= 1 and p.length > 0
        assert 0 < p.offset and p.end <= disk_size
    containers = [p for p in table.partitions if p.is_extended and p.number <= 4]
    outer = [p for p in table.partitions if p.number <= 4 or table.scheme == "gpt"]
    inner = [p for p in table.partitions if table.scheme == "mbr" and p.number >= 5]
    for group in (outer, inner):
        spans = sorted((p.offset, p.end) for p in group)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
    for p in inner:
        assert any(c.offset < p.offset and p.end <= c.end for c in containers)


# -- fixtures: images made by sfdisk --------------------------------------------------------

MBR_SCRIPT = """label: dos
label-id: 0x12345678
start=2048, size=4096, type=83, bootable
size=2048, type=82
size=8192, type=c
type=5
size=1024, type=83
size=3072, type=8e
type=83
"""

GPT_NAMES = {
    1: "EFI system",
    2: "boot",
    3: "root",
    4: "swap",
    5: "home",
    6: "var",
    7: "naïve ünïcode",
    10: "data beyond a hole",
}

GPT_SCRIPT = "label: gpt\nfirst-lba: 34\n" + "".join(
    f'disk.img{n} : size=64, type={"S" if n == 4 else "L"}, name="{name}"\n'
    for n, name in GPT_NAMES.items()
)


@pytest.fixture(scope="module")
def mbr_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Any]:
    return make_image(tmp_path_factory.mktemp("mbr"), "disk.img", 32 * 1024 * 1024, MBR_SCRIPT)


@pytest.fixture(scope="module")
def gpt_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Any]:
    return make_image(tmp_path_factory.mktemp("gpt"), "disk.img", 1024 * 1024, GPT_SCRIPT)


@pytest.fixture(scope="module")
def small_mbr_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Any]:
    script = "label: dos\n,16,L,*\n,16,S\n,8\n,,E\n,8\n,8\n,\n"
    return make_image(tmp_path_factory.mktemp("smbr"), "small.img", 64 * 1024, script)


@pytest.fixture(scope="module")
def small_gpt_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Any]:
    script = (
        'label: gpt\nfirst-lba: 34\nsize=8, name="a"\nsize=8, type=S, name="b"\n'
        "small.img5 : size=8\n"
    )
    return make_image(tmp_path_factory.mktemp("sgpt"), "small.img", 64 * 1024, script)


# -- MBR ------------------------------------------------------------------------------------


async def test_mbr_primaries_extended_and_logicals_match_sfdisk(
    mbr_image: tuple[bytes, Any],
) -> None:
    img, expected = mbr_image
    table = await read(img)
    assert table.scheme == "mbr"
    assert table.sector_size == 512
    assert table.disk_id == "0x12345678"
    assert table.gpt_header is None
    assert len(expected["partitions"]) == 7
    got = {p.number: p for p in table.partitions}
    assert sorted(got) == [1, 2, 3, 4, 5, 6, 7]
    for want in expected["partitions"]:
        p = got[sfdisk_number(expected, want["node"])]
        assert p.offset == want["start"] * SECTOR
        assert p.length == want["size"] * SECTOR
        assert int(p.type, 16) == int(want["type"], 16)
        assert p.bootable == want.get("bootable", False)
        assert p.name is None and p.uuid is None
    assert [p.number for p in table.partitions if p.is_extended] == [4]
    assert got[1].type == "0x83" and got[3].type == "0x0c" and got[4].type == "0x05"
    check_invariants(table, len(img))


async def test_mbr_get_names_the_partitions_that_exist(mbr_image: tuple[bytes, Any]) -> None:
    table = await read(mbr_image[0])
    assert table.get(6).type == "0x8e"
    with pytest.raises(
        FormatError, match=r"^partition 8 not found \(table has: 1, 2, 3, 4, 5, 6, 7\)$"
    ):
        table.get(8)
    with pytest.raises(FormatError, match="partition numbers start at 1"):
        table.get(0)


async def test_mbr_read_through_a_file_pread(tmp_path: Path) -> None:
    script = "label: dos\nstart=2048, size=1024\nsize=2048\n"
    img, expected = await trio.to_thread.run_sync(
        make_image, tmp_path, "f.img", 4 * 1024 * 1024, script
    )
    async with await trio.open_file(tmp_path / "f.img", "rb") as f:

        async def pread(offset: int, length: int) -> bytes:
            await f.seek(offset)
            return await f.read(length)

        table = await read_partition_table(pread, len(img))
    assert [(p.number, p.offset, p.length) for p in table.partitions] == [
        (1, 2048 * SECTOR, 1024 * SECTOR),
        (2, 3072 * SECTOR, 2048 * SECTOR),
    ]
    assert [p.offset // SECTOR for p in table.partitions] == [
        want["start"] for want in expected["partitions"]
    ]


async def test_mbr_zero_length_and_type_zero_entries_are_unused() -> None:
    img = raw_disk(
        100,
        {
            0: boot_record(
                mbr_entry(0, 0x83, 10, 0),  # zero length
                mbr_entry(0, 0x00, 10, 10),  # type 0 = empty slot
                mbr_entry(0x80, 0x83, 20, 10),
            )
        },
    )
    table = await read(img)
    assert table.partitions == (Partition(3, 20 * SECTOR, 10 * SECTOR, "0x83", bootable=True),)
    with pytest.raises(FormatError, match=r"partition 1 not found \(table has: 3\)"):
        table.get(1)


async def test_mbr_overlapping_primaries_rejected() -> None:
    img = raw_disk(100, {0: boot_record(mbr_entry(0, 0x83, 1, 50), mbr_entry(0, 0x83, 40, 20))})
    with pytest.raises(
        FormatError, match=r"MBR partition 2 \(sectors 40\.\.59\) overlaps partition 1"
    ):
        await read(img)


async def test_mbr_partition_over_the_mbr_rejected() -> None:
    img = raw_disk(100, {0: boot_record(mbr_entry(0, 0x83, 0, 50))})
    with pytest.raises(FormatError, match="overlaps the MBR at sector 0"):
        await read(img)


async def test_mbr_partition_beyond_the_disk_rejected() -> None:
    img = raw_disk(100, {0: boot_record(mbr_entry(0, 0x83, 1, 50), mbr_entry(0, 0x07, 60, 41))})
    with pytest.raises(
        FormatError,
        match=r"MBR partition 2 \(sectors 60\.\.100\) extends beyond the end of the disk",
    ):
        await read(img)


async def test_mbr_logical_outside_the_extended_partition_rejected() -> None:
    img = raw_disk(
        200,
        {
            0: boot_record(mbr_entry(0, 0x05, 100, 50)),
            100: boot_record(mbr_entry(0, 0x83, 1, 60)),  # ends at 160 > 149
        },
    )
    with pytest.raises(FormatError, match=r"MBR partition 5 \(sectors 101\.\.160\) lies outside"):
        await read(img)


async def test_mbr_overlapping_logicals_rejected() -> None:
    img = raw_disk(
        200,
        {
            0: boot_record(mbr_entry(0, 0x0F, 100, 100)),
            100: boot_record(mbr_entry(0, 0x83, 1, 30), mbr_entry(0, 0x05, 20, 30)),
            120: boot_record(mbr_entry(0, 0x83, 1, 10)),  # EBR 120 sits inside partition 5
        },
    )
    with pytest.raises(FormatError, match="overlaps partition 5"):
        await read(img)


async def test_mbr_ebr_loop_rejected() -> None:
    img = raw_disk(
        200,
        {
            0: boot_record(mbr_entry(0, 0x05, 100, 100)),
            100: boot_record(mbr_entry(0, 0x83, 1, 10), mbr_entry(0, 0x05, 20, 20)),
            120: boot_record(mbr_entry(0, 0x83, 1, 10), mbr_entry(0, 0x05, 0, 20)),  # back
        },
    )
    with pytest.raises(FormatError, match="loops back to the EBR at sector 100"):
        await read(img)


def logical_chain(count: int) -> bytearray:
    """An extended partition at sector 1 holding ``count`` 1-sector logical partitions."""
    records = {0: boot_record(mbr_entry(0, 0x85, 1, 2 * count))}
    for k in range(count):
        link = mbr_entry(0, 0x05, 2 * (k + 1), 2) if k + 1 < count else b""
        records[1 + 2 * k] = boot_record(mbr_entry(0, 0x83, 1, 1), link)
    return raw_disk(2 * count + 1, records)


async def test_mbr_logical_partition_limit() -> None:
    table = await read(logical_chain(MAX_LOGICAL_PARTITIONS))
    assert [p.number for p in table.partitions][-1] == 4 + MAX_LOGICAL_PARTITIONS
    assert table.get(5).offset == 2 * SECTOR
    with pytest.raises(FormatError, match=f"more than {MAX_LOGICAL_PARTITIONS} logical"):
        await read(logical_chain(MAX_LOGICAL_PARTITIONS + 1))


async def test_mbr_empty_ebr_takes_a_number_like_nbdkit() -> None:
    img = raw_disk(
        200,
        {
            0: boot_record(mbr_entry(0, 0x05, 100, 100)),
            100: boot_record(b"\0" * 16, mbr_entry(0, 0x05, 20, 20)),
            120: boot_record(mbr_entry(0, 0x83, 1, 10)),
        },
    )
    table = await read(img)
    assert [p.number for p in table.partitions] == [1, 6]
    assert table.get(6).offset == 121 * SECTOR


async def test_mbr_ebr_without_signature_rejected() -> None:
    img = raw_disk(200, {0: boot_record(mbr_entry(0, 0x05, 100, 100))})
    with pytest.raises(FormatError, match="EBR of partition 5 at sector 100 has no 0x55AA"):
        await read(img)


async def test_mbr_two_extended_partitions_rejected() -> None:
    img = raw_disk(200, {0: boot_record(mbr_entry(0, 0x05, 10, 10), mbr_entry(0, 0x0F, 30, 10))})
    with pytest.raises(FormatError, match=r"2 extended partitions \(1 and 2\)"):
        await read(img)


# -- no table -------------------------------------------------------------------------------


async def test_short_pread_is_a_format_error() -> None:
    disk = raw_disk(100, {0: boot_record(mbr_entry(0, 0x83, 1, 10))})

    async def short(offset: int, length: int) -> bytes:
        return bytes(disk[offset : offset + length - 1])

    match = r"^short read of the MBR at sector 0: asked for 512 bytes at offset 0, got 511$"
    with pytest.raises(FormatError, match=match):
        await read_partition_table(short, len(disk))


@pytest.mark.parametrize("size", [0, 100, 512, 1024 * 1024])
async def test_blank_disk_has_no_table(size: int) -> None:
    with pytest.raises(FormatError, match=r"^no MBR or GPT partition table found"):
        await read(bytes(size))


async def test_fat_boot_sector_is_not_an_mbr() -> None:
    sector = bytearray(boot_record())
    sector[446] = 0x29  # boot code / BPB bytes where an MBR has its boot indicator
    with pytest.raises(FormatError, match=r"no MBR or GPT .* boot indicator 0x29"):
        await read(sector + bytes(SECTOR))


async def test_gpt_header_without_protective_mbr(gpt_image: tuple[bytes, Any]) -> None:
    img = bytearray(gpt_image[0])
    img[510:512] = b"\0\0"
    with pytest.raises(FormatError, match="GPT header is at LBA 1, but there is no protective"):
        await read(img)


# -- GPT ------------------------------------------------------------------------------------


async def test_gpt_named_partitions_match_sfdisk(gpt_image: tuple[bytes, Any]) -> None:
    img, expected = gpt_image
    table = await read(img)
    assert table.scheme == "gpt"
    assert table.gpt_header == "primary"
    assert table.sector_size == 512
    assert table.disk_id == expected["id"]
    assert len(table.partitions) == 8 == len(expected["partitions"])
    got = {p.number: p for p in table.partitions}
    for want in expected["partitions"]:
        p = got[sfdisk_number(expected, want["node"])]
        assert p.offset == want["start"] * SECTOR
        assert p.length == want["size"] * SECTOR
        assert p.type == want["type"]
        assert p.uuid == want["uuid"]
        assert p.name == want["name"] == GPT_NAMES[p.number]
        assert not p.bootable and not p.is_extended
    assert sorted(got) == [1, 2, 3, 4, 5, 6, 7, 10]
    with pytest.raises(
        FormatError, match=r"partition 8 not found \(table has: 1, 2, 3, 4, 5, 6, 7, 10\)"
    ):
        table.get(8)
    check_invariants(table, len(img))


async def test_gpt_corrupt_primary_header_falls_back_to_backup(
    gpt_image: tuple[bytes, Any],
) -> None:
    img = bytearray(gpt_image[0])
    good = await read(img)
    img[SECTOR + 60] ^= 0xFF  # inside the disk GUID: only the CRC can tell
    table = await read(img)
    assert table.gpt_header == "backup"
    assert table.partitions == good.partitions
    assert table.disk_id == good.disk_id


async def test_gpt_corrupt_header_crc_in_both_headers_rejected(
    gpt_image: tuple[bytes, Any],
) -> None:
    img = bytearray(gpt_image[0])
    last = len(img) // SECTOR - 1
    img[SECTOR + 60] ^= 0xFF
    img[last * SECTOR + 60] ^= 0xFF
    with pytest.raises(FormatError) as info:
        await read(img)
    message = str(info.value)
    assert "primary header at LBA 1: header CRC32 mismatch" in message
    assert f"backup header at LBA {last}: header CRC32 mismatch" in message


async def test_gpt_corrupt_entry_array_detected(gpt_image: tuple[bytes, Any]) -> None:
    img = bytearray(gpt_image[0])
    last = len(img) // SECTOR - 1
    name_byte = gpt_entry_offset(img, 1, 2) + 56
    img[name_byte] ^= 0x01  # partition 3's name: "root" -> "soot"
    table = await read(img)
    assert table.gpt_header == "backup"
    assert table.get(3).name == "root"
    img[gpt_entry_offset(img, last, 2) + 56] ^= 0x01
    with pytest.raises(
        FormatError,
        match=r"entry array CRC32 mismatch.*; backup .*: partition entry array CRC32 mismatch",
    ):
        await read(img)


async def test_gpt_resealed_entry_edit_is_accepted(gpt_image: tuple[bytes, Any]) -> None:
    """The CRC test above is not vacuous: the same edit with fresh checksums reads fine."""
    img = bytearray(gpt_image[0])
    img[gpt_entry_offset(img, 1, 2) + 56] ^= 0x01
    reseal_gpt(img, 1)
    table = await read(img)
    assert table.gpt_header == "primary"
    assert table.get(3).name == "soot"


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"entry_size": 120}, "partition entry size 120 is not a multiple of 8"),
        ({"entry_size": 132}, "partition entry size 132"),
        ({"num_entries": MAX_GPT_ENTRIES + 1}, f"1..{MAX_GPT_ENTRIES}"),
        ({"num_entries": 0}, "number of partition entries 0"),
        ({"header_size": 91}, "header size 91 is not in 92..512"),
        ({"last_usable": 5000}, "usable LBAs 34..5000 are not within the disk"),
        ({"first_usable": 1}, "include the header"),
        ({"first_usable": 2}, "overlaps the usable LBAs"),
        ({"entries_lba": 2040}, "is not within the disk"),
        ({"my_lba": 7}, "header says it is at LBA 7"),
        ({"signature": b"EFI PARX"}, "no 'EFI PART' signature"),
    ],
)
async def test_gpt_insane_header_fields_rejected(
    gpt_image: tuple[bytes, Any], changes: dict[str, Any], error: str
) -> None:
    img = bytearray(gpt_image[0])
    last = len(img) // SECTOR - 1
    write_gpt_header(img, 1, **changes)  # CRC is right, so the field check must catch it
    table = await read(img)
    assert table.gpt_header == "backup"
    img[last * SECTOR : (last + 1) * SECTOR] = bytes(SECTOR)
    with pytest.raises(FormatError, match="primary header at LBA 1: [^;]*" + re.escape(error)):
        await read(img)


async def test_gpt_overlapping_partitions_rejected_without_fallback(
    gpt_image: tuple[bytes, Any],
) -> None:
    img = bytearray(gpt_image[0])
    entry = gpt_entry_offset(img, 1, 2)  # partition 3 starts at 162
    struct.pack_into("<Q", img, entry + 32, 150)
    reseal_gpt(img, 1)  # the backup stays intact, but a sealed table is taken at its word
    with pytest.raises(
        FormatError, match=r"GPT partition 3 \(sectors 150\.\.225\) overlaps partition 2"
    ):
        await read(img)


async def test_gpt_partition_outside_usable_range_rejected(gpt_image: tuple[bytes, Any]) -> None:
    img = bytearray(gpt_image[0])
    entry = gpt_entry_offset(img, 1, 9)  # partition 10
    struct.pack_into("<Q", img, entry + 40, len(img) // SECTOR + 10)
    reseal_gpt(img, 1)
    with pytest.raises(
        FormatError, match=r"GPT partition 10 \(LBAs \d+\.\.2058\) lies outside .* end of the disk"
    ):
        await read(img)


async def test_gpt_partition_ending_before_it_starts_rejected(gpt_image: tuple[bytes, Any]) -> None:
    img = bytearray(gpt_image[0])
    entry = gpt_entry_offset(img, 1, 0)
    struct.pack_into("<QQ", img, entry + 32, 90, 80)
    reseal_gpt(img, 1)
    with pytest.raises(FormatError, match=r"GPT partition 1 ends \(LBA 80\) before it starts"):
        await read(img)


async def test_gpt_protective_mbr_without_any_header_rejected() -> None:
    img = raw_disk(100, {0: boot_record(mbr_entry(0, 0xEE, 1, 99))})
    with pytest.raises(FormatError, match="protective MBR found, but no valid GPT header"):
        await read(img)


@pytest.mark.parametrize("size", [512, 700, 1024, 1500])
async def test_gpt_protective_mbr_on_a_tiny_disk_rejected(size: int) -> None:
    img = bytearray(size)
    img[:SECTOR] = boot_record(mbr_entry(0, 0xEE, 1, 99))
    with pytest.raises(
        FormatError,
        match=r"no valid GPT header: primary header at LBA 1: .*(too small|no room for a backup)",
    ):
        await read(img)


async def test_gpt_4k_sectors() -> None:
    img = build_gpt(256, 4096, [(0, 6, 100, "four-k"), (2, 101, 249, "last")])
    table = await read(img)
    assert table.sector_size == 4096
    assert [(p.number, p.offset, p.length, p.name) for p in table.partitions] == [
        (1, 6 * 4096, 95 * 4096, "four-k"),
        (3, 101 * 4096, 149 * 4096, "last"),
    ]


async def test_gpt_builder_agrees_with_sfdisk(tmp_path: Path) -> None:
    """The hand-made GPT used for the 4K test is one that sfdisk itself accepts."""
    img = build_gpt(2048, SECTOR, [(0, 34, 999, "x"), (4, 1000, 2014, "y")])
    path = tmp_path / "built.img"
    path.write_bytes(img)
    done = await trio.run_process(["sfdisk", "--json", str(path)], capture_stdout=True)
    dump = json.loads(done.stdout)["partitiontable"]
    table = await read(img)
    assert [(p["start"], p["size"], p["name"]) for p in dump["partitions"]] == [
        (p.offset // SECTOR, p.length // SECTOR, p.name) for p in table.partitions
    ]


# -- property tests -------------------------------------------------------------------------


@functools.cache
def mutation_offsets(img: bytes) -> list[int]:
    """Byte offsets worth mutating: MBR/EBR tables, GPT headers, non-empty GPT arrays."""
    offsets: list[int] = []
    for lba in range(len(img) // SECTOR):
        base = lba * SECTOR
        block = img[base : base + SECTOR]
        if block[510:512] == b"\x55\xaa":
            offsets.extend(range(base + 440, base + SECTOR))
        elif block[:8] == b"EFI PART":
            offsets.extend(range(base, base + 92))
        elif any(block):
            offsets.extend(range(base, base + SECTOR))
    return offsets


mutations = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255)), min_size=1, max_size=6
)


async def check_mutated(img: bytes, edits: list[tuple[int, int]], reseal: bool) -> None:
    offsets = mutation_offsets(img)
    data = bytearray(img)
    for where, value in edits:
        data[offsets[where % len(offsets)]] = value
    if reseal and data[SECTOR : SECTOR + 8] == b"EFI PART":
        header_size = struct.unpack_from("<I", data, SECTOR + 12)[0]
        if 92 <= header_size <= SECTOR:
            h = gpt_header(data, 1)
            start = h["entries_lba"] * SECTOR
            size = h["num_entries"] * h["entry_size"]
            if start + size <= len(data):
                reseal_gpt(data, 1)
    try:
        table = await read(data)
    except FormatError as exc:
        event(f"FormatError: {str(exc).split('(')[0][:60]}")
        return
    event(f"read {table.scheme} table, header {table.gpt_header}")
    check_invariants(table, len(data))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=mutations)
async def test_mutated_mbr_gives_format_error_or_valid_table(
    small_mbr_image: tuple[bytes, Any], edits: list[tuple[int, int]]
) -> None:
    await check_mutated(small_mbr_image[0], edits, reseal=False)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=mutations, reseal=st.booleans())
async def test_mutated_gpt_gives_format_error_or_valid_table(
    small_gpt_image: tuple[bytes, Any], edits: list[tuple[int, int]], reseal: bool
) -> None:
    await check_mutated(small_gpt_image[0], edits, reseal)
