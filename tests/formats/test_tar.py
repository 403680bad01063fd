"""Tests of the tar member map (trionbd.formats.tar).

Archives are made by GNU tar in ``tmp_path`` (every format it writes: ustar, gnu, pax,
and the GNU sparse formats), and every member is rebuilt from the map alone and compared
byte for byte with its source file; for sparse members the holes of the map must equal
the source's SEEK_HOLE map. Odd archives GNU tar will not write (devices without root,
unknown types, hard links to missing members) come from Python's tarfile writer, and
damaged archives are made by editing real ones.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, given, settings

from tests.formats.support import MemoryImage, data_ranges, write, write_sparse
from trionbd.filters.tar import describe
from trionbd.formats import FormatError, Pread
from trionbd.formats.tar import (
    BLOCK_SIZE,
    MAX_HEADER_BYTES,
    MAX_SYMLINK_HOPS,
    MemberKind,
    Segment,
    TarDanglingLink,
    TarIndex,
    TarLinkLoop,
    TarMember,
    TarNotFound,
    TarNotRegular,
    normalize_name,
    scan_tar,
)

pytestmark = pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")

MTIME = "2024-05-01T12:00:00Z"


# -- helpers ----------------------------------------------------------------------------


class Archive(MemoryImage):
    """An archive in memory, mapped by ``index`` and rebuilt from its map by ``contents``."""

    @property
    def bytes_read(self) -> int:
        return sum(length for _, length in self.reads)

    def read(self, offset: int, length: int) -> bytes:
        """``pread`` as the blocking read that `scan_tar` takes (recorded the same way)."""
        assert 0 <= offset and 0 < length and offset + length <= len(self.data), (offset, length)
        self.reads.append((offset, length))
        return bytes(self.data[offset : offset + length])

    async def index(self, name: str = "test.tar") -> TarIndex:
        return scan_tar(self.read, len(self.data), name=name)

    async def contents(self, member: TarMember) -> bytes:
        return await member_contents(self.pread, member)


async def member_contents(pread: Pread, member: TarMember) -> bytes:
    """Rebuild a member from its map: archive ranges and zero-filled holes."""
    out = bytearray()
    for seg in member.segments(0, member.size):
        if seg.archive_offset is None:
            out += bytes(seg.length)
        else:
            out += await pread(seg.archive_offset, seg.length)
    assert len(out) == member.size
    return bytes(out)


def gnu_tar(cwd: Path, *args: str) -> None:
    subprocess.run(["tar", *args], cwd=cwd, check=True, capture_output=True)


def make_tar(tmp_path: Path, *args: str) -> Archive:
    """Run ``tar -cf out.tar ARGS`` in ``tmp_path/src`` and load the result."""
    out = tmp_path / "out.tar"
    gnu_tar(tmp_path / "src", "-cf", str(out), *args)
    return Archive(out.read_bytes())


def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    path.mkdir(exist_ok=True)
    return path


def header_offsets(data: bytes | bytearray) -> list[int]:
    """Offsets of the first header of each member, per Python's tarfile."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [m.offset for m in tf.getmembers()]


