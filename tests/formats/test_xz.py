"""Tests for trionbd.formats.xz against files written by xz(1): multi-block (-T0 and
--block-size), single-block, several streams, every check type, filter chains; random
reads; and damage to every structure giving a FormatError, never wrong bytes."""

from __future__ import annotations

import random
import shutil
import subprocess
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.formats.support import MemoryImage
from trionbd.formats import FormatError
from trionbd.formats.xz import XzReader, read_xz_index

pytestmark = pytest.mark.skipif(not shutil.which("xz"), reason="xz is needed")

KiB, MiB = 1 << 10, 1 << 20


def xz(data: bytes, *args: str) -> bytes:
    return subprocess.run(
        ["xz", "-c", "-1", *args], input=data, stdout=subprocess.PIPE, check=True
    ).stdout


@pytest.fixture(scope="module")
def data() -> bytes:
    rng = random.Random(4)
    parts = []
    for i in range(40):
        parts.append(rng.randbytes(20 * KiB) if i % 3 else b"line %d of text\n" % i * 3000)
    return b"".join(parts)


async def check(blob: bytes, data: bytes, max_depth: int = 8) -> XzReader:
    image = MemoryImage(blob)
    index = await read_xz_index(image.pread, len(blob))
    assert index.size == len(data)
    reader = XzReader(image.pread, index, max_depth=max_depth)
    assert await reader.read(0, len(data) + 1) == data
    rng = random.Random(len(blob))
    for _ in range(100):
        offset = rng.randrange(len(data))
        length = rng.choice((1, 4096, 200 * KiB))
        assert await reader.read(offset, length) == data[offset : offset + length]
    return reader


async def test_multi_block(data: bytes) -> None:
    reader = await check(xz(data, "--block-size=64KiB"), data, max_depth=2)
    assert len(reader.index.blocks) == -(-len(data) // (64 * KiB))
    assert reader.index.largest_block == 64 * KiB


async def test_threaded_xz_writes_blocks(data: bytes) -> None:
    big = data * 8  # -T0 -1 cuts blocks of 3 x 1 MiB (the preset's dictionary)
    reader = await check(xz(big, "-T2"), big)
    assert len(reader.index.blocks) > 1


async def test_single_block_is_reported(data: bytes) -> None:
    reader = await check(xz(data, "-T1"), data)
    assert len(reader.index.blocks) == 1 and reader.index.largest_block == len(data)


@pytest.mark.parametrize("check_type", ["none", "crc32", "crc64", "sha256"])
async def test_check_types_and_streams(data: bytes, check_type: str) -> None:
    first = xz(data[: 300 * KiB], f"--check={check_type}", "--block-size=100KiB")
    second = xz(data[300 * KiB :], "--x86", "--lzma2=preset=1", "--block-size=256KiB")
    empty = xz(b"")
    blob = first + bytes(8) + empty + second + bytes(4)  # padding between and after
    reader = await check(blob, data)
    assert reader.index.streams == 3


async def test_max_block_refuses_large_blocks(data: bytes) -> None:
    blob = xz(data, "-T1")
    index = await read_xz_index(MemoryImage(blob).pread, len(blob))
    with pytest.raises(FormatError, match="xz-max-block"):
        XzReader(MemoryImage(blob).pread, index, max_block=MiB)


def damage(blob: bytes, which: str) -> tuple[bytes, str]:
    b = bytearray(blob)
    end = len(b)
    if which == "footer magic":
        b[end - 1] ^= 1
        return bytes(b), "bad magic"
    if which == "footer crc":
        b[end - 12] ^= 1
        return bytes(b), f"stream footer at offset {end - 12}: CRC-32"
    if which == "backward size":
        b[end - 8] ^= 0x40
        b[end - 12 : end - 8] = zlib.crc32(bytes(b[end - 8 : end - 2])).to_bytes(4, "little")
        return bytes(b), "index"
    if which == "index crc":
        b[end - 13] ^= 1
        return bytes(b), "index at offset"
    if which == "header magic":
        b[0] ^= 1
        return bytes(b), "stream header at offset 0: bad magic"
    if which == "header flags":
        b[7] ^= 1
        return bytes(b), "stream header at offset 0"
    if which == "block data":
        b[200] ^= 0x55
        return bytes(b), "block at offset 12"
    if which == "truncated":
        return bytes(b[: end - 100]), "xz"
    if which == "padding":
        return bytes(b) + b"\0\0\0\1", "stream footer"
    raise AssertionError(which)


@pytest.mark.parametrize(
    "which",
    ["footer magic", "footer crc", "backward size", "index crc", "header magic",
     "header flags", "block data", "truncated", "padding"],
)  # fmt: skip
async def test_damage_is_a_clean_error(data: bytes, which: str) -> None:
    blob = xz(data, "--block-size=64KiB")
    bad, words = damage(blob, which)
    image = MemoryImage(bad)
    with pytest.raises(FormatError) as e:
        index = await read_xz_index(image.pread, len(bad))
        await XzReader(image.pread, index).read(0, index.size)
    assert words in str(e.value), str(e.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
async def test_any_single_damage_is_an_error_or_harmless(draw: st.DataObject) -> None:
    data = b"".join(b"%d " % i for i in range(20000))
    blob = bytearray(xz(data, "--block-size=16KiB"))
    kind = draw.draw(st.sampled_from(("byte", "truncate", "append")))
    if kind == "byte":
        blob[draw.draw(st.integers(0, len(blob) - 1))] = draw.draw(st.integers(0, 255))
    elif kind == "truncate":
        del blob[draw.draw(st.integers(0, len(blob) - 1)) :]
    else:
        blob += draw.draw(st.binary(min_size=1, max_size=16))
    image = MemoryImage(blob)
    try:
        index = await read_xz_index(image.pread, len(blob))
        got = await XzReader(image.pread, index).read(0, index.size + 1)
    except FormatError:
        return
    assert got == data
