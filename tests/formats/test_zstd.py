"""Tests for trionbd.formats.zstd: seekable files written by pyzstd's SeekableZstdFile
(the zstd command of Debian 1.5.4 cannot write the seekable format), plain files written
by the zstd command, random reads, and damage giving a FormatError, never wrong bytes."""

from __future__ import annotations

import io
import random
import shutil
import struct
import subprocess

import pytest
import pyzstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.formats.support import MemoryImage
from trionbd.formats import FormatError
from trionbd.formats.zstd import ZstdReader, decompress_all, read_zstd_index

KiB = 1 << 10


@pytest.fixture(scope="module")
def data() -> bytes:
    rng = random.Random(8)
    return b"".join(
        rng.randbytes(30 * KiB) if i % 2 else b"zstd line %d\n" % i * 2000 for i in range(30)
    )


def seekable(data: bytes, frame: int = 64 * KiB, checksum: bool = False) -> bytes:
    out = io.BytesIO()
    option: dict[int, int] | None = {pyzstd.CParameter.checksumFlag: 1} if checksum else None
    with pyzstd.SeekableZstdFile(
        out, "w", level_or_option=option, max_frame_content_size=frame
    ) as f:
        f.write(data)
    return out.getvalue()


def zstd_tool(data: bytes) -> bytes:
    return subprocess.run(
        ["zstd", "-q", "-c", "-3"], input=data, stdout=subprocess.PIPE, check=True
    ).stdout


async def test_seekable_random_reads(data: bytes) -> None:
    blob = seekable(data, checksum=True)
    image = MemoryImage(blob)
    index = await read_zstd_index(image.pread, len(blob))
    assert index is not None and index.size == len(data)
    assert len(index.frames) == -(-len(data) // (64 * KiB))
    reader = ZstdReader(image.pread, index, max_depth=2)
    assert await reader.read(0, len(data) + 1) == data
    rng = random.Random(2)
    for _ in range(100):
        offset = rng.randrange(len(data))
        length = rng.choice((1, 4096, 150 * KiB))
        assert await reader.read(offset, length) == data[offset : offset + length]
    with pytest.raises(FormatError, match="limit"):
        ZstdReader(image.pread, index, max_frame=KiB)


@pytest.mark.skipif(not shutil.which("zstd"), reason="zstd is needed")
async def test_plain_files_are_decompressed_once(data: bytes) -> None:
    for blob in (zstd_tool(data), zstd_tool(data[:100_000]) + zstd_tool(data[100_000:])):
        image = MemoryImage(blob)
        assert await read_zstd_index(image.pread, len(blob)) is None
        out: list[bytes] = []
        seen: list[int] = []
        total = await decompress_all(image.pread, len(blob), out.append, progress=seen.append)
        assert total == len(data) and b"".join(out) == data and seen[-1] == len(blob)
        with pytest.raises(FormatError, match="truncated"):
            await decompress_all(image.pread, len(blob) - 7, out.append)


def damage(blob: bytes, which: str) -> tuple[bytes, str]:
    b = bytearray(blob)
    end = len(b)
    count = struct.unpack_from("<I", b, end - 9)[0]
    table = end - 9 - count * 8 - 8
    if which == "descriptor":
        b[end - 5] |= 0x10
        return bytes(b), "reserved descriptor"
    if which == "count":
        struct.pack_into("<I", b, end - 9, count + 1)
        return bytes(b), "seek table"
    if which == "compressed size":
        struct.pack_into("<I", b, table + 8, struct.unpack_from("<I", b, table + 8)[0] + 1)
        return bytes(b), "frames hold"
    if which == "decompressed size":
        struct.pack_into("<I", b, table + 12, struct.unpack_from("<I", b, table + 12)[0] - 1)
        return bytes(b), "frame at offset 0"
    if which == "frame data":
        b[table // 2] ^= 0x55
        return bytes(b), "zstd: frame at offset"
    if which == "magic":
        b[0] ^= 1
        return bytes(b), "not a zstd file"
    raise AssertionError(which)


@pytest.mark.parametrize(
    "which",
    ["descriptor", "count", "compressed size", "decompressed size", "frame data", "magic"],
)
async def test_damage_is_a_clean_error(data: bytes, which: str) -> None:
    bad, words = damage(seekable(data, checksum=True), which)
    image = MemoryImage(bad)
    with pytest.raises(FormatError) as e:
        index = await read_zstd_index(image.pread, len(bad))
        assert index is not None
        await ZstdReader(image.pread, index).read(0, index.size)
    assert words in str(e.value), str(e.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
async def test_any_single_damage_is_an_error_or_harmless(draw: st.DataObject) -> None:
    data = b"".join(b"%d," % i for i in range(30000))
    blob = bytearray(seekable(data, frame=16 * KiB, checksum=True))
    kind = draw.draw(st.sampled_from(("byte", "truncate", "append")))
    if kind == "byte":
        blob[draw.draw(st.integers(0, len(blob) - 1))] = draw.draw(st.integers(0, 255))
    elif kind == "truncate":
        del blob[draw.draw(st.integers(0, len(blob) - 1)) :]
    else:
        blob += draw.draw(st.binary(min_size=1, max_size=16))
    image = MemoryImage(blob)
    try:
        index = await read_zstd_index(image.pread, len(blob))
        if index is None:
            out: list[bytes] = []
            await decompress_all(image.pread, len(blob), out.append)
            got = b"".join(out)
        else:
            got = await ZstdReader(image.pread, index).read(0, index.size + 1)
    except FormatError:
        return
    assert got == data