def python_tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int) -> Archive:
    """An archive written by Python's tarfile (for members GNU tar cannot make here)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            info.size = len(data) if data is not None else 0
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return Archive(buf.getvalue())


def tinfo(name: str, type: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type
    info.linkname = linkname
    info.mode = 0o644
    info.mtime = 1714564800
    return info


# -- plain formats ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax", "v7"])
async def test_regular_members_rebuild_byte_for_byte(tmp_path: Path, fmt: str) -> None:
    root = src(tmp_path)
    rng = random.Random(1)
    sizes = {"empty": 0, "one": 1, "block": 512, "blocks": 4096, "odd": 12345, "big": 1 << 20}
    for name, size in sizes.items():
        write(root / "d" / name, rng.randbytes(size))
    archive = make_tar(tmp_path, f"--format={fmt}", "d")
    index = await archive.index()

    assert sorted(index.members) == sorted(f"d/{name}" for name in sizes)
    assert len(index) == len(sizes)
    for name, size in sizes.items():
        member = index.lookup(f"d/{name}")
        assert member.name == f"d/{name}"
        assert member.size == member.stored_size == size
        assert member.sparse is None
        assert member.offset_data % BLOCK_SIZE == 0
        assert await archive.contents(member) == (root / "d" / name).read_bytes()

    with pytest.raises(TarNotRegular, match=r"is a directory, not a regular file") as info:
        index.lookup("d")
    assert info.value.kind is MemberKind.DIRECTORY
    assert isinstance(info.value, FormatError)


async def test_metadata_and_description(tmp_path: Path) -> None:
    root = src(tmp_path)
    write(root / "f", bytes(1048576))
    os.chmod(root / "f", 0o640)
    gnu_tar(root, "--format=pax", "-cf", "../a.tar", "--owner=1234", "--group=567",
            f"--mtime={MTIME}", "f")  # fmt: skip
    archive = Archive((tmp_path / "a.tar").read_bytes())
    member = (await archive.index()).lookup("f")
    assert (member.mode & 0o7777, member.uid, member.gid) == (0o640, 1234, 567)
    assert member.mtime == 1714564800
    assert member.type == tarfile.REGTYPE
    assert describe(member.name, member) == (
        "regular file, 1048576 bytes, mode 0640, mtime 2024-05-01T12:00:00Z"
    )


async def test_gnu_long_names_and_long_link_targets(tmp_path: Path) -> None:
    root = src(tmp_path)
    deep = "/".join(["directory-with-a-long-name-" + str(i) for i in range(6)])
    long_file = f"{deep}/{'f' * 150}"
    assert len(long_file) > 255
    write(root / long_file, b"long name contents\n")
    os.symlink(f"../{long_file}", root / "symlink")  # target > 100 bytes
    os.link(root / long_file, root / "hardlink-to-long-name")
    for fmt in ("gnu", "pax"):
        archive = make_tar(tmp_path, f"--format={fmt}", "directory-with-a-long-name-0",
                           "symlink", "hardlink-to-long-name")  # fmt: skip
        index = await archive.index()
        member = index.lookup(long_file)
        assert member.name == long_file
        assert await archive.contents(member) == b"long name contents\n"
        assert index.lookup("symlink") == member
        assert index.members["hardlink-to-long-name"] == member
        assert index.lookup("./hardlink-to-long-name") == member


async def test_pax_utf8_names_and_fractional_mtime(tmp_path: Path) -> None:
    root = src(tmp_path)
    write(root / "données" / "Œuvre été.bin", b"pax\n")
    os.utime(root / "données" / "Œuvre été.bin", (1714564800.25, 1714564800.25))
    archive = make_tar(tmp_path, "--format=pax", "données")
    member = (await archive.index()).lookup("données/Œuvre été.bin")
    assert member.mtime == pytest.approx(1714564800.25)
    assert describe(member.name, member).endswith("mtime 2024-05-01T12:00:00Z")
    assert await archive.contents(member) == b"pax\n"


async def test_dot_slash_and_absolute_names_are_normalized(tmp_path: Path) -> None:
    root = src(tmp_path)
    write(root / "x", b"x\n")
    write(root / "sub" / "y", b"y\n")
    archive = make_tar(tmp_path, ".")  # members ./, ./x, ./sub/, ./sub/y
    index = await archive.index()
    assert sorted(index.members) == ["sub/y", "x"]
    for name in ("x", "./x", "/x", ".//x", "x/", "./sub/../x"):
        assert await archive.contents(index.lookup(name)) == b"x\n"
    with pytest.raises(TarNotFound):
        index.lookup("")
    with pytest.raises(TarNotRegular):
        index.lookup("./sub")

    # -P keeps a leading slash in the member name; it is removed too.
    gnu_tar(root, "-P", "-cf", "../abs.tar", str(root / "x"))
    abs_index = await Archive((tmp_path / "abs.tar").read_bytes()).index()
    assert list(abs_index.members) == [str(root / "x").lstrip("/")]


def test_normalize_name() -> None:
    assert normalize_name("./a//b/./c/") == "a/b/c"
    assert normalize_name("/etc/passwd") == "etc/passwd"
    assert normalize_name(".") == normalize_name("./") == normalize_name("/") == ""
    assert normalize_name("a/../b") == "a/../b"


# -- sparse members -----------------------------------------------------------------------

SPARSE_FORMATS = [
    pytest.param(["--format=gnu"], id="gnu-old-sparse"),
    pytest.param(["--format=pax", "--sparse-version=0.0"], id="pax-0.0"),
    pytest.param(["--format=pax", "--sparse-version=0.1"], id="pax-0.1"),
    pytest.param(["--format=pax", "--sparse-version=1.0"], id="pax-1.0"),
]

MiB = 1 << 20
SPARSE_SOURCES = {
    # name: (size, writes)
    "three-regions": (10 * MiB, [(100, 4), (3_000_000, 70_000), (8 * MiB, 2)]),
    "starts-with-hole-ends-with-data": (4 * MiB, [(MiB, 10), (4 * MiB - 5000, 5000)]),
    "eight-regions": (16 * MiB, [(i * 2 * MiB + 4096 * i, 4096 + 17 * i) for i in range(8)]),
    "all-hole": (5 * MiB, []),
    "many-regions": (64 * MiB, [(i * 512 * 1024, 300) for i in range(100)]),
    "dense": (MiB, [(0, MiB)]),
}


@pytest.fixture(scope="module")
def sparse_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sparse") / "src"
    for seed, (name, (size, writes)) in enumerate(SPARSE_SOURCES.items()):
        write_sparse(root / name, size, writes, random.Random(seed))
    probe = data_ranges(root / "all-hole")
    if probe:
        pytest.skip("the file system of tmp_path does not report holes (SEEK_HOLE)")
    return root


@pytest.mark.parametrize("options", SPARSE_FORMATS)
async def test_sparse_members_match_source_and_hole_map(
    sparse_sources: Path, tmp_path: Path, options: list[str]
) -> None:
    out = tmp_path / "sparse.tar"
    gnu_tar(sparse_sources, "-S", *options, "-cf", str(out), *SPARSE_SOURCES)
    archive = Archive(out.read_bytes())
    index = await archive.index()
    assert list(index.members) == list(SPARSE_SOURCES)
    for name, (size, _) in SPARSE_SOURCES.items():
        member = index.lookup(name)
        path = sparse_sources / name
        assert member.size == size
        assert await archive.contents(member) == path.read_bytes(), name
        segments = member.segments(0, size)
        data = [(s.offset, s.offset + s.length) for s in segments if s.archive_offset is not None]
        holes = [(s.offset, s.length) for s in segments if s.archive_offset is None]
        assert data == data_ranges(path), name
        assert sum(length for _, length in holes) == size - member.stored_size
        if name == "dense":
            continue  # GNU tar stores a file without holes as a plain member
        assert member.sparse is not None
        if options == ["--format=gnu"]:
            assert member.type == tarfile.GNUTYPE_SPARSE
        assert member.stored_size == sum(length for _, length in member.sparse)
        assert "(sparse, " in describe(member.name, member)
    assert len(archive.data) < 2 * MiB  # the holes really were not stored


async def test_segments_of_a_sparse_member_cover_subranges_exactly(
    sparse_sources: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sparse.tar"
    gnu_tar(sparse_sources, "-S", "--format=gnu", "-cf", str(out), "eight-regions")
    archive = Archive(out.read_bytes())
    member = (await archive.index()).lookup("eight-regions")
    source = (sparse_sources / "eight-regions").read_bytes()
    rng = random.Random(7)
    edges = [0, member.size]
    for seg in member.segments(0, member.size):
        edges += [seg.offset - 1, seg.offset, seg.offset + 1]
    for _ in range(300):
        a, b = sorted(rng.choice([rng.randrange(member.size + 1), rng.choice(edges)])
                      for _ in range(2))  # fmt: skip
        a, b = max(a, 0), min(b, member.size)
        segments = member.segments(a, b - a)
        pos = a
        for seg in segments:
            assert seg.offset == pos and seg.length > 0
            pos += seg.length
        assert pos == b
        got = b"".join(
            bytes(s.length) if s.archive_offset is None
            else archive.data[s.archive_offset : s.archive_offset + s.length]
            for s in segments
        )  # fmt: skip
        assert got == source[a:b]


@given(
    regions=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 20)), max_size=12),
    tail=st.integers(0, 30),
    data=st.data(),
)
def test_segments_match_a_byte_model(
    regions: list[tuple[int, int]], tail: int, data: st.DataObject
) -> None:
    # Lay out non-overlapping regions in a shuffled storage order.
    spans = []
    pos = 0
    for gap, length in regions:
        spans.append((pos + gap, length))
        pos += gap + length
    size = pos + tail
    stored = data.draw(st.permutations(spans))
    member = TarMember(
        name="m", type=b"S", header_offset=0, offset_data=1000, size=size,
        stored_size=sum(n for _, n in stored), mode=0o644, mtime=0, uid=0, gid=0,
        sparse=tuple(stored),
    )  # fmt: skip
    model: list[int | None] = [None] * size
    archive_pos = 1000
    for start, length in stored:
        for i in range(length):
            model[start + i] = archive_pos + i
        archive_pos += length
    a = data.draw(st.integers(0, size))
    b = data.draw(st.integers(a, size))
    got: list[int | None] = []
    for seg in member.segments(a, b - a):
        assert seg.length > 0
        got += [None if seg.archive_offset is None else seg.archive_offset + i
                for i in range(seg.length)]  # fmt: skip
    assert got == model[a:b]


def test_tar_member_rejects_inconsistent_sparse_maps() -> None:
    def member(sparse: tuple[tuple[int, int], ...], size: int = 100) -> TarMember:
        return TarMember("m", b"S", 0, 512, size, sum(n for _, n in sparse), 0o644, 0, 0, 0,
                         sparse=sparse)  # fmt: skip

    assert member(((0, 10), (10, 10))).segments(0, 30) == [
        Segment(0, 20, 512),  # adjacent and contiguous: merged
        Segment(20, 10, None),
    ]
    with pytest.raises(ValueError, match="overlaps"):
        member(((0, 10), (5, 10)))
    with pytest.raises(ValueError, match="past the member"):
        member(((95, 10),))
    with pytest.raises(ValueError, match="negative"):
        member(((-1, 10),))
    with pytest.raises(ValueError, match="outside member"):
        member(((0, 10),)).segments(90, 11)
    assert member(((0, 10),)).segments(100, 0) == []


# -- links, special files, duplicates -----------------------------------------------------


async def test_hard_links_resolve_to_the_member_holding_the_data(tmp_path: Path) -> None:
    root = src(tmp_path)
    write(root / "a" / "data", b"shared inode\n")
    os.link(root / "a" / "data", root / "a" / "link1")
    os.makedirs(root / "b")
    os.link(root / "a" / "data", root / "b" / "link2")
    archive = make_tar(tmp_path, "--sort=name", "a", "b")
    index = await archive.index()
    original = index.lookup("a/data")
    assert {index.lookup(n) for n in ("a/link1", "b/link2")} == {original}
    assert original.name == "a/data"
    assert await archive.contents(index.members["b/link2"]) == b"shared inode\n"


async def test_symlinks_relative_absolute_chains_dangling_and_loops(tmp_path: Path) -> None:
    root = src(tmp_path)
    write(root / "dir" / "file", b"target\n")
    write(root / "dir" / "sub" / "other", b"other\n")
    links = {
        "dir/sub/rel": "../file",
        "abs": "/dir/file",
        "chain1": "chain2",
        "chain2": "dir/sub/rel",
        "dangling": "dir/missing",
        "loop1": "loop2",
        "loop2": "./loop1",
        "self": "self",
        "dirlink": "dir/sub",
        "through-dir-link": "dirlink/other",
        "dotdot-above-root": "../../../dir/file",
        "dirlink-dotdot": "dirlink/../file",
        "via-dangling": "dangling",
    }
    for name, link_target in links.items():
        os.symlink(link_target, root / name)
    archive = make_tar(tmp_path, "--format=gnu", *sorted(os.listdir(root)))
    index = await archive.index()

    file = index.lookup("dir/file")
    for name in ("dir/sub/rel", "abs", "chain1", "chain2", "dotdot-above-root",
                 "dirlink-dotdot"):  # fmt: skip
        assert index.lookup(name) is file, name
        assert index.members[name] is file
    assert await archive.contents(index.lookup("through-dir-link")) == b"other\n"
    assert index.lookup("dirlink/other") is index.lookup("dir/sub/other")  # path, not a name

    for name in ("dangling", "via-dangling"):
        with pytest.raises(TarDanglingLink, match="dir/missing") as err:
            index.lookup(name)
        assert isinstance(err.value, TarNotFound)
        assert name not in index.members
    for name in ("loop1", "loop2", "self"):
        with pytest.raises(TarLinkLoop, match=f"more than {MAX_SYMLINK_HOPS}"):
            index.lookup(name)
        assert name not in index.members
    with pytest.raises(TarNotRegular, match="is a directory, not a regular file"):
        index.lookup("dirlink")
    with pytest.raises(TarNotFound, match="no member named 'nothing'"):
        index.lookup("nothing")
    assert set(index.members) == {
        "dir/file", "dir/sub/other", "dir/sub/rel", "abs", "chain1", "chain2",
        "through-dir-link", "dotdot-above-root", "dirlink-dotdot",
    }  # fmt: skip


async def test_fifos_devices_and_unknown_types_are_not_exports(tmp_path: Path) -> None:
    root = src(tmp_path)
    os.mkfifo(root / "fifo")
    write(root / "file", b"f\n")
    archive = make_tar(tmp_path, "fifo", "file")
    index = await archive.index()
    assert list(index.members) == ["file"]
    with pytest.raises(TarNotRegular, match=r"'fifo' .*is a FIFO, not a regular file") as err:
        index.lookup("fifo")
    assert err.value.kind is MemberKind.FIFO

    chr_dev = tinfo("dev/null", tarfile.CHRTYPE)
    chr_dev.devmajor, chr_dev.devminor = 1, 3
    odd = python_tar(
        [
            (chr_dev, None),
            (tinfo("dev/sda", tarfile.BLKTYPE), None),
            (tinfo("vendor", b"Z"), b"vendor data"),  # unknown type: data is skipped
            (tinfo("after"), b"after\n"),
            (tinfo("link-to-dev", tarfile.SYMTYPE, "dev/null"), None),
        ],
        tarfile.GNU_FORMAT,
    )
    index = await odd.index()
    assert list(index.members) == ["after"]
    assert await odd.contents(index.lookup("after")) == b"after\n"
    for name, kind in [("dev/null", MemberKind.CHARDEV), ("dev/sda", MemberKind.BLOCKDEV),
                       ("vendor", MemberKind.OTHER), ("link-to-dev", MemberKind.CHARDEV),
                       ("dev", MemberKind.DIRECTORY)]:  # fmt: skip
        with pytest.raises(TarNotRegular, match="not a regular file") as err:
            index.lookup(name)
        assert err.value.kind is kind, name


async def test_hard_link_to_a_missing_or_later_member_is_not_an_export() -> None:
    archive = python_tar(
        [
            (tinfo("early-link", tarfile.LNKTYPE, "data"), None),
            (tinfo("data"), b"v1\n"),
            (tinfo("link-v1", tarfile.LNKTYPE, "./data"), None),
            (tinfo("data"), b"version 2\n"),
            (tinfo("link-v2", tarfile.LNKTYPE, "data"), None),
            (tinfo("link-missing", tarfile.LNKTYPE, "nowhere"), None),
        ],
        tarfile.USTAR_FORMAT,
    )
    index = await archive.index()
    assert list(index.members) == ["link-v1", "data", "link-v2"]
    # A hard link stands for the member of that name preceding it, as extraction does.
    assert await archive.contents(index.lookup("link-v1")) == b"v1\n"
    assert await archive.contents(index.lookup("data")) == b"version 2\n"
    assert await archive.contents(index.lookup("link-v2")) == b"version 2\n"
    for name in ("early-link", "link-missing"):
        with pytest.raises(TarDanglingLink, match="hard link"):
            index.lookup(name)


async def test_duplicate_names_later_member_wins(tmp_path: Path) -> None:
    root = src(tmp_path)
    write(root / "x", b"first version\n")
    write(root / "y", b"y\n")
    gnu_tar(root, "-cf", "../a.tar", "x", "y")
    write(root / "x", b"second, longer version\n")
    gnu_tar(root, "-rf", "../a.tar", "./x")  # append: the same path again
    archive = Archive((tmp_path / "a.tar").read_bytes())
    index = await archive.index()
    assert list(index.members) == ["y", "x"]  # archive order of the winning headers
    assert await archive.contents(index.lookup("x")) == b"second, longer version\n"
    assert index.lookup("x").header_offset > index.lookup("y").header_offset


# -- empty and large archives -------------------------------------------------------------


async def test_empty_archives(tmp_path: Path) -> None:
    gnu_tar(tmp_path, "-cf", "e.tar", "--files-from", "/dev/null")
    data = (tmp_path / "e.tar").read_bytes()
    assert data == bytes(10240)
    for zeros in (data, bytes(512), bytes(1024), bytes(700)):
        index = await Archive(zeros).index()
        assert len(index) == 0 and list(index) == []
        with pytest.raises(TarNotFound):
            index.lookup("x")
    with pytest.raises(FormatError, match=r"empty\.tar: empty file \(0 bytes\)"):
        await Archive(b"").index("empty.tar")


async def test_ten_thousand_members(tmp_path: Path) -> None:
    root = src(tmp_path)
    for i in range(10_000):
        write(root / "many" / f"f{i:05d}", f"contents of file {i}\n".encode())
    archive = make_tar(tmp_path, "many")
    start = time.perf_counter()
    index = await archive.index()
    elapsed = time.perf_counter() - start
    print(f"\nmapped 10000 members of a {len(archive.data)}-byte archive in {elapsed:.3f} s "
          f"with {len(archive.reads)} preads")  # fmt: skip
    assert len(index) == 10_000
    assert len(archive.reads) < 100  # read-ahead windows, not one round trip per header
    for i in (0, 1, 4999, 9998, 9999):
        member = index.lookup(f"many/f{i:05d}")
        assert await archive.contents(member) == f"contents of file {i}\n".encode()


async def test_large_member_data_is_skipped_not_read(tmp_path: Path) -> None:
    root = src(tmp_path)
    rng = random.Random(3)
    for i in range(4):
        write(root / f"big{i}", rng.randbytes(8 * MiB + 100))
    archive = make_tar(tmp_path, "big0", "big1", "big2", "big3")
    index = await archive.index()
    assert len(index) == 4
    assert archive.bytes_read < 512 * 1024, archive.bytes_read
    assert await archive.contents(index.lookup("big2")) == (root / "big2").read_bytes()


# -- damaged archives ---------------------------------------------------------------------


def three_members(tmp_path: Path, fmt: str = "ustar") -> Archive:
    root = src(tmp_path)
    write(root / "a", b"a" * 1000)
    write(root / "b", b"b" * 3000)
    write(root / "c", b"c" * 10)
    return make_tar(tmp_path, f"--format={fmt}", "a", "b", "c")


@pytest.mark.parametrize("member", [0, 1, 2])
async def test_bad_checksum_is_reported_with_its_offset(tmp_path: Path, member: int) -> None:
    archive = three_members(tmp_path)
    offset = header_offsets(archive.data)[member]
    data = bytearray(archive.data)
    data[offset + 10] ^= 0x01  # a name byte: the checksum no longer matches
    with pytest.raises(FormatError, match=rf"^bad\.tar: bad header checksum at offset {offset}$"):
        await Archive(bytes(data)).index("bad.tar")


async def test_bad_checksum_in_a_header_after_a_pax_header(tmp_path: Path) -> None:
    root = src(tmp_path)
    write(root / ("n" * 120), b"pax named\n")
    write(root / "after", b"after\n")
    archive = make_tar(tmp_path, "--format=pax", "n" * 120, "after")
    pax_header = header_offsets(archive.data)[0]
    ustar_header = pax_header + 2 * BLOCK_SIZE  # pax header block + one record block
    data = bytearray(archive.data)
    data[ustar_header + 3] ^= 0x40
    with pytest.raises(FormatError, match=rf"bad header checksum at offset {ustar_header}"):
        await Archive(bytes(data)).index()


async def test_truncated_header(tmp_path: Path) -> None:
    archive = three_members(tmp_path)
    offset = header_offsets(archive.data)[2]
    with pytest.raises(FormatError, match=rf"truncated header at offset {offset}"):
        await Archive(archive.data[: offset + 100]).index()


@pytest.mark.parametrize("cut", [1, 511, 512, 2048, 2560])
async def test_truncated_member_data(tmp_path: Path, cut: int) -> None:
    archive = three_members(tmp_path)
    offset_b = header_offsets(archive.data)[1]  # b: 3000 bytes of data after its header
    with pytest.raises(FormatError, match=r"^t\.tar: truncated archive"):
        await Archive(archive.data[: offset_b + BLOCK_SIZE + cut]).index("t.tar")


async def test_truncated_sparse_member_data(sparse_sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.tar"
    gnu_tar(sparse_sources, "-S", "--format=pax", "-cf", str(out), "three-regions")
    data = out.read_bytes()
    with pytest.raises(FormatError, match=r"truncated archive.*'three-regions'"):
        await Archive(data[:5000]).index()


async def test_member_end_at_end_of_file_without_marker_is_accepted(tmp_path: Path) -> None:
    archive = three_members(tmp_path)
    end_of_c = header_offsets(archive.data)[2] + 2 * BLOCK_SIZE
    index = await Archive(archive.data[:end_of_c]).index()
    assert list(index) == ["a", "b", "c"]


async def test_garbage_and_lone_zero_blocks(tmp_path: Path) -> None:
    rng = random.Random(5)
    with pytest.raises(FormatError, match=r"^g\.tar: .*offset 0"):
        await Archive(rng.randbytes(20000)).index("g.tar")
    with pytest.raises(FormatError, match=r"truncated header at offset 0"):
        await Archive(b"not a tar").index()

    archive = three_members(tmp_path)
    offset_b = header_offsets(archive.data)[1]
    zeroed = bytearray(archive.data)
    zeroed[offset_b : offset_b + BLOCK_SIZE] = bytes(BLOCK_SIZE)
    with pytest.raises(FormatError, match=rf"lone zero block at offset {offset_b}"):
        await Archive(bytes(zeroed)).index()

    garbage_after_b = bytearray(archive.data)
    offset_c = header_offsets(archive.data)[2]
    garbage_after_b[offset_c : offset_c + BLOCK_SIZE] = rng.randbytes(BLOCK_SIZE)
    with pytest.raises(FormatError, match=rf"invalid header at offset {offset_c}: .*octal"):
        await Archive(bytes(garbage_after_b)).index()

    # After a complete end-of-archive marker, bytes are ignored (as GNU tar does).
    trailing = await Archive(archive.data + rng.randbytes(4096)).index()
    assert list(trailing) == ["a", "b", "c"]


async def test_sizes_pointing_past_the_end(tmp_path: Path) -> None:
    huge = tinfo("huge")
    archive = python_tar([(huge, b"small")], tarfile.GNU_FORMAT)
    data = bytearray(archive.data)
    data[124:136] = b"%011o\0" % (1 << 30)  # size field: 1 GiB
    fix_checksum(data, 0)
    with pytest.raises(FormatError, match=r"truncated archive: member 'huge' .*1073741824"):
        await Archive(bytes(data)).index()


async def test_absurd_header_sizes_are_refused_before_reading() -> None:
    archive = python_tar([(tinfo("n" * 150), b"long name")], tarfile.GNU_FORMAT)
    data = bytearray(archive.data)
    assert data[156:157] == tarfile.GNUTYPE_LONGNAME
    data[124:136] = b"%011o\0" % (MAX_HEADER_BYTES + 1)
    fix_checksum(data, 0)
    big = Archive(bytes(data) + bytes(MAX_HEADER_BYTES + 4096))
    with pytest.raises(FormatError, match=r"header data of \d+ bytes at offset 512 exceeds"):
        await big.index()
    assert big.bytes_read < 1 << 20


def fix_checksum(data: bytearray, offset: int) -> None:
    block = data[offset : offset + BLOCK_SIZE]
    block[148:156] = b" " * 8
    data[offset + 148 : offset + 156] = b"%06o\0 " % sum(block)


# -- what the caller's read raises ---------------------------------------------------------


def test_read_errors_propagate_unchanged(tmp_path: Path) -> None:
    archive = three_members(tmp_path)
    boom = OSError(5, "I/O error from the layer below")

    def failing(offset: int, length: int) -> bytes:
        raise boom

    with pytest.raises(OSError) as err:
        scan_tar(failing, len(archive.data))
    assert err.value is boom
    assert not isinstance(err.value, FormatError)

    class Custom(ValueError):
        pass

    root = src(tmp_path)
    write(root / "big", bytes(300_000))  # skipping it needs a second read
    write(root / "small", b"small\n")
    archive = make_tar(tmp_path, "big", "small")
    later = Custom("later")

    def failing_later(offset: int, length: int) -> bytes:
        if offset > 0:
            raise later
        return archive.read(offset, length)

    with pytest.raises(Custom) as err2:
        scan_tar(failing_later, len(archive.data))
    assert err2.value is later


def test_on_header_counts_members_and_may_stop_the_scan(tmp_path: Path) -> None:
    archive = three_members(tmp_path)
    seen: list[int] = []
    index = scan_tar(archive.read, len(archive.data), on_header=seen.append)
    assert seen == [0, 1, 2, 3] and len(index) == 3

    class Stop(Exception):
        pass

    def stop_after_one(members: int) -> None:
        if members == 1:
            raise Stop

    with pytest.raises(Stop):
        scan_tar(archive.read, len(archive.data), on_header=stop_after_one)


# -- property tests: damaged archives give FormatError or a sound map ---------------------


@pytest.fixture(scope="module")
def fuzz_archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small archive touching many header paths: pax, GNU long names, sparse maps."""
    root = tmp_path_factory.mktemp("fuzz")
    work = root / "src"
    write(work / "plain", b"plain data\n")
    write(work / ("long" * 40), b"long name\n")
    write_sparse(work / "sparse", 200_000, [(0, 10), (70_000, 20), (150_000, 5)], random.Random(0))
    os.symlink("plain", work / "sym")
    os.link(work / "plain", work / "hard")
    parts = []
    for options in (["--format=gnu"], ["--format=pax", "--sparse-version=1.0"],
                    ["--format=pax", "--sparse-version=0.1"]):  # fmt: skip
        out = root / "part.tar"
        gnu_tar(work, "-S", *options, "-cf", str(out), "plain", "long" * 40, "sparse", "sym",
                "hard")  # fmt: skip
        data = out.read_bytes().rstrip(b"\0")
        parts.append(data + bytes(-len(data) % BLOCK_SIZE))
    return b"".join(parts) + bytes(2 * BLOCK_SIZE)


