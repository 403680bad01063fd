"""Tests for trionbd.formats.gzip (and the deflate checkpoints under it) against files
written by gzip(1) and pigz: every byte read back, random reads, the saved index, and
corruption of every structure giving a FormatError, never wrong bytes."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import zlib
from itertools import pairwise

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.formats.support import MemoryImage
from trionbd.formats import FormatError
from trionbd.formats.deflate import READ_CHUNK, DeflateStream
from trionbd.formats.gzip import GzipIndex, GzipReader, StaleIndex, index_gzip

pytestmark = pytest.mark.skipif(
    not (shutil.which("gzip") and shutil.which("pigz")), reason="gzip and pigz are needed"
)

KiB, MiB = 1 << 10, 1 << 20
INTERVAL = 64 * KiB  # small, so that a few MiB have many checkpoints


def sample(size: int, seed: int = 1) -> bytes:
    """Runs of random bytes (stored blocks), text (compressible) and zeros."""
    rng = random.Random(seed)
    parts: list[bytes] = []
    total = 0
    while total < size:
        kind = rng.randrange(3)
        n = rng.randrange(1, 200 * KiB)
        if kind == 0:
            part = rng.randbytes(n)
        elif kind == 1:
            words = [
                rng.choice((b"nbd", b"block", b"export", b"trio", b"\n")) for _ in range(n // 4)
            ]
            part = b" ".join(words)
        else:
            part = bytes(n)
        parts.append(part)
        total += len(part)
    return b"".join(parts)[:size]


def tool(args: list[str], data: bytes) -> bytes:
    return subprocess.run(args, input=data, stdout=subprocess.PIPE, check=True).stdout


def handmade_member(data: bytes) -> bytes:
    """A member with every optional header field (gzip(1) writes only FNAME): FEXTRA,
    FNAME, FCOMMENT and a header CRC."""
    head = b"\x1f\x8b\x08" + bytes([4 | 8 | 16 | 2]) + struct.pack("<I", 1700000000) + b"\x00\x03"
    head += struct.pack("<H", 6) + b"AB\x02\x00xy" + b"disk.img\0" + b"a comment\0"
    head += struct.pack("<H", zlib.crc32(head) & 0xFFFF)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = c.compress(data) + c.flush()
    return head + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


async def check_all(blob: bytes, data: bytes, *, interval: int = INTERVAL) -> GzipIndex:
    image = MemoryImage(blob)
    index = await index_gzip(image.pread, len(blob), interval=interval)
    assert index.size == len(data)
    reader = GzipReader(image.pread, index)
    assert await reader.read(0, len(data) + 10) == data
    rng = random.Random(len(data))
    for _ in range(60):
        offset = rng.randrange(len(data) + 1)
        length = rng.choice((1, 512, 4096, 70 * KiB, 300 * KiB))
        assert await reader.read(offset, length) == data[offset : offset + length], offset
    return index


@pytest.fixture(scope="module")
def data() -> bytes:
    return sample(3 * MiB)


async def test_gzip_single_member(data: bytes) -> None:
    blob = tool(["gzip", "-c", "-6"], data)
    index = await check_all(blob, data)
    assert len(index.members) == 1
    assert index.checkpoints >= len(data) // INTERVAL // 2  # block ends are ~16-100 KiB apart


async def test_pigz_and_concatenated_members(data: bytes) -> None:
    parts = [data[:MiB], b"", data[MiB : 2 * MiB], data[2 * MiB :]]
    blob = (
        tool(["pigz", "-c", "-p", "2", "-b", "128"], parts[0])
        + tool(["gzip", "-c"], parts[1])
        + tool(["gzip", "-c", "-1"], parts[2])
        + handmade_member(parts[3])
    )
    index = await check_all(blob, data)
    assert [m.stream.size for m in index.members] == [len(p) for p in parts]
    assert index.members[3].name == "disk.img" and index.members[3].mtime == 1700000000


async def test_reads_inflate_at_most_one_interval(data: bytes) -> None:
    """Checkpoints sit at the first block end after each interval: between two of them
    lies one interval plus at most one deflate block (zlib's blocks hold at most 16 Ki
    symbols, under 64 KiB of input), and a 4 KiB read reads no more than that."""
    blob = tool(["gzip", "-c", "-9"], data)
    image = MemoryImage(blob)
    index = await index_gzip(image.pread, len(blob), interval=INTERVAL)
    points = index.members[0].stream.checkpoints
    assert all(b.out - a.out >= INTERVAL for a, b in pairwise(points))
    assert all(b.inp - a.inp <= INTERVAL + 64 * KiB for a, b in pairwise(points))
    reader = GzipReader(image.pread, index)
    for offset in (len(data) - 4096, len(data) // 2, 12345):
        image.reads.clear()
        assert await reader.read(offset, 4096) == data[offset : offset + 4096]
        assert sum(n for _, n in image.reads) <= INTERVAL + 64 * KiB + READ_CHUNK


async def test_concurrent_reads_inflate_each_interval_once(data: bytes) -> None:
    """Many tasks reading in sequence at once (as nbdcopy's 64 requests in flight do):
    with a lock, tasks wanting the same interval wait for one inflation of it, so the
    compressed bytes are read exactly once; every task gets its bytes."""
    blob = tool(["gzip", "-c"], data)
    image = MemoryImage(blob)
    index = await index_gzip(image.pread, len(blob), interval=INTERVAL)
    depth = index.checkpoints  # nothing is evicted: a second inflation would be a waste
    reader = GzipReader(image.pread, index, offload=trio.to_thread.run_sync, lock=trio.Lock,
                        depth=depth)  # fmt: skip
    image.reads.clear()
    got: dict[int, bytes] = {}

    async def read(offset: int) -> None:
        got[offset] = await reader.read(offset, 24 * KiB)

    async with trio.open_nursery() as nursery:
        for offset in range(0, len(data), 24 * KiB):
            nursery.start_soon(read, offset)
    assert b"".join(got[k] for k in sorted(got)) == data
    stream = index.members[0].stream
    ends = [p.inp for p in stream.checkpoints[1:]] + [stream.end]
    assert sorted(image.reads) == [
        (p.inp, e - p.inp) for p, e in zip(stream.checkpoints, ends, strict=True)
    ]


async def test_a_changed_input_is_an_error_not_wrong_bytes(data: bytes) -> None:
    blob = tool(["gzip", "-c"], data)
    image = MemoryImage(blob)
    index = await index_gzip(image.pread, len(blob), interval=INTERVAL)
    middle = len(blob) // 2
    image.data[middle : middle + 64] = bytes(64)
    with pytest.raises(FormatError, match="input changed"):
        await GzipReader(image.pread, index).read(0, len(data))


async def test_index_saved_and_loaded(data: bytes) -> None:
    blob = tool(["gzip", "-c"], data) + tool(["gzip", "-c"], data[:1000])
    image = MemoryImage(blob)
    index = await index_gzip(image.pread, len(blob), interval=INTERVAL)
    saved = index.to_bytes(b"dev:ino:mtime")
    loaded = GzipIndex.from_bytes(saved, len(blob), b"dev:ino:mtime")
    assert loaded == index
    reader = GzipReader(image.pread, loaded)
    assert await reader.read(0, index.size) == data + data[:1000]
    with pytest.raises(StaleIndex):
        GzipIndex.from_bytes(saved, len(blob) + 1, b"dev:ino:mtime")
    with pytest.raises(StaleIndex):
        GzipIndex.from_bytes(saved, len(blob), b"dev:ino:other")
    for damage in (saved[:-1], saved[:40], b"x" + saved[1:], saved[:100] + b"?" + saved[101:]):
        with pytest.raises(FormatError) as e:
            GzipIndex.from_bytes(damage, len(blob), b"dev:ino:mtime")
        assert not isinstance(e.value, StaleIndex)


async def test_progress_reaches_the_end(data: bytes) -> None:
    blob = tool(["gzip", "-c"], data)
    seen: list[int] = []
    await index_gzip(MemoryImage(blob).pread, len(blob), progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == len(blob) and len(seen) > 1


async def test_zero_padding_is_ignored(data: bytes) -> None:
    blob = tool(["gzip", "-c"], data[:5000]) + bytes(3000)
    await check_all(blob, data[:5000])


def mutations(blob: bytes, member: int, data_start: int, end: int) -> list[tuple[str, bytes, str]]:
    """(what, damaged copy, expected words in the error) for each structure of the member
    at ``member`` whose deflate data spans ``[data_start, end)``."""

    def put(pos: int, value: bytes) -> bytes:
        return blob[:pos] + value + blob[pos + len(value) :]

    def flip(pos: int) -> bytes:
        return put(pos, bytes([blob[pos] ^ 0x5A]))

    mid = (data_start + end) // 2
    return [
        ("magic", flip(member), f"garbage at offset {member}"),
        ("method", put(member + 2, b"\x07"), "compression method"),
        ("reserved flags", put(member + 3, bytes([blob[member + 3] | 0x80])), "reserved"),
        ("header truncated", blob[: member + 5], "truncated"),
        ("deflate data", flip(mid), f"gzip member at offset {member}"),
        ("deflate truncated", blob[:mid], "truncated"),
        ("trailer truncated", blob[: end + 5], "trailer"),
        ("crc", flip(end), "CRC-32 mismatch"),
        ("size", flip(end + 4), "size mismatch"),
        ("garbage after", blob + b"GARBAGE", "trailing garbage"),
        ("empty", b"", "empty"),
    ]


@pytest.mark.parametrize("which", range(11))
async def test_corruption_is_a_clean_error(data: bytes, which: int) -> None:
    first = tool(["gzip", "-c"], data[: 400 * KiB])
    blob = first + tool(["gzip", "-c", "-n"], data[400 * KiB : 900 * KiB])
    second = len(first)
    image = MemoryImage(blob)
    index = await index_gzip(image.pread, len(blob))
    stream = index.members[1].stream
    what, damaged, words = mutations(blob, second, stream.start, stream.end)[which]
    with pytest.raises(FormatError) as e:
        await index_gzip(MemoryImage(damaged).pread, len(damaged))
    assert words in str(e.value), (what, str(e.value))


async def test_header_crc_checked() -> None:
    blob = bytearray(handmade_member(b"hello" * 1000))
    blob[30] ^= 1  # inside the comment: only the header CRC can tell
    with pytest.raises(FormatError, match="header CRC"):
        await index_gzip(MemoryImage(blob).pread, len(blob))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
async def test_any_single_damage_is_an_error_or_harmless(draw: st.DataObject) -> None:
    """Overwrite, truncate or extend anywhere: FormatError, or every byte as it was
    (the damage hit a field nobody checks, as the mtime or the name)."""
    data = sample(150 * KiB, seed=7)
    blob = bytearray(
        tool(["gzip", "-c"], data[: 100 * KiB]) + tool(["pigz", "-c"], data[100 * KiB :])
    )
    kind = draw.draw(st.sampled_from(("byte", "truncate", "append")))
    if kind == "byte":
        pos = draw.draw(st.integers(0, len(blob) - 1))
        blob[pos] = draw.draw(st.integers(0, 255))
    elif kind == "truncate":
        del blob[draw.draw(st.integers(0, len(blob) - 1)) :]
    else:
        blob += draw.draw(st.binary(min_size=1, max_size=64))
    image = MemoryImage(blob)
    try:
        index = await index_gzip(image.pread, len(blob), interval=16 * KiB)
    except FormatError:
        return
    assert await GzipReader(image.pread, index).read(0, len(data) + 1) == data


def test_window_checkpoint_serialization_refuses_nonsense() -> None:
    with pytest.raises(FormatError):
        DeflateStream.from_bytes(b"\0" * 10)
    bogus = DeflateStream(0, 10, 5, 0, ()).to_bytes()  # no checkpoint at 0
    with pytest.raises(FormatError):
        DeflateStream.from_bytes(bogus)
