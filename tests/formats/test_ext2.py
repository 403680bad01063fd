"""Tests for trionbd.formats.ext2 against real images built by mke2fs -d.

Every image is made from a source tree in a temporary directory; the reader's view of
every file (content, size, hole map) is compared with the source.  Structures are
corrupted at offsets found with debugfs (imap, bmap, ex) to check the error messages.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import crc32c
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.formats.support import MemoryImage, data_ranges, write, write_sparse
from trionbd.formats import FormatError
from trionbd.formats.ext2 import (
    MAX_SYMLINK_FOLLOWS,
    Ext2ChecksumError,
    Ext2FS,
    Ext2NotADirectory,
    Ext2NotFound,
    Ext2NotRegularFile,
    Ext2SymlinkLoop,
    Ext2Unsupported,
    FileMap,
    Segment,
    dx_hash,
)

MKE2FS = shutil.which("mke2fs") or "/sbin/mke2fs"
DEBUGFS = shutil.which("debugfs") or "/sbin/debugfs"
E2FSCK = shutil.which("e2fsck") or "/sbin/e2fsck"

pytestmark = pytest.mark.skipif(
    not all(os.access(p, os.X_OK) for p in (MKE2FS, DEBUGFS, E2FSCK)),
    reason="e2fsprogs (mke2fs, debugfs, e2fsck) is not installed",
)

# A fixed environment so the images do not depend on the machine's clock or config.
ENV = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000", "LC_ALL": "C"}

MiB = 1 << 20


# ------------------------------------------------------------------------------ helpers


class Image(MemoryImage):
    """A file system image in memory, opened with ``open``."""

    @classmethod
    def load(cls, path: Path) -> Image:
        return cls(path.read_bytes())

    async def open(self, **kwargs: bool) -> Ext2FS:
        return await Ext2FS.open(self.pread, len(self.data), **kwargs)

    def flip(self, offset: int, mask: int = 0xFF) -> None:
        self.data[offset] ^= mask


def run(*cmd: str | Path, ok: tuple[int, ...] = (0,)) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], env=ENV, capture_output=True, text=True, errors="replace"
    )
    if proc.returncode not in ok or "error" in proc.stderr.lower():
        raise AssertionError(f"{cmd}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def debugfs(image: Path, request: str, *, write: bool = False) -> str:
    return run(DEBUGFS, *(["-w"] if write else []), "-R", request, image)


def mkfs(
    image: Path, src: Path | None, fstype: str, bs: int, features: str = "",
    size: str = "32M", extra: tuple[str, ...] = (),
) -> Path:  # fmt: skip
    cmd: list[str | Path] = [MKE2FS, "-q", "-F", "-t", fstype, "-b", str(bs)]
    if features:
        cmd += ["-O", features]
    if src is not None:
        cmd += ["-d", src]
    run(*cmd, *extra, image, size)
    return image


def source_files(root: Path) -> dict[str, Path]:
    """Every regular file of the source tree by absolute image path (links not followed)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if stat.S_ISREG(p.lstat().st_mode):
                out["/" + str(p.relative_to(root))] = p
    return out