def check_sound(data: bytes) -> None:
    """The archive maps cleanly (FormatError) or every segment lies inside it."""
    archive = Archive(data)

    async def run() -> None:
        try:
            index = await archive.index()
        except FormatError as exc:
            assert str(exc).startswith("test.tar: "), str(exc)
            return
        for name in index:
            member = index.lookup(name)
            assert describe(member.name, member)
            for seg in member.segments(0, member.size):
                if seg.archive_offset is not None:
                    assert 0 <= seg.archive_offset
                    assert seg.archive_offset + seg.length <= len(data)

    trio.run(run)


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1,
                      max_size=8))  # fmt: skip
def test_mutated_bytes_give_format_error_or_a_sound_map(
    fuzz_archive: bytes, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(fuzz_archive)
    for position, value in edits:
        data[position % len(data)] = value
    check_sound(bytes(data))


@FUZZ
@given(
    header=st.integers(0, 100),
    edits=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
)
def test_mutated_headers_with_valid_checksums_give_format_error_or_a_sound_map(
    fuzz_archive: bytes, header: int, edits: list[tuple[int, int]], cut: int | None
) -> None:
    # Edit a header (or pax/sparse block) and re-seal its checksum, so parsing goes past
    # the checksum test into sizes, types, pax records and sparse maps.
    blocks = [i for i in range(0, len(fuzz_archive), BLOCK_SIZE) if any(
        fuzz_archive[i : i + BLOCK_SIZE])]  # fmt: skip
    offset = blocks[header % len(blocks)]
    data = bytearray(fuzz_archive)
    for position, value in edits:
        data[offset + position] = value
    fix_checksum(data, offset)
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    check_sound(bytes(data))
