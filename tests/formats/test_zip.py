"""Tests for trionbd.formats.zip against archives written by Info-ZIP's zip: every
member read back, random reads, ZIP64, data descriptors, names, members it cannot read,
and corruption of every structure giving a FormatError, never wrong bytes."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.formats.support import MemoryImage, write
from trionbd.formats import FormatError, Pread
from trionbd.formats.zip import (
    DEFLATED,
    STORED,
    ZipIndex,
    ZipMember,
    member_data_offset,
    open_deflated,
    read_zip,
    verify_stored,
)

pytestmark = pytest.mark.skipif(not shutil.which("zip"), reason="zip is needed")

KiB, MiB = 1 << 10, 1 << 20


def make_tree(root: Path) -> dict[str, bytes]:
    rng = random.Random(3)
    files = {
        "random.bin": rng.randbytes(MiB + 123),
        "text/numbers.txt": b"".join(b"%d\n" % i for i in range(200_000)),
        "text/ünï cödé.txt": "grüße\n".encode(),
        "empty": b"",
        "deep/a/b/c/zeros.img": bytes(700 * KiB),
    }
    for name, data in files.items():
        write(root / name, data)
    (root / "emptydir").mkdir()
    return files


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("tree")
    return root, make_tree(root)


def run(command: list[str] | str, cwd: Path) -> bytes:
    """Run a tool (a shell pipeline when ``command`` is a string); its standard output."""
    return subprocess.run(
        command, shell=isinstance(command, str), cwd=cwd, check=True, stdout=subprocess.PIPE
    ).stdout


def zip_tree(root: Path, out: Path, *args: str) -> bytes:
    run(["zip", "-q", "-r", *args, str(out), "."], root)
    return out.read_bytes()


async def member_bytes(pread: Pread, index: ZipIndex, member: ZipMember) -> bytes:
    if member.method == STORED:
        start = await verify_stored(pread, index, member)
        return await pread(start, member.size) if member.size else b""
    reader = await open_deflated(pread, index, member, interval=64 * KiB)
    return await reader.read(0, member.size + 1)


async def check_members(blob: bytes, files: dict[str, bytes]) -> ZipIndex:
    image = MemoryImage(blob)
    index = await read_zip(image.pread, len(blob))
    assert sorted(m.name for m in index.members) == sorted(files)
    for member in index.members:
        assert member.unsupported is None
        assert member.size == len(files[member.name])
        assert await member_bytes(image.pread, index, member) == files[member.name], member
    return index


@pytest.mark.parametrize(
    ("args", "method"),
    [((), DEFLATED), (("-0",), STORED), (("-9",), DEFLATED), (("-fz",), DEFLATED)],
    ids=["deflated", "stored", "best", "forced-zip64"],
)
async def test_members_read_back(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path, args: tuple[str, ...], method: int
) -> None:
    root, files = tree
    index = await check_members(zip_tree(root, tmp_path / "a.zip", *args), files)
    assert index.lookup("random.bin") is not None
    assert index.lookup("random.bin").method == method  # type: ignore[union-attr]
    assert index.lookup("emptydir/") is None  # directories are not members


async def test_data_descriptors(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    """zip writing to a pipe cannot seek back: sizes and CRCs follow the data."""
    root, files = tree
    zipped = run("zip -q -r - . | cat", root)
    index = await read_zip(MemoryImage(zipped).pread, len(zipped))
    member = index.lookup("random.bin")
    assert member is not None
    assert struct.unpack_from("<H", zipped, member.header_offset + 6)[0] & 8  # flag bit 3
    await check_members(zipped, files)


async def test_random_reads_in_a_deflated_member(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, files = tree
    blob = zip_tree(root, tmp_path / "a.zip")
    image = MemoryImage(blob)
    index = await read_zip(image.pread, len(blob))
    member = index.lookup("text/numbers.txt")
    assert member is not None and member.method == DEFLATED
    reader = await open_deflated(image.pread, index, member, interval=32 * KiB)
    data = files["text/numbers.txt"]
    rng = random.Random(5)
    for _ in range(200):
        offset = rng.randrange(len(data))
        length = rng.choice((1, 4096, 100 * KiB))
        assert await reader.read(offset, length) == data[offset : offset + length]


async def test_unreadable_members_are_listed_with_a_reason(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, _files = tree
    blob = zip_tree(root, tmp_path / "e.zip", "-e", "-P", "secret")
    index = await read_zip(MemoryImage(blob).pread, len(blob))
    assert {m.unsupported for m in index.members} == {"encrypted"}
    with pytest.raises(FormatError, match="encrypted"):
        await member_data_offset(MemoryImage(blob).pread, index, index.members[0])
    blob = zip_tree(root, tmp_path / "b.zip", "-Z", "bzip2")
    index = await read_zip(MemoryImage(blob).pread, len(blob))
    reasons = {m.name: m.unsupported for m in index.members}
    assert reasons["random.bin"] == "compressed with bzip2"


async def test_more_than_65535_entries(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(70_000):
        (root / f"f{i:05d}").write_bytes(b"%d" % i)
    blob = zip_tree(root, tmp_path / "many.zip", "-0")
    image = MemoryImage(blob)
    index = await read_zip(image.pread, len(blob))
    assert len(index.members) == 70_000
    for i in (0, 65_535, 65_536, 69_999):
        member = index.lookup(f"f{i:05d}")
        assert member is not None
        assert await member_bytes(image.pread, index, member) == b"%d" % i


@pytest.mark.slow
async def test_member_past_4_gib(tmp_path: Path) -> None:
    """A 4.1 GiB member (sparse zeros, so the archive stays small) needs ZIP64 sizes."""
    big = tmp_path / "big.img"
    size = (4 << 30) + 100 * MiB + 17
    with big.open("wb") as f:
        f.truncate(size)
        f.seek(size - 5)
        f.write(b"tail!")
    run(["zip", "-q", "-1", "big.zip", "big.img"], tmp_path)
    big.unlink()
    fd = os.open(tmp_path / "big.zip", os.O_RDONLY)
    try:

        async def pread(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        archive = os.fstat(fd).st_size
        index = await read_zip(pread, archive)
        (member,) = index.members
        assert member.size == size
        reader = await open_deflated(pread, index, member)
        assert await reader.read(size - 4096, 4096) == bytes(4091) + b"tail!"
        assert await reader.read(1 << 32, 4096) == bytes(4096)
    finally:
        os.close(fd)


async def test_data_in_front_and_cp437_names(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """A self-extractor stub shifts every offset; an archive made on MS-DOS has CP437
    names (patched in: zip on Linux writes the file system's bytes)."""
    root, files = tree
    blob = bytearray(b"#!/bin/sh\necho stub\nexit 0\n" + zip_tree(root, tmp_path / "a.zip", "-0"))
    await check_members(bytes(blob), files)
    raw = "text/ünï cödé.txt".encode()
    dos = "text/ÅÇÉ.txt".encode("cp437").ljust(len(raw), b"_")
    pos = 0
    while (pos := blob.find(raw, pos)) >= 0:
        blob[pos : pos + len(raw)] = dos
        central = pos - 46
        if blob[central : central + 4] == b"PK\x01\x02":
            blob[central + 5] = 0  # version made by: MS-DOS
        pos += len(raw)
    index = await read_zip(MemoryImage(blob).pread, len(blob))
    assert index.lookup("text/ÅÇÉ.txt" + "_" * (len(raw) - len(dos.rstrip(b"_")))) is not None


def damaged(blob: bytes, which: str, index: ZipIndex) -> tuple[bytes, str]:
    """The archive with one structure damaged, and words the error must contain."""
    b = bytearray(blob)
    eocd = blob.rfind(b"PK\x05\x06")
    cd = index.data_end
    member = index.lookup("text/numbers.txt")
    assert member is not None
    lho = member.header_offset
    if which == "eocd signature":
        b[eocd] ^= 0xFF
        return bytes(b), "no end of central directory"
    if which == "truncated":
        return blob[: len(blob) // 2], "no end of central directory"
    if which == "entry count":
        struct.pack_into("<HH", b, eocd + 8, 9, 9)
        return bytes(b), "central directory"
    if which == "cd size":
        struct.pack_into("<I", b, eocd + 12, struct.unpack_from("<I", b, eocd + 12)[0] + 4)
        return bytes(b), "central directory"
    if which == "cd offset":
        struct.pack_into("<I", b, eocd + 16, len(blob) * 2)
        return bytes(b), "run past"
    if which == "entry signature":
        b[cd] ^= 0xFF
        return bytes(b), f"central directory entry 0 at offset {cd}: bad signature"
    if which == "name length":
        struct.pack_into("<H", b, cd + 28, 60000)
        return bytes(b), "central directory"
    if which == "local signature":
        b[lho] ^= 0xFF
        return bytes(b), f"local header of 'text/numbers.txt' at offset {lho}: bad signature"
    if which == "local method":
        struct.pack_into("<H", b, lho + 8, 0)
        return bytes(b), "method 0"
    if which == "deflate data":
        b[lho + 100] ^= 0x55
        return bytes(b), "text/numbers.txt"
    if which == "crc":
        pos = blob.find(b"PK\x01\x02", cd)
        while blob[pos + 46 : pos + 46 + 16] != b"text/numbers.txt":
            pos = blob.find(b"PK\x01\x02", pos + 4)
        b[pos + 16] ^= 1
        return bytes(b), "CRC-32 mismatch"
    raise AssertionError(which)


DAMAGE = ["eocd signature", "truncated", "entry count", "cd size", "cd offset",
          "entry signature", "name length", "local signature", "local method",
          "deflate data", "crc"]  # fmt: skip


@pytest.mark.parametrize("which", DAMAGE)
async def test_corruption_is_a_clean_error(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path, which: str
) -> None:
    root, _files = tree
    blob = zip_tree(root, tmp_path / "a.zip")
    index = await read_zip(MemoryImage(blob).pread, len(blob))
    bad, words = damaged(blob, which, index)
    image = MemoryImage(bad)
    with pytest.raises(FormatError) as e:
        index = await read_zip(image.pread, len(bad))
        for member in index.members:
            await member_bytes(image.pread, index, member)
    assert words in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def small_zip(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("small")
    rng = random.Random(9)
    files = {"a.txt": b"hello zip\n" * 300, "b.bin": rng.randbytes(3000), "c/d": b"x"}
    for name, data in files.items():
        write(root / name, data)
    run(["zip", "-q", "-r", "../s.zip", "."], root)
    run(["zip", "-q", "-0", "../s.zip", "-r", "c"], root)
    return (root.parent / "s.zip").read_bytes(), files


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.data())
async def test_any_single_damage_is_an_error_or_harmless(
    small_zip: tuple[bytes, dict[str, bytes]], draw: st.DataObject
) -> None:
    """Overwrite, truncate or extend anywhere: a FormatError, or every member that still
    has its name reads back as it was."""
    blob, files = small_zip
    b = bytearray(blob)
    kind = draw.draw(st.sampled_from(("byte", "truncate", "append")))
    if kind == "byte":
        b[draw.draw(st.integers(0, len(b) - 1))] = draw.draw(st.integers(0, 255))
    elif kind == "truncate":
        del b[draw.draw(st.integers(0, len(b) - 1)) :]
    else:
        b += draw.draw(st.binary(min_size=1, max_size=40))
    image = MemoryImage(b)
    try:
        index = await read_zip(image.pread, len(b))
        for member in index.members:
            if member.name in files and member.unsupported is None:
                assert await member_bytes(image.pread, index, member) == files[member.name]
    except FormatError:
        pass