def read_at(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def source_data_ranges(path: Path) -> list[tuple[int, int]] | None:
    """SEEK_DATA/SEEK_HOLE map of a source file, or None if its filesystem shows no holes."""
    out = data_ranges(path)
    return None if out == [(0, path.stat().st_size)] else out


def check_hole_map(fmap: FileMap, content: bytes, bs: int) -> None:
    """mke2fs -d leaves a block unallocated exactly when the source block is all zeros."""
    if fmap.inline is not None:
        assert fmap.inline == content
        return
    nblocks = -(-len(content) // bs)
    mapped: set[int] = set()
    for seg in fmap.runs():
        assert seg.physical is not None and seg.physical % bs == 0
        mapped.update(range(seg.offset // bs, -(-(seg.offset + seg.length) // bs)))
    nonzero = {b for b in range(nblocks) if content[b * bs : (b + 1) * bs].rstrip(b"\0")}
    assert mapped == nonzero, (sorted(mapped - nonzero)[:5], sorted(nonzero - mapped)[:5])


# ------------------------------------------------------------------------------ the source tree

LONG_TARGET = "./" * 40 + "hello.txt"  # 89 bytes: a slow (or inline) symlink
SPARSE_BIG_SIZE = 70 * MiB  # reaches triple indirection with 1 KiB blocks (> 64.26 MiB)


def build_tree(root: Path) -> None:
    rng = random.Random(20240601)
    write(root / "hello.txt", b"hello, world\n")
    write(root / "empty", b"")
    for n in (1, 59, 60, 61, 100, 1023, 1024, 1025, 4095, 4096, 4097, 12 * 1024 + 1, 100_000):
        write(root / f"sizes/size_{n}", rng.randbytes(n))
    write(root / "d1/d2/d3/deep.bin", rng.randbytes(300_000))
    write(root / "dir with space/h\u00e9llo w\u00f6rld.txt", b"unicode name\n")
    write(root / ("d1/" + "n" * 255), b"longest name\n")
    write(root / "zeros_inside", rng.randbytes(4096) + bytes(16384) + rng.randbytes(4096))
    write(root / "tiny_dir/a", b"a")
    for i in range(5):
        write(root / f"mid_dir/f{i}", b"m" * i)
    (root / "empty_dir").mkdir()
    regions = [(i * 65536, 4096) for i in range(300)]
    write_sparse(root / "sparse_many", 300 * 65536 + 100, regions, rng)
    big_regions = [0, 200 << 10, 1 * MiB, 30 * MiB, 66 * MiB, SPARSE_BIG_SIZE - 4096]
    write_sparse(root / "sparse_big", SPARSE_BIG_SIZE, [(r, 4096) for r in big_regions], rng)
    os.link(root / "hello.txt", root / "d1/hard")
    os.link(root / "hello.txt", root / "d1/d2/hard2")
    links = {
        "fast": "hello.txt",
        "slow": LONG_TARGET,
        "abs": "/d1/d2/d3/deep.bin",
        "chain1": "chain2",
        "chain2": "chain3",
        "chain3": "hello.txt",
        "linkdir": "d1/d2",
        "d1/d2/rel_up": "../../hello.txt",
        "d1/dirlink_abs": "/d1/d2/d3",
        "loop1": "loop2",
        "loop2": "loop1",
        "self": "self",
        "dangling": "nowhere",
        "sizes/to_dir": "..",
    }
    for name, target in links.items():
        os.symlink(target, root / name)
    os.mkfifo(root / "fifo")


@pytest.fixture(scope="session")
def src_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src") / "tree"
    root.mkdir()
    build_tree(root)
    return root


CONFIGS = {
    "ext2-1k": ("ext2", 1024, ""),
    "ext2-4k": ("ext2", 4096, ""),
    "ext3-1k": ("ext3", 1024, ""),
    "ext3-4k": ("ext3", 4096, ""),
    "ext4-1k": ("ext4", 1024, "metadata_csum,64bit"),
    "ext4-4k": ("ext4", 4096, "metadata_csum,64bit"),
    "ext4-1k-blockmap": ("ext4", 1024, "^extent,^64bit,metadata_csum"),
    "ext4-4k-32bit-uninit_bg": ("ext4", 4096, "^metadata_csum,^64bit,uninit_bg"),
    "ext4-4k-inline": ("ext4", 4096, "inline_data,metadata_csum"),
    "ext4-1k-inline": ("ext4", 1024, "inline_data,^metadata_csum"),
}


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory, src_tree: Path) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(config: str) -> Path:
        if config not in cache:
            fstype, bs, features = CONFIGS[config]
            image = tmp_path_factory.mktemp("img") / f"{config}.img"
            cache[config] = mkfs(image, src_tree, fstype, bs, features)
        return cache[config]

    return get


# ------------------------------------------------------------------------------ content


@pytest.mark.parametrize("config", list(CONFIGS))
async def test_every_file_matches_source(
    config: str, build: Callable[[str], Path], src_tree: Path
) -> None:
    img = Image.load(build(config))
    fs = await img.open()
    bs = CONFIGS[config][1]
    assert fs.block_size == bs
    assert fs.read_only_reason is None and not fs.needs_recovery
    assert CONFIGS[config][0] != "ext4" or "extent" in str(fs.features) or "blockmap" in config
    listed = {path: inode async for path, inode in fs.iter_files()}
    expected = source_files(src_tree)
    assert sorted(listed) == sorted(expected)
    for path, inode in listed.items():
        content = expected[path].read_bytes()
        if (
            "inline" in config
            and inode.size < len(content)
            and not content[inode.size :].strip(b"\0")
        ):
            # mke2fs 1.47.0 with -O inline_data drops a sparse file's trailing hole from
            # i_size (debugfs agrees): compare with what mke2fs wrote.
            content = content[: inode.size]
        assert inode.is_reg and inode.size == len(content), path
        assert await fs.read(inode.ino, 0, len(content) + 4096) == content, path
        if len(content) > 10:
            mid = len(content) // 3
            assert await fs.read(inode.ino, mid, 7) == content[mid : mid + 7]
        assert await fs.lookup(path) == inode.ino
        fmap = await fs.extents(inode.ino)
        check_hole_map(fmap, content, bs)
        src_ranges = source_data_ranges(expected[path])
        if src_ranges is not None and fmap.inline is None:
            clipped = [(a, min(b, inode.size)) for a, b in src_ranges if a < inode.size]
            assert fmap.data_ranges() == clipped, path
    # hard links: one inode under every path
    ino = listed["/hello.txt"].ino
    assert listed["/d1/hard"].ino == listed["/d1/d2/hard2"].ino == ino
    assert listed["/hello.txt"].links == 3


async def test_block_map_reaches_triple_indirection(build: Callable[[str], Path]) -> None:
    image = build("ext2-1k")
    stat_out = debugfs(image, "stat /sparse_big")
    assert "(DIND)" in stat_out and "(TIND)" in stat_out
    fs = await Image.load(image).open()
    inode = await fs.inode(await fs.lookup("/sparse_big"))
    assert not inode.uses_extents
    fmap = await fs.extents(inode.ino)
    starts = [seg.offset for seg in fmap.runs()]
    assert any(s >= (12 + 256 + 256 * 256) * 1024 for s in starts)  # a triple-indirect block


async def test_block_map_triple_indirection_4k(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(7)
    tind = 12 + 1024 + 1024 * 1024  # first block mapped through the triple-indirect block
    size = (tind + 100) * 4096
    regions = [0, 12 * 4096, 5 * MiB, (tind + 16) * 4096, size - 4096]
    write_sparse(src / "huge", size, [(r, 4096) for r in regions], rng)
    image = mkfs(tmp_path / "bm.img", src, "ext4", 4096, "^extent,^64bit", "16M")
    assert "(TIND)" in debugfs(image, "stat /huge")
    fs = await Image.load(image).open()
    ino = await fs.lookup("/huge")
    fmap = await fs.extents(ino)
    assert fmap.size == size
    assert fmap.data_ranges() == [(r, min(r + 4096, size)) for r in regions]
    for r in regions:
        assert await fs.read(ino, r, 4096) == read_at(src / "huge", r, 4096)
    assert await fs.read(ino, 4096, 8192) == bytes(8192)


async def test_extent_tree_of_depth_one(build: Callable[[str], Path]) -> None:
    image = build("ext4-4k")
    ex = debugfs(image, "ex /sparse_many")
    first = ex.splitlines()[1].split()
    assert first[0] == "0/" and int(first[1]) >= 1  # "Level 0/ 1": depth 1
    fs = await Image.load(image).open()
    fmap = await fs.extents(await fs.lookup("/sparse_many"))
    assert fmap.depth >= 1 and len(fmap) == 300


async def test_uninitialized_extents_read_as_zeros(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", random.Random(3).randbytes(3 * 4096))
    image = mkfs(tmp_path / "u.img", src, "ext4", 4096, "", "8M")
    # Mark the file's one extent uninitialized: ee_len |= 0x8000 (debugfs fixes checksums).
    fs = await Image.load(image).open()
    ino = await fs.lookup("/f")
    inode = await fs.inode(ino)
    ee_len = struct.unpack_from("<H", inode.i_block, 12 + 4)[0]
    word = struct.unpack_from("<I", inode.i_block, 12 + 4)[0]  # ee_len | ee_start_hi << 16
    debugfs(image, f"sif <{ino}> block[4] {word | 0x8000:#x}", write=True)
    fs = await Image.load(image).open()
    fmap = await fs.extents(ino)
    assert fmap.lookup(0, 3 * 4096) == [Segment(0, 3 * 4096, None)]
    assert ee_len == 3
    assert await fs.read(ino, 0, 1 << 20) == bytes(3 * 4096)


async def test_meta_bg_descriptors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rng = random.Random(5)
    for d in range(20):
        for i in range(60):
            write(src / f"d{d}/f{i}", rng.randbytes(100 + i))
    image = mkfs(
        tmp_path / "mb.img", src, "ext4", 1024, "meta_bg,^resize_inode", "48M",
        ("-g", "1024", "-N", "2048"),
    )  # fmt: skip
    fs = await Image.load(image).open()
    per_block = 1024 // 64
    inos = []
    async for path, inode in fs.iter_files():
        inos.append(inode.ino)
        assert await fs.read(inode.ino, 0, 1 << 20) == (src / path[1:]).read_bytes()
    assert len(inos) == 1200
    ipg = (max(inos) - 1) // fs.groups_count  # at least this many inodes per group
    assert max(inos) > per_block * max(ipg, 1), "no inode beyond the first meta group"


EXOTIC = {
    "bigalloc-1k": ("ext4", "-O", "bigalloc", "-C", "16384"),
    "bigalloc-meta_bg-1k": ("ext4", "-O", "bigalloc,meta_bg,^resize_inode", "-C", "4096"),
    "64k-blocks": ("ext4", "-b", "65536"),
    "csum_seed-sparse_super2-large_dir": (
        "ext4", "-O", "metadata_csum_seed,sparse_super2,large_dir",
    ),
    "1024-byte-inodes": ("ext4", "-I", "1024"),
    "128-byte-inodes": ("ext2", "-I", "128"),
    "revision-0": ("ext2", "-r", "0"),
    "casefold": ("ext4", "-O", "casefold"),
    "flex_bg-meta_bg": ("ext4", "-O", "meta_bg,^resize_inode", "-G", "4"),
}  # fmt: skip


@pytest.mark.parametrize("config", list(EXOTIC))
async def test_less_common_layouts(config: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_fuzz_tree(src)
    fstype, *options = EXOTIC[config]
    image = tmp_path / "x.img"
    run(MKE2FS, "-q", "-F", "-t", fstype, *options, "-d", src, image, "64M")
    run(E2FSCK, "-fyD", image, ok=(0, 1))
    fs = await Image.load(image).open()
    expected = source_files(src)
    listed = {path: inode async for path, inode in fs.iter_files()}
    assert sorted(listed) == sorted(expected)
    for path, inode in listed.items():
        assert await fs.read(inode.ino, 0, 1 << 20) == expected[path].read_bytes()
    assert await fs.lookup("/slow") == await fs.lookup("/d/sub/f0")
    assert await fs.lookup("/big/n_0077") == listed["/big/n_0077"].ino


# ------------------------------------------------------------------------------ inline data


@pytest.mark.parametrize("config", ["ext4-4k-inline", "ext4-1k-inline"])
async def test_inline_data(config: str, build: Callable[[str], Path], src_tree: Path) -> None:
    fs = await Image.load(build(config)).open()
    small = await fs.inode(await fs.lookup("/sizes/size_59"))
    assert small.inline_data
    over = await fs.inode(await fs.lookup("/sizes/size_100"))
    assert over.inline_data and over.inline_xattr is not None and len(over.inline_xattr) >= 40
    assert await fs.read(over.ino, 0, 200) == (src_tree / "sizes/size_100").read_bytes()
    fmap = await fs.extents(over.ino)
    assert fmap.inline == (src_tree / "sizes/size_100").read_bytes()
    with pytest.raises(ValueError, match="inline"):
        fmap.lookup(0, 10)
    tiny = await fs.inode(await fs.lookup("/tiny_dir"))
    assert tiny.inline_data and tiny.size == 60 and not tiny.inline_xattr
    assert [e.name for e in await fs.readdir(tiny.ino)] == ["a"]
    assert await fs.lookup("/tiny_dir/./") == tiny.ino == await fs.lookup("/d1/../tiny_dir")
    assert await fs.read(await fs.lookup("/tiny_dir/a"), 0, 10) == b"a"
    slow = await fs.inode(await fs.lookup("/slow", follow=False))
    assert slow.inline_data  # a 89-byte target is stored inline, not in a block
    assert await fs.readlink(slow.ino) == LONG_TARGET
    assert await fs.lookup("/slow") == await fs.lookup("/hello.txt")


async def test_inline_directory_spilling_into_xattr(
    build: Callable[[str], Path], tmp_path: Path
) -> None:
    """mke2fs turns a directory into a block once i_block is full; the kernel instead
    continues it in the system.data attribute.  Craft that with debugfs."""
    image = copy_image(build("ext4-4k-inline"), tmp_path / "i.img")
    fs = await Image.load(image).open()
    d1 = await fs.lookup("/d1")
    name = b"spilled"
    area = struct.pack("<IHBB", d1, 40, len(name), 2) + name
    (tmp_path / "value").write_bytes(area + bytes(40 - len(area)))
    debugfs(image, f"ea_set -f {tmp_path / 'value'} /tiny_dir system.data", write=True)
    debugfs(image, "sif /tiny_dir size 100", write=True)
    fs = await Image.load(image).open()
    tiny = await fs.inode(await fs.lookup("/tiny_dir"))
    assert tiny.inline_data and tiny.inline_xattr and len(tiny.inline_xattr) == 40
    assert sorted(e.name for e in await fs.readdir(tiny.ino)) == ["a", "spilled"]
    assert await fs.lookup("/tiny_dir/spilled/hard") == await fs.lookup("/hello.txt")


# ------------------------------------------------------------------------------ paths, symlinks


@pytest.mark.parametrize("config", ["ext2-1k", "ext4-4k"])
async def test_paths_and_symlinks(config: str, build: Callable[[str], Path]) -> None:
    fs = await Image.load(build(config)).open()
    hello = await fs.lookup("/hello.txt")
    root = await fs.lookup("/")
    assert root == 2
    for path in ("fast", "/slow", "/chain1", "/d1/hard", "/d1/d2/rel_up", "hello.txt",
                 "/./d1/../hello.txt", "/../../hello.txt", "/linkdir/../../hello.txt",
                 "/sizes/to_dir/hello.txt", "//hello.txt"):  # fmt: skip
        assert await fs.lookup(path) == hello, path
    assert await fs.lookup("/fast", follow=False) != hello
    assert await fs.readlink(await fs.lookup("/fast", follow=False)) == "hello.txt"
    assert await fs.readlink(await fs.lookup("/slow", follow=False)) == LONG_TARGET
    deep = await fs.lookup("/d1/d2/d3/deep.bin")
    assert await fs.lookup("/abs") == deep
    assert await fs.lookup("/linkdir/d3/deep.bin") == deep
    assert await fs.lookup("/d1/dirlink_abs/deep.bin") == deep
    assert await fs.lookup("/linkdir/..") == await fs.lookup("/d1")
    assert await fs.lookup("/linkdir") == await fs.lookup("/d1/d2")
    assert (await fs.inode(await fs.lookup("/linkdir", follow=False))).is_symlink
    assert await fs.lookup("/dir with space/h\u00e9llo w\u00f6rld.txt") > 0
    assert await fs.lookup("/d1/" + "n" * 255) > 0

    for loop in ("/loop1", "/self", "/loop2/x"):
        with pytest.raises(Ext2SymlinkLoop, match="too many levels of symbolic links"):
            await fs.lookup(loop)
    assert MAX_SYMLINK_FOLLOWS == 40
    assert await fs.lookup("/loop1", follow=False) > 0
    with pytest.raises(Ext2NotFound, match="nowhere"):
        await fs.lookup("/dangling")
    with pytest.raises(Ext2NotFound, match="'missing'"):
        await fs.lookup("/d1/missing")
    with pytest.raises(Ext2NotFound):
        await fs.lookup("/d1/" + "n" * 256)
    for bad in ("/hello.txt/x", "/hello.txt/..", "/hello.txt/", "/fast/."):
        with pytest.raises(Ext2NotADirectory, match="not a directory"):
            await fs.lookup(bad)
    with pytest.raises(Ext2NotRegularFile, match="is a directory"):
        await fs.resolve_regular("/d1")
    with pytest.raises(Ext2NotRegularFile, match="FIFO"):
        await fs.resolve_regular("/fifo")
    assert (await fs.resolve_regular("/chain1")).ino == hello
    with pytest.raises(FormatError, match="not a symbolic link"):
        await fs.readlink(hello)
    names = {e.name for e in await fs.readdir(root)}
    assert {"hello.txt", "d1", "fifo", "lost+found", "slow"} <= names
    assert "." not in names and ".." not in names


# ------------------------------------------------------------------------------ htree

BIGDIR_ENTRIES = 5200


def bigdir_names() -> list[str]:
    rng = random.Random(11)
    names = [f"entry_{i:05d}_{rng.randrange(1 << 30):x}" for i in range(BIGDIR_ENTRIES - 200)]
    # Bytes >= 0x80 make signed and unsigned hash variants differ.
    names += [f"\u00e9l\u00e8ve-{i}-\u00fc\u00f1\u00ee" for i in range(200)]
    return names


HTREE_CONFIGS = {
    # name: (fstype, block size, features, hash_alg, unsigned)
    "ext4-4k-half_md4": ("ext4", 4096, "metadata_csum,64bit", "half_md4", False),
    "ext4-1k-tea-unsigned": ("ext4", 1024, "metadata_csum", "tea", True),
    "ext2-1k-legacy": ("ext2", 1024, "", "legacy", False),
    "ext3-4k-legacy-unsigned": ("ext3", 4096, "", "legacy", True),
    "ext2-4k-tea": ("ext2", 4096, "", "tea", False),
}


@pytest.fixture(scope="session")
def htree_image(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    src = tmp_path_factory.mktemp("htree_src")
    (src / "bigdir").mkdir()
    for name in bigdir_names():
        (src / "bigdir" / name).write_bytes(name.encode()[:7])
    cache: dict[str, Path] = {}

    def get(config: str) -> Path:
        if config not in cache:
            fstype, bs, features, alg, unsigned = HTREE_CONFIGS[config]
            image = tmp_path_factory.mktemp("htree") / f"{config}.img"
            size = "48M" if bs > 1024 else "24M"
            mkfs(image, src, fstype, bs, features, size, ("-N", "8192"))
            debugfs(image, f"ssv def_hash_version {alg}", write=True)
            if unsigned:
                debugfs(image, "ssv flags 2", write=True)
            # mke2fs -d writes linear directories: e2fsck -D indexes them with that hash.
            run(E2FSCK, "-fyD", image, ok=(0, 1))
            cache[config] = image
        return cache[config]

    return get


@pytest.mark.parametrize("config", list(HTREE_CONFIGS))
async def test_htree_lookup_reads_few_blocks(
    config: str, htree_image: Callable[[str], Path]
) -> None:
    image = htree_image(config)
    _fstype, bs, _features, alg, _unsigned = HTREE_CONFIGS[config]
    dump = debugfs(image, "htree /bigdir")
    version = int(re.search(r"Hash Version: (\d+)", dump).group(1))  # type: ignore[union-attr]
    levels = int(re.search(r"Indirect levels: (\d+)", dump).group(1))  # type: ignore[union-attr]
    assert version == {"legacy": 0, "half_md4": 1, "tea": 2}[alg]
    if bs == 1024:
        assert levels == 1  # a two-level tree: root, interior nodes, leaves
    img = Image.load(image)
    fs = await img.open()
    bigdir = await fs.inode(await fs.lookup("/bigdir"))
    assert bigdir.flags & 0x1000, "directory is not indexed"
    nblocks = bigdir.size // bs
    assert nblocks > 30
    names = bigdir_names()
    for name in (names[4321], names[-7], names[0]):
        fs = await img.open()
        assert await fs.lookup("/bigdir") == bigdir.ino  # caches the root directory
        await fs.extents(bigdir.ino)
        img.reads.clear()
        ino = await fs.lookup(f"/bigdir/{name}")
        dir_reads = len(img.reads) - 1  # minus the inode-table chunk of the found inode
        assert dir_reads <= levels + 2, img.reads
        assert await fs.read(ino, 0, 100) == name.encode()[:7]
        img.reads.clear()
        with pytest.raises(Ext2NotFound):
            await fs.lookup(f"/bigdir/{name}.missing")
        assert len(img.reads) <= levels + 2
    # Every name is found by hash lookup, with the inode the linear listing gives.
    listing = {e.name: e.ino for e in await fs.readdir(bigdir.ino)}
    assert sorted(listing) == sorted(names)
    for name in names[::7]:
        assert await fs.lookup(f"/bigdir/{name}") == listing[name]


async def test_htree_hash_collision_continues_into_next_leaf(
    htree_image: Callable[[str], Path],
) -> None:
    """Mark the second leaf as a collision continuation of the first (hash | 1) for one
    name's hash: the lookup must read the first leaf, miss, and go on to the second."""
    image = htree_image("ext2-4k-tea")
    root = bmap(image, "/bigdir", 0, 4096)
    img = Image.load(image)
    seed = struct.unpack_from("<4I", img.data, 1024 + 0xEC)
    count = struct.unpack_from("<H", img.data, root + 0x22)[0]
    entries = [struct.unpack_from("<II", img.data, root + 0x20 + 8 * i) for i in range(count)]
    lo, hi = entries[1][0], entries[2][0]
    in_leaf1 = [(h, n) for n in bigdir_names() if lo <= (h := dx_hash(n.encode(), 2, seed)[0]) < hi]
    h, name = max(in_leaf1)
    struct.pack_into("<I", img.data, root + 0x28, h | 1)
    fs = await img.open()
    img.reads.clear()
    assert await fs.lookup(f"/bigdir/{name}") > 0
    leaf_reads = [r for r in img.reads if r[1] == 4096]
    assert len(leaf_reads) >= 3  # root (or cached), the first leaf, then the continuation
    struct.pack_into("<I", img.data, root + 0x28, h + 2)  # no collision bit: not found
    fs = await img.open()
    with pytest.raises(Ext2NotFound):
        await fs.lookup(f"/bigdir/{name}")


def test_dx_hash_matches_debugfs(tmp_path: Path) -> None:
    rng = random.Random(99)
    names = [b"a", b"hello", b"x" * 31, b"y" * 32, b"z" * 33, b"w" * 255, "h\u00e9llo".encode()]
    for _ in range(40):
        # (no leading '-': debugfs would take the name for an option)
        names.append(b"n" + bytes(rng.choice(b"abcXYZ019_-.\xc3\xa9\xff\x80") for _ in range(
            rng.randrange(0, 90))))  # fmt: skip
    seeds = [uuid.UUID(int=0), uuid.UUID("4f4dfc00-4df7-40e2-be76-fc56b066d309")]
    cases = [(n, v, s) for n in names for v in range(6) for s in seeds]
    cmds = tmp_path / "cmds"
    with open(cmds, "wb") as f:
        for name, version, seed in cases:
            f.write(b'dx_hash -h %d -s %s "%s"\n' % (version, str(seed).encode(), name))
    out = subprocess.run([DEBUGFS, "-f", str(cmds)], env=ENV, capture_output=True).stdout
    results = re.findall(rb"is (0x[0-9a-f]+) \(minor (0x[0-9a-f]+)\)", out)
    assert len(results) == len(cases)
    for (name, version, seed), (major, minor) in zip(cases, results, strict=True):
        words = struct.unpack("<4I", seed.bytes)
        assert dx_hash(name, version, words) == (int(major, 16), int(minor, 16)), (
            name, version, seed,
        )  # fmt: skip


# ------------------------------------------------------------------------------ FileMap


def test_filemap_lookup_matches_brute_force() -> None:
    rng = random.Random(1)
    bs = 1024
    for _ in range(50):
        runs = []
        lblk = rng.randrange(0, 4)
        for _ in range(rng.randrange(0, 30)):
            length = rng.randrange(1, 6)
            runs.append((lblk, length, rng.randrange(10, 100000)))
            lblk += length + rng.randrange(0, 4)
        size = rng.randrange(0, (lblk + 3) * bs)
        fmap = FileMap(size, bs, runs)
        where: list[int | None] = [None] * size
        for start, length, phys in runs:
            for b in range(length):
                for k in range(bs):
                    pos = (start + b) * bs + k
                    if pos < size:
                        where[pos] = (phys + b) * bs + k
        for _ in range(20):
            off = rng.randrange(0, size + 2 * bs)
            length = rng.randrange(0, 6 * bs)
            segs = fmap.lookup(off, length)
            covered = []
            pos = off
            for seg in segs:
                assert seg.offset == pos and seg.length > 0
                for k in range(seg.length):
                    expect = None if seg.physical is None else seg.physical + k
                    covered.append(expect)
                pos += seg.length
            assert covered == where[off : min(off + length, size)]
            # physical(): the start of the range exactly when one run stores all of it
            one_run = (
                0 < length and off + length <= size and len(segs) == 1
                and segs[0].physical is not None
            )  # fmt: skip
            assert fmap.physical(off, length) == (segs[0].physical if one_run else None)
            # adjacent hole segments never repeat
            assert all(not (a.physical is None and b.physical is None)
                       for a, b in itertools.pairwise(segs))  # fmt: skip


# ------------------------------------------------------------------------------ refusals


def copy_image(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def fix_superblock_checksum(img: Image) -> None:
    sb = img.data[1024:2048]
    raw = crc32c.crc32c(bytes(sb[:0x3FC])) ^ 0xFFFFFFFF  # ext4 keeps the uninverted register
    img.data[1024 + 0x3FC : 1024 + 0x400] = struct.pack("<I", raw)


@pytest.mark.parametrize(
    ("feature", "exc", "match"),
    [
        ("FEATURE_I11", Ext2Unsupported, "FEATURE_I11"),
        ("encrypt", Ext2Unsupported, "encrypt"),
        ("needs_recovery", Ext2Unsupported, "needs_recovery"),
        ("compression", Ext2Unsupported, "compression"),
    ],
)
async def test_incompatible_features_refused(
    feature: str, exc: type[Exception], match: str, build: Callable[[str], Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    image = copy_image(build("ext4-4k"), tmp_path / "f.img")
    debugfs(image, f"feature {feature}", write=True)
    with pytest.raises(exc, match=match):
        await Image.load(image).open()


async def test_needs_recovery_allowed_read_only(
    build: Callable[[str], Path], tmp_path: Path, src_tree: Path
) -> None:
    image = copy_image(build("ext4-4k"), tmp_path / "r.img")
    debugfs(image, "feature needs_recovery", write=True)
    fs = await Image.load(image).open(allow_needs_recovery=True)
    assert fs.needs_recovery
    assert fs.read_only_reason is not None and "recovery" in fs.read_only_reason
    ino = await fs.lookup("/d1/d2/d3/deep.bin")
    assert await fs.read(ino, 0, 1 << 20) == (src_tree / "d1/d2/d3/deep.bin").read_bytes()


async def test_unknown_ro_compat_feature_means_read_only(
    build: Callable[[str], Path], tmp_path: Path
) -> None:
    image = copy_image(build("ext4-4k"), tmp_path / "ro.img")
    debugfs(image, "feature FEATURE_R20", write=True)
    fs = await Image.load(image).open()
    assert fs.read_only_reason is not None and "FEATURE_R20" in fs.read_only_reason
    assert "FEATURE_R20" in str(fs.features)
    assert await fs.lookup("/hello.txt") > 0


async def test_encrypted_inode_refused(build: Callable[[str], Path], tmp_path: Path) -> None:
    image = copy_image(build("ext4-4k"), tmp_path / "e.img")
    debugfs(image, "sif /hello.txt flags 0x80800", write=True)
    fs = await Image.load(image).open()
    ino = await fs.lookup("/hello.txt")
    with pytest.raises(Ext2Unsupported, match=f"inode {ino} is encrypted"):
        await fs.read(ino, 0, 10)


# ------------------------------------------------------------------------------ corruption


def imap(image: Path, path: str, bs: int) -> int:
    """Byte offset of ``path``'s inode, from debugfs."""
    out = debugfs(image, f"imap {path}")
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", out)
    assert m, out
    return int(m.group(1)) * bs + int(m.group(2), 16)


def bmap(image: Path, path: str, lblk: int, bs: int) -> int:
    return int(debugfs(image, f"bmap {path} {lblk}").strip()) * bs


async def test_bad_magic(build: Callable[[str], Path]) -> None:
    img = Image.load(build("ext2-4k"))
    img.data[1024 + 0x38 : 1024 + 0x3A] = b"\x00\x00"
    with pytest.raises(FormatError, match=r"bad superblock magic 0x0000 at byte offset 1080"):
        await img.open()


async def test_superblock_checksum(build: Callable[[str], Path]) -> None:
    img = Image.load(build("ext4-4k"))
    img.flip(1024 + 0x78)  # the volume name
    with pytest.raises(Ext2ChecksumError, match="superblock at byte offset 1024: checksum"):
        await img.open()
    fix_superblock_checksum(img)
    await img.open()  # a valid checksum again: the reader agrees with crc32c
    img.data[1024 + 0x175] = 2  # s_checksum_type: only 1 (crc32c) exists
    with pytest.raises(Ext2Unsupported, match=r"^superblock at byte offset 1024: .*type 2"):
        await img.open()


async def test_superblock_nonsense_fields(build: Callable[[str], Path]) -> None:
    for offset, value, match in [
        (0x18, 9, "s_log_block_size 9"),
        (0x28, 0, "0 inodes per group"),
        (0x4, 1 << 30, "truncated"),
    ]:
        img = Image.load(build("ext2-4k"))
        struct.pack_into("<I", img.data, 1024 + offset, value)
        with pytest.raises(FormatError, match=match):
            await img.open()
    img = Image.load(build("ext2-4k"))
    with pytest.raises(FormatError, match="truncated"):
        await Ext2FS.open(img.pread, len(img.data) // 2)


async def test_short_pread_is_a_format_error(build: Callable[[str], Path]) -> None:
    img = Image.load(build("ext2-4k"))

    async def short(offset: int, length: int) -> bytes:
        return (await img.pread(offset, length))[:-1]

    match = r"^short read of the superblock: asked for 1024 bytes at offset 1024, got 1023$"
    with pytest.raises(FormatError, match=match):
        await Ext2FS.open(short, len(img.data))


async def test_group_descriptor_corruption(build: Callable[[str], Path]) -> None:
    img = Image.load(build("ext4-4k"))  # metadata_csum: crc32c
    img.flip(4096 + 0x0C)  # group 0's free block count
    with pytest.raises(Ext2ChecksumError, match="group descriptor 0 at byte offset 4096"):
        await img.open()
    img = Image.load(build("ext4-4k-32bit-uninit_bg"))  # crc16
    img.flip(4096 + 0x0C)
    with pytest.raises(Ext2ChecksumError, match="group descriptor 0"):
        await img.open()
    img = Image.load(build("ext2-4k"))  # no checksum: the inode table pointer is checked
    struct.pack_into("<I", img.data, 4096 + 0x8, 0xFFFFFF00)
    with pytest.raises(FormatError, match=r"group descriptor 0 .*inode table.*outside"):
        await img.open()


async def test_inode_corruption(build: Callable[[str], Path]) -> None:
    image = build("ext4-4k")
    offset = imap(image, "/hello.txt", 4096)
    img = Image.load(image)
    img.flip(offset + 0x10)  # i_mtime
    fs = await img.open()
    with pytest.raises(Ext2ChecksumError, match=rf"inode \d+ at byte offset {offset}: checksum"):
        await fs.lookup("/hello.txt")
    image = build("ext2-4k")
    offset = imap(image, "/hello.txt", 4096)
    img = Image.load(image)
    struct.pack_into("<H", img.data, offset, 0o170644)
    fs = await img.open()
    with pytest.raises(FormatError, match="invalid file type 0o170000"):
        await fs.lookup("/hello.txt")


async def test_extent_header_corruption(build: Callable[[str], Path], tmp_path: Path) -> None:
    image = copy_image(build("ext4-4k"), tmp_path / "x.img")
    debugfs(image, "sif /sizes/size_100000 block[0] 0x0001f30b", write=True)  # checksum fixed
    fs = await Image.load(image).open()
    ino = await fs.lookup("/sizes/size_100000")
    with pytest.raises(FormatError, match=rf"inode {ino}: extent tree root .*bad extent header "
                                          r"magic 0xf30b"):  # fmt: skip
        await fs.read(ino, 0, 10)
    image = build("ext4-4k-32bit-uninit_bg")  # no inode checksum: flip the magic directly
    offset = imap(image, "/sizes/size_100000", 4096)
    img = Image.load(image)
    img.flip(offset + 0x28)
    fs = await img.open()
    ino = await fs.lookup("/sizes/size_100000")
    with pytest.raises(FormatError, match="bad extent header magic"):
        await fs.extents(ino)


def extent_leaf_block(image: Path, path: str) -> int:
    line = debugfs(image, f"ex {path}").splitlines()[1].split()
    assert line[0] == "0/" and line[1] == "1", line  # the index entry in the inode
    return int(line[7])  # its physical block: the leaf


async def test_extent_block_corruption(build: Callable[[str], Path]) -> None:
    image = build("ext4-4k")
    leaf = extent_leaf_block(image, "/sparse_many")
    img = Image.load(image)
    img.flip(leaf * 4096 + 12 + 4)  # the first extent's length
    fs = await img.open()
    with pytest.raises(Ext2ChecksumError, match=rf"extent block {leaf} .*checksum mismatch"):
        await fs.extents(await fs.lookup("/sparse_many"))
    image = build("ext4-4k-32bit-uninit_bg")
    leaf = extent_leaf_block(image, "/sparse_many")
    img = Image.load(image)
    img.flip(leaf * 4096)
    fs = await img.open()
    with pytest.raises(FormatError, match=rf"extent block {leaf} .*bad extent header magic"):
        await fs.extents(await fs.lookup("/sparse_many"))


@pytest.mark.parametrize("pointer", ["DIND", "TIND"])
async def test_block_map_pointing_back_at_itself_is_refused(pointer: str, tmp_path: Path) -> None:
    """Indirect blocks that all point at one block full of its own number would map it
    tens of thousands (1 KiB blocks, double indirection) to millions (triple) of times;
    the map is refused once the file uses more blocks than the file system has."""
    src = tmp_path / "src"
    write(src / "f", random.Random(9).randbytes(20_000))  # 12 direct blocks, then IND
    image = mkfs(tmp_path / "self.img", src, "ext2", 1024, "", "2M")
    fs = await Image.load(image).open()
    ino = await fs.lookup("/f")
    ind = struct.unpack("<15I", (await fs.inode(ino)).i_block)[12]
    debugfs(image, f"sif /f block[{pointer}] {ind}", write=True)
    debugfs(image, f"sif /f size {16 << 30}", write=True)  # 16.7M blocks
    img = Image.load(image)
    img.data[ind * 1024 : (ind + 1) * 1024] = struct.pack("<256I", *[ind] * 256)
    fs = await img.open()
    match = rf"inode {ino}: indirect block {ind}: the file uses more blocks than the file system "
    with pytest.raises(FormatError, match=match + r"has \(2048\)"):
        await fs.extents(ino)


async def test_extents_mapping_the_same_blocks_again_are_refused(tmp_path: Path) -> None:
    """Three extents over the same 1000 blocks: 3000 blocks of a 2048-block file system.
    (A directory mapped that way, with a deeper tree, would be read many times over.)"""
    src = tmp_path / "src"
    write(src / "f", random.Random(9).randbytes(20_000))
    image = mkfs(tmp_path / "x.img", src, "ext4", 1024, "^metadata_csum,^has_journal", "2M")
    offset = imap(image, "/f", 1024)
    img = Image.load(image)
    root = struct.pack("<HHHHI", 0xF30A, 3, 4, 0, 0) + b"".join(
        struct.pack("<IHHI", 1000 * k, 1000, 0, 1) for k in range(3)
    )
    img.data[offset + 0x28 : offset + 0x28 + len(root)] = root
    struct.pack_into("<I", img.data, offset + 0x4, 3000 * 1024)  # i_size
    fs = await img.open()
    ino = await fs.lookup("/f")
    match = rf"inode {ino}: extent tree root in i_block: extent 2: the file uses more blocks "
    with pytest.raises(FormatError, match=match + "than the file system has"):
        await fs.extents(ino)


async def test_directory_block_corruption(build: Callable[[str], Path]) -> None:
    image = build("ext4-4k")
    offset = bmap(image, "/d1", 0, 4096)
    img = Image.load(image)
    img.flip(offset + 24 + 8)  # inside the third entry's name
    fs = await img.open()
    match = rf"directory inode \d+ block 0 \(byte offset {offset}\): directory block checksum"
    with pytest.raises(Ext2ChecksumError, match=match):
        await fs.lookup("/d1/hard")
    image = build("ext2-4k")  # no checksum: an impossible record length
    offset = bmap(image, "/d1", 0, 4096)
    img = Image.load(image)
    struct.pack_into("<H", img.data, offset + 4, 3)
    fs = await img.open()
    with pytest.raises(FormatError, match="invalid record length 3"):
        await fs.lookup("/d1/hard")


async def test_htree_corruption(htree_image: Callable[[str], Path]) -> None:
    image = htree_image("ext4-4k-half_md4")
    offset = bmap(image, "/bigdir", 0, 4096)
    img = Image.load(image)
    img.flip(offset + 0x2A)  # the hash of the second index entry
    fs = await img.open()
    with pytest.raises(Ext2ChecksumError, match="htree node checksum mismatch"):
        await fs.lookup("/bigdir/" + bigdir_names()[10])
    image = htree_image("ext2-4k-tea")
    offset = bmap(image, "/bigdir", 0, 4096)
    img = Image.load(image)
    struct.pack_into("<H", img.data, offset + 0x20, 3)  # the root's limit
    fs = await img.open()
    with pytest.raises(FormatError, match=r"htree node has count .* limit 3"):
        await fs.lookup("/bigdir/" + bigdir_names()[10])


# ------------------------------------------------------------------------------ fuzzing


FUZZ_PATHS = ["/hello.txt", "/fast", "/slow", "/d/sub/f0", "/big/n_0042", "/sparse", "/loop"]


def build_fuzz_tree(root: Path) -> None:
    rng = random.Random(42)
    write(root / "hello.txt", b"hello\n")
    write(root / "d/sub/f0", rng.randbytes(3000))
    write(root / "d/sub/f1", rng.randbytes(20_000))
    for i in range(120):
        write(root / f"big/n_{i:04d}", b"")
    write_sparse(root / "sparse", 40 * 8192, [(i * 8192, 4096) for i in range(40)], rng)
    os.symlink("hello.txt", root / "fast")
    os.symlink("d/" + "./" * 40 + "sub/f0", root / "slow")
    os.symlink("loop", root / "loop")
    os.link(root / "hello.txt", root / "d/hl")


FUZZ_CONFIGS = {
    "ext4": ("ext4", 1024, "^has_journal,^metadata_csum,^64bit,uninit_bg"),
    "ext4-csum": ("ext4", 1024, "^has_journal,metadata_csum,inline_data"),
    "ext2": ("ext2", 1024, ""),
}


@pytest.fixture(scope="session")
def fuzz_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, list[int]]]:
    src = tmp_path_factory.mktemp("fuzz_src")
    build_fuzz_tree(src)
    out = {}
    for name, (fstype, bs, features) in FUZZ_CONFIGS.items():
        image = tmp_path_factory.mktemp("fuzz") / f"{name}.img"
        mkfs(image, src, fstype, bs, features, "2M", ("-N", "256"))
        run(E2FSCK, "-fyD", image, ok=(0, 1))
        data = image.read_bytes()
        nonzero = [b for b in range(len(data) // bs) if data[b * bs : (b + 1) * bs].strip(b"\0")]
        out[name] = (data, nonzero)
    return out


async def exercise(img: Image) -> None:
    """Everything a filter would do; only FormatError may come out."""
    fs = await img.open()
    async for _path, inode in fs.iter_files():
        await fs.read(inode.ino, 0, min(inode.size, 1 << 18))
        fmap = await fs.extents(inode.ino)
        if fmap.inline is None:
            fmap.lookup(0, min(inode.size, 1 << 20))
    for path in FUZZ_PATHS:
        try:
            ino = await fs.lookup(path, follow=False)
            inode = await fs.inode(ino)
            if inode.is_symlink:
                await fs.readlink(ino)
            await fs.lookup(path)
        except FormatError:
            pass


mutation = st.tuples(
    st.integers(0, 10**6),  # which non-zero block (modulo their number)
    st.integers(0, 1023),  # offset in the block
    st.sampled_from(["xor", "small", "zero", "ff"]),
    st.integers(1, 255),
)


@pytest.mark.parametrize("config", list(FUZZ_CONFIGS))
def test_mutated_images_raise_only_format_error(
    config: str, fuzz_images: dict[str, tuple[bytes, list[int]]]
) -> None:
    data, nonzero = fuzz_images[config]
    trio.run(exercise, Image(data))  # the pristine image is fine

    @settings(max_examples=200, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(st.lists(mutation, min_size=1, max_size=6))
    def check(mutations: list[tuple[int, int, str, int]]) -> None:
        img = Image(data)
        for which, offset, kind, value in mutations:
            pos = nonzero[which % len(nonzero)] * 1024 + offset
            if kind == "xor":
                img.data[pos] ^= value
            elif kind == "small":  # a plausible little-endian number: counts, pointers
                img.data[pos : pos + 4] = struct.pack("<I", value)[: len(img.data) - pos]
            elif kind == "zero":
                img.data[pos] = 0
            else:
                img.data[pos] = 0xFF
        try:
            trio.run(exercise, img)
        except FormatError:
            pass

    check()


# ------------------------------------------------------------------------------ misc


async def test_pread_counts_when_listing(build: Callable[[str], Path]) -> None:
    """Listing reads inode tables in chunks: far fewer preads than inodes."""
    img = Image.load(build("ext4-4k"))
    fs = await img.open()
    count = 0
    async for _ in fs.iter_files():
        count += 1
    assert count >= 20
    assert len(img.reads) < count


async def test_listing_skips_damaged_entries_with_on_error(build: Callable[[str], Path]) -> None:
    """With on_error, a corrupt inode or directory is reported and skipped; the rest of the
    tree is listed.  Without it, the listing fails at the first damage."""
    image = build("ext4-4k")
    inode_offset = imap(image, "/hello.txt", 4096)
    dir_offset = bmap(image, "/d1/d2", 0, 4096)
    img = Image.load(image)
    img.flip(inode_offset + 0x10)  # i_mtime: the inode checksum no longer matches
    img.flip(dir_offset + 24 + 8)  # a name in /d1/d2: the block checksum no longer matches
    fs = await img.open()
    with pytest.raises(Ext2ChecksumError):
        async for _ in fs.iter_files():
            pass
    errors: list[tuple[str, FormatError]] = []
    listed = [p async for p, _ in fs.iter_files(lambda p, e: errors.append((p, e)))]
    # root's files first, then its subdirectories; /d1/hard is the same damaged inode
    assert [p for p, _ in errors] == ["/hello.txt", "/d1/hard", "/d1/d2"]
    assert all(isinstance(e, Ext2ChecksumError) for _, e in errors)
    intact = [p async for p, _ in (await Image.load(image).open()).iter_files()]
    lost = {"/hello.txt", "/d1/hard", "/d1/d2/hard2", "/d1/d2/d3/deep.bin"}
    assert listed == [p for p in intact if p not in lost]


async def test_check_group_descriptors_reads_every_group(build: Callable[[str], Path]) -> None:
    image = build("ext4-1k")  # 32 MiB in 1 KiB blocks: 4 groups; 64-byte descriptors at 2048
    img = Image.load(image)
    fs = await img.open()
    assert fs.groups_count == 4
    await fs.check_group_descriptors()
    img.flip(2048 + 3 * 64 + 0x0C)  # group 3's free block count
    fs = await img.open()  # the root inode lives in group 0: opening does not notice
    with pytest.raises(Ext2ChecksumError, match="group descriptor 3 at byte offset 2240"):
        await fs.check_group_descriptors()
