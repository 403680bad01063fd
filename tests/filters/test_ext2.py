"""The ext2 filter: files inside ext2/ext3/ext4 images served by the real ``trionbd``
command and read back with real clients (nbdinfo, nbdcopy, nbdsh, qemu-io).

Every image is made here with ``mke2fs -d SRC``; every byte served is compared with the
source tree, block status with the source's SEEK_DATA/SEEK_HOLE map, and after writes
the image is checked with ``debugfs -R "cat /f"`` and ``e2fsck -fn``. Damage is made at
offsets found with debugfs. The hash-indexed directory of 5 200 files is listed in full
and every 13th file is read (one connection per file costs about 2 ms).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.chain.raw_client import RawClient
from tests.formats.test_ext2 import (
    DEBUGFS,
    E2FSCK,
    ENV,
    MKE2FS,
    bmap,
    copy_image,
    debugfs,
    imap,
    mkfs,
    source_data_ranges,
    source_files,
)
from tests.formats.test_ext2 import run as e2run
from tests.server.nbdclient import connect
from tests.support import (
    Running,
    libnbd_python,
    listing,
    nbdsh,
    read_export,
    run,
    serving,
    trionbd_exit,
    trionbd_process,
)
from trionbd.chain import Chain
from trionbd.filters.ext2 import Ext2Filter
from trionbd.nursery import open_lifetime
from trionbd.plugins.file import FilePlugin
from trionbd.protocol import Cmd, ErrorChunk, HoleChunk
from trionbd.protocol.constants import CmdFlag, Err, Rep, TransmissionFlag

pytestmark = pytest.mark.skipif(
    not all(os.access(p, os.X_OK) for p in (MKE2FS, DEBUGFS, E2FSCK)),
    reason="e2fsprogs (mke2fs, debugfs, e2fsck) is not installed",
)

KiB, MiB = 1 << 10, 1 << 20
EXT2 = "--filter=ext2"
BIGDIR_FILES = 5200

# name: (fstype, block size, mke2fs -O features)
CONFIGS = {
    "ext2-1k": ("ext2", 1024, ""),
    "ext2-4k": ("ext2", 4096, ""),
    "ext3-1k": ("ext3", 1024, ""),
    "ext3-4k": ("ext3", 4096, ""),
    "ext4-1k": ("ext4", 1024, "64bit,metadata_csum"),
    "ext4-4k": ("ext4", 4096, "64bit,metadata_csum"),
    "ext4-1k-blockmap": ("ext4", 1024, "^extent,^64bit"),
    "ext4-4k-blockmap": ("ext4", 4096, "^extent,^64bit,metadata_csum"),
    "ext4-4k-inline": ("ext4", 4096, "inline_data,metadata_csum"),
    "ext4-1k-inline": ("ext4", 1024, "inline_data,^metadata_csum"),
}

SYMLINKS = {  # link -> target, as stored; resolved inside the file system
    "fast": "hello.txt",
    "slow": "./" * 40 + "hello.txt",  # 89 bytes: too long for i_block
    "abs": "/d1/d2/deep.bin",
    "chain1": "chain2",
    "chain2": "chain3",
    "chain3": "fast",
    "linkdir": "d1/d2",
    "d1/d2/rel_up": "../../hello.txt",
    "loop1": "loop2",
    "loop2": "loop1",
    "self": "self",
    "dangling": "nowhere",
}
# export name -> the source file it must read as
VIA_LINKS = {
    "fast": "hello.txt",
    "slow": "hello.txt",
    "abs": "d1/d2/deep.bin",
    "chain1": "hello.txt",
    "linkdir/deep.bin": "d1/d2/deep.bin",
    "/d1/d2/rel_up": "hello.txt",
    "d1/./d2/../d2/deep.bin": "d1/d2/deep.bin",
}
# export name -> what the refusal says
REFUSED = {
    "d1": "is a directory",
    "/": "is a directory",
    "linkdir": "is a directory",
    "fifo": "is a FIFO",
    "chardev": "is a character device",
    "loop1": "too many levels of symbolic links",
    "self": "too many levels of symbolic links",
    "dangling": "no entry 'nowhere'",
    "missing": "no entry 'missing'",
    "hello.txt/x": "not a directory",
}


# ------------------------------------------------------------------------------ the source


def write_random(root: Path, rel: str, size: int, rng: random.Random) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(rng.randbytes(size))


def write_sparse(root: Path, rel: str, regions: list[tuple[int, int]], rng: random.Random) -> None:
    """Random data at ``(offset, length)`` regions, holes between; no trailing hole
    (mke2fs -O inline_data drops a trailing hole from the size)."""
    with open(root / rel, "wb") as f:
        for offset, length in regions:
            f.seek(offset)
            f.write(rng.randbytes(length))


def build_source(root: Path) -> None:
    rng = random.Random(20250601)
    (root / "hello.txt").write_bytes(b"hello from inside ext2\n")
    (root / "empty").write_bytes(b"")
    for n in (1, 59, 60, 150, 4095, 4097, 100_000):
        write_random(root, f"sizes/s{n}", n, rng)
    write_random(root, "d1/d2/deep.bin", 300_000, rng)
    write_random(root, "dir with space/na\u00efve \u00fc.txt", 5000, rng)
    # 300 data regions: an extent tree of depth 1 (the inode holds only 4 extents)
    write_sparse(root, "sparse_many", [(i * 64 * KiB, 4 * KiB) for i in range(300)], rng)
    # data beyond 4 MiB + 48 KiB needs double indirection with block maps of 4 KiB blocks
    write_sparse(root, "sparse_big", [(0, 64 * KiB), (1 * MiB, 8 * KiB), (5 * MiB, 4 * KiB),
                                      (9 * MiB, 12 * KiB)], rng)  # fmt: skip
    os.link(root / "hello.txt", root / "d1/hard")
    for link, target in SYMLINKS.items():
        os.symlink(target, root / link)
    os.mkfifo(root / "fifo")
    os.mknod(root / "chardev", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "empty_dir").mkdir()


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ext2src") / "tree"
    root.mkdir()
    build_source(root)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, src: Path) -> Callable[[str], Path]:
    """The image of a configuration, made once per module (tests copy it to change it)."""
    made: dict[str, Path] = {}

    def get(config: str) -> Path:
        if config not in made:
            fstype, bs, features = CONFIGS[config]
            image = tmp_path_factory.mktemp("ext2img") / f"{config}.img"
            made[config] = mkfs(image, src, fstype, bs, features)
        return made[config]

    return get


# ------------------------------------------------------------------------------ clients


UTC_RE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
"""How a description shows an mtime."""


def utc_text(mtime: float) -> str:
    """An mtime as descriptions show it (whole seconds, UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(mtime)))


def exports_by_name(uri: str) -> dict[str, dict[str, Any]]:
    """``nbdinfo --list --json``: every export by name."""
    return {e["export-name"]: e for e in listing(uri)}


def served_data_ranges(uri: str) -> list[tuple[int, int]]:
    """Data ranges from ``nbdinfo --map`` (base:allocation), neighbours merged."""
    out: list[tuple[int, int]] = []
    for e in json.loads(run(["nbdinfo", "--map", "--json", uri])):
        if e["type"] & 1:  # hole
            continue
        start, end = e["offset"], e["offset"] + e["length"]
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def refusal(server: Running, name: str) -> str:
    """The message of the ERR_UNKNOWN reply to INFO for ``name``."""
    with RawClient(server.socket) as client:
        result = client.info(name)
    assert result.reply == Rep.ERR_UNKNOWN, (name, result)
    return result.message


def is_inline(image: Path, path: str) -> bool:
    flags = re.search(r"Flags: (0x[0-9a-f]+)", debugfs(image, f'stat "{path}"'))
    assert flags, path
    return bool(int(flags.group(1), 16) & 0x10000000)


def debugfs_cat(image: Path, path: str) -> bytes:
    """The file's bytes as e2fsprogs reads them."""
    result = subprocess.run(
        [DEBUGFS, "-R", f"cat {path}", str(image)], capture_output=True, env=ENV, check=True
    )
    return result.stdout


def trionbd_fails(*args: str) -> str:
    """Run ``trionbd ARGS``, which must exit with status 1 at start-up; its stderr."""
    result = trionbd_exit(*args, timeout=120)
    assert result.returncode == 1, result.stderr
    return result.stderr


# ------------------------------------------------------------------------------ every config


@pytest.fixture(scope="module", params=list(CONFIGS))
def served(request: pytest.FixtureRequest, images: Callable[[str], Path]) -> Iterator[Any]:
    """``(config, image, server)``: the image served without ext2file."""
    config: str = request.param
    image = images(config)
    with trionbd_process("file", str(image), EXT2) as server:
        yield config, image, server


def test_nbdinfo_lists_every_regular_file_with_size_and_mode(served: Any, src: Path) -> None:
    config, image, server = served
    exports = exports_by_name(server.uri)
    expected = source_files(src)  # hard links included, symlinks and the rest not
    assert sorted(exports) == sorted(expected)
    assert "/d1/hard" in exports and "/fifo" not in exports and "/fast" not in exports
    for name, e in exports.items():
        st = expected[name].lstat()
        assert e["export-size"] == st.st_size, name
        assert e["description"] == (
            f"regular file, {st.st_size} byte{'' if st.st_size == 1 else 's'}, "
            f"mode {stat.S_IMODE(st.st_mode):04o}, mtime {utc_text(st.st_mtime)}"
        )
        assert e["can_trim"] is False and e["can_flush"] is True
        inline = "inline" in config and is_inline(image, name)
        assert e["is_read_only"] is inline, name
        assert e["can_zero"] is not inline, name
    assert "inline" not in config or exports["/hello.txt"]["is_read_only"]


def test_every_file_reads_back_with_nbdcopy(served: Any, src: Path, tmp_path: Path) -> None:
    _config, _image, server = served
    for name, path in source_files(src).items():
        assert read_export(server.uri_for(name), tmp_path) == path.read_bytes(), name
    # names without the leading slash, and paths through symbolic links and '..'
    assert (
        read_export(server.uri_for("sizes/s4097"), tmp_path) == (src / "sizes/s4097").read_bytes()
    )
    for name, target in VIA_LINKS.items():
        assert read_export(server.uri_for(name), tmp_path) == (src / target).read_bytes()


def test_block_status_matches_the_source_holes(served: Any, src: Path) -> None:
    config, image, server = served
    for name, path in source_files(src).items():
        size = path.stat().st_size
        if size == 0:
            continue
        ranges = source_data_ranges(path) or [(0, size)]
        assert served_data_ranges(server.uri_for(name)) == ranges, name
    # the images really have the structures the test claims to cover
    if "blockmap" in config or config.startswith(("ext2", "ext3")):
        assert "(DIND)" in debugfs(image, "stat /sparse_big")
    else:
        levels = debugfs(image, "ex /sparse_many").splitlines()[1].split()
        assert levels[0] == "0/" and levels[1] == "1", levels  # depth 1


def test_structured_reads_of_holes_come_as_hole_chunks(served: Any, src: Path) -> None:
    _config, _image, server = served
    script = """
chunks = []
def chunk(buf, offset, status, error):
    chunks.append((offset, len(buf), status))
    return 0
h.pread_structured(256 * 1024, 60 * 1024, chunk)
print(sorted(chunks))
"""
    out = nbdsh(server.uri_for("/sparse_many"), script)
    hole, data = 2, 1  # LIBNBD_READ_HOLE, LIBNBD_READ_DATA
    assert eval(out) == [  # data 0-4K of each 64K region, holes between
        (60 * KiB, 4 * KiB, hole), (64 * KiB, 4 * KiB, data), (68 * KiB, 60 * KiB, hole),
        (128 * KiB, 4 * KiB, data), (132 * KiB, 60 * KiB, hole), (192 * KiB, 4 * KiB, data),
        (196 * KiB, 60 * KiB, hole), (256 * KiB, 4 * KiB, data), (260 * KiB, 56 * KiB, hole),
    ]  # fmt: skip


def test_links_fifos_devices_and_directories(served: Any) -> None:
    config, image, server = served
    if "inline" not in config:  # both kinds of symbolic link are covered
        assert 'Fast link dest: "hello.txt"' in debugfs(image, "stat /fast")
        assert "Fast link dest" not in debugfs(image, "stat /slow")
    for name, says in REFUSED.items():
        message = refusal(server, name)
        assert message.startswith("ext2: image ") and says in message, (name, message)
    assert "only regular files are exports" in refusal(server, "fifo")


# ------------------------------------------------------------------------------ big directory


def bigdir_content(i: int) -> bytes:
    return f"file {i}\n".encode() * (i % 7 + 1)


@pytest.fixture(scope="module")
def bigdir_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("bigsrc")
    (src / "bigdir").mkdir()
    for i in range(BIGDIR_FILES):
        (src / "bigdir" / f"file-{i:05d}-\u00e9").write_bytes(bigdir_content(i))
    image = mkfs(tmp_path_factory.mktemp("bigimg") / "big.img", src, "ext4", 4096, "", "64M")
    e2run(E2FSCK, "-fyD", image, ok=(0, 1))  # mke2fs -d writes linear directories
    return image


def test_a_directory_of_5000_entries_with_an_htree(bigdir_image: Path) -> None:
    """Every name is listed with its size; a sample of them (one connection each) is read
    back: every lookup walks the hash tree."""
    flags = re.search(r"Flags: (0x[0-9a-f]+)", debugfs(bigdir_image, "stat /bigdir"))
    assert flags and int(flags.group(1), 16) & 0x1000, "bigdir is not hash-indexed"
    names = [f"/bigdir/file-{i:05d}-\u00e9" for i in range(BIGDIR_FILES)]
    sample = [*range(0, BIGDIR_FILES, 13), BIGDIR_FILES - 1]
    script = """
import nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(URI)
listed = []
h.opt_list(lambda name, desc: listed.append((name, desc)))
h.opt_abort()
print(repr(listed))
for uri, content in READS:
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.pread(h.get_size(), 0) == content, uri
    h.shutdown()
"""
    with trionbd_process("file", str(bigdir_image), EXT2) as server:
        reads = [(server.uri_for(names[i]), bigdir_content(i)) for i in sample]
        script = script.replace("URI", repr(server.uri)).replace("READS", repr(reads))
        listed = eval(libnbd_python(script))
    assert [n for n, _ in listed] == names
    for i, (_name, desc) in enumerate(listed):
        assert re.fullmatch(
            f"regular file, {len(bigdir_content(i))} bytes, mode 0644, mtime {UTC_RE}", desc
        )


# ------------------------------------------------------------------------------ writes


def pattern(seed: int, n: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


PATTERN = "def pattern(seed, n): return bytes((i * 7 + seed) % 251 for i in range(n))\n"


@pytest.mark.parametrize("config", ["ext2-1k", "ext3-4k", "ext4-4k", "ext4-1k-blockmap"])
def test_writes_land_in_place_and_e2fsck_stays_clean(
    config: str, images: Callable[[str], Path], src: Path, tmp_path: Path
) -> None:
    bs = CONFIGS[config][1]
    image = copy_image(images(config), tmp_path / "w.img")
    deep = bytearray((src / "d1/d2/deep.bin").read_bytes())
    sparse = bytearray((src / "sparse_many").read_bytes())
    if "blockmap" in config or config.startswith(("ext2", "ext3")):
        # logical blocks 11 and 12 of a block-mapped file are apart on disk (the indirect
        # block lies between them): the write at 10_000 below spans two runs
        assert bmap(image, "/d1/d2/deep.bin", 12, bs) != bmap(image, "/d1/d2/deep.bin", 11, bs) + bs
    deep_script = (
        PATTERN
        + """
h.pwrite(pattern(1, 5000), 1000)
h.pwrite(pattern(2, 70_000), 10_000, nbd.CMD_FLAG_FUA)
h.zero(3000, 200_000)
h.zero(3000, 250_000, nbd.CMD_FLAG_NO_HOLE)
h.flush()
h.set_strict_mode(0)  # let the server see the write past the end
try:
    h.pwrite(b"x", 300_000)
    raise SystemExit("write past the end succeeded")
except nbd.Error as e:
    print(e.errno)
print(h.can_trim(), h.can_zero())
"""
    )
    sparse_script = (
        PATTERN
        + """
h.pwrite(pattern(3, 3000), 131072 + 500)
h.pwrite(bytes(61440) + pattern(4, 4096), 4096)      # zeroes into the hole, then data
h.zero(8192, 196608 - 4096)                          # half hole, half data
for offset, data in ((66_000, pattern(5, 10_000)),   # data, then a hole
                     (100_000, b"z")):               # inside a hole
    try:
        h.pwrite(data, offset)
        raise SystemExit("write into a hole succeeded")
    except nbd.Error as e:
        print(e.errno)
try:
    h.zero(8192, 8192, nbd.CMD_FLAG_NO_HOLE)
    raise SystemExit("allocated zeroes in a hole succeeded")
except nbd.Error as e:
    print(e.errno)
"""
    )
    with trionbd_process("-v", "file", str(image), EXT2) as server:
        assert nbdsh(server.uri_for("/d1/d2/deep.bin"), deep_script).split() == [
            "ENOSPC", "False", "True",
        ]  # fmt: skip
        assert nbdsh(server.uri_for("sparse_many"), sparse_script).split() == ["ENOSPC"] * 3
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 299000 1000",
             server.uri_for("/d1/d2/deep.bin")])  # fmt: skip
        log = server.stderr
    assert "block allocation is not supported (nothing was written)" in log
    deep[1000:6000] = pattern(1, 5000)
    deep[10_000:80_000] = pattern(2, 70_000)
    deep[200_000:203_000] = bytes(3000)
    deep[250_000:253_000] = bytes(3000)
    deep[299_000:300_000] = b"\x5a" * 1000
    sparse[131072 + 500 : 131072 + 3500] = pattern(3, 3000)
    sparse[65536:69632] = pattern(4, 4096)  # and the failed write left it alone
    sparse[196608:200704] = bytes(4096)
    assert debugfs_cat(image, "/d1/d2/deep.bin") == deep
    assert debugfs_cat(image, "/sparse_many") == sparse
    assert debugfs_cat(image, "/hello.txt") == (src / "hello.txt").read_bytes()
    e2run(E2FSCK, "-fn", image)


async def test_write_errors_and_hole_chunks_in_process(
    images: Callable[[str], Path], tmp_path: Path, src: Path
) -> None:
    """The client sees the filter's message in the error chunk; reads of holes come as
    hole chunks."""
    image = copy_image(images("ext4-4k"), tmp_path / "p.img")
    async with serving(Chain(FilePlugin(file=str(image)), [Ext2Filter()])) as server:
        c = await connect(server)
        await c.go("/sparse_many")
        assert not c.flags & TransmissionFlag.SEND_TRIM
        events = await c.request(Cmd.WRITE, 60 * KiB, 8 * KiB, data=b"w" * 8 * KiB)
        [err] = [e for e in events if isinstance(e, ErrorChunk)]
        assert err.error == Err.ENOSPC
        assert err.message == (
            "ext2: image " + str(image) + ": '/sparse_many': cannot write 8192 bytes at "
            "offset 61440: bytes 61440..65536 of the file are a hole or an uninitialized "
            "extent, and block allocation is not supported (nothing was written)"
        )
        events = await c.request(Cmd.READ, 0, 128 * KiB)
        holes = [(e.offset, e.length) for e in events if isinstance(e, HoleChunk)]
        assert holes == [(4 * KiB, 60 * KiB), (68 * KiB, 60 * KiB)]
        assert (
            await c.read(64 * KiB, 4 * KiB)
            == (src / "sparse_many").read_bytes()[64 * KiB : 68 * KiB]
        )
        assert await c.error(Cmd.WRITE_ZEROES, 0, 8 * KiB, CmdFlag.NO_HOLE) == Err.ENOSPC
        assert await c.error(Cmd.WRITE_ZEROES, 0, 8 * KiB, CmdFlag.FAST_ZERO) == 0
        await c.disconnect()


async def test_reading_a_slow_image_logs_its_progress(
    images: Callable[[str], Path],
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trionbd")

    class Slow(FilePlugin):
        async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
            await trio.sleep(0.75)  # on the mock clock: no wall time passes
            return await super().pread(h, count, offset, flags)

    image = images("ext4-4k")
    async with open_lifetime(Chain(Slow(file=str(image)), [Ext2Filter()])):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "trionbd.chain.container"]
    *progress, done = lines
    still = re.compile(r"ext2: still reading the index of image .*: (\d+) members so far")
    counts = [int(m[1]) for line in progress if (m := still.fullmatch(line))]
    assert len(counts) == len(progress) and counts[0] == 0 and counts[-1] > 0  # as found
    assert re.fullmatch(r"ext2: read the index of image .*: \d+ exports in \d+\.\d s", done)


def test_inline_data_files_are_read_only(images: Callable[[str], Path]) -> None:
    image = images("ext4-4k-inline")
    assert is_inline(image, "/hello.txt") and not is_inline(image, "/sizes/s100000")
    script = """
try:
    h.pwrite(b"x", 0)
    raise SystemExit("write to an inline file succeeded")
except nbd.Error as e:
    print(h.is_read_only(), e.errno)
"""
    with trionbd_process("file", str(image), EXT2) as server:
        assert nbdsh(server.uri_for("/hello.txt"), script).split() == ["True", "EPERM"]


def test_a_file_system_the_reader_must_not_write_is_read_only(
    images: Callable[[str], Path], tmp_path: Path
) -> None:
    image = copy_image(images("ext4-4k"), tmp_path / "ro.img")
    debugfs(image, "feature FEATURE_R20", write=True)  # an unknown RO_COMPAT feature
    with trionbd_process("file", str(image), EXT2) as server:
        exports = exports_by_name(server.uri)
        log = server.stderr
    assert all(e["is_read_only"] for e in exports.values())
    assert "is served read-only: unknown read-only-compatible feature(s) FEATURE_R20" in log


def test_a_journal_that_needs_recovery(
    images: Callable[[str], Path], tmp_path: Path, src: Path
) -> None:
    image = copy_image(images("ext4-4k"), tmp_path / "j.img")
    debugfs(image, "feature needs_recovery", write=True)
    stderr = trionbd_fails("file", str(image), EXT2)
    assert "ext2: image " + str(image) + ": the journal needs recovery" in stderr
    assert "use -r and ext2-allow-recovery=true" in stderr
    stderr = trionbd_fails("file", str(image), EXT2, "ext2-allow-recovery=true")
    assert "ext2-allow-recovery=true needs a read-only server (-r)" in stderr
    with trionbd_process("-r", "file", str(image), EXT2, "ext2-allow-recovery=true") as server:
        exports = exports_by_name(server.uri)
        assert (
            read_export(server.uri_for("/d1/d2/deep.bin"), tmp_path)
            == (src / "d1/d2/deep.bin").read_bytes()
        )
    assert exports["/d1/d2/deep.bin"]["is_read_only"]


# ------------------------------------------------------------------------------ damage


def test_a_damaged_superblock_or_group_descriptor_stops_start_up(
    images: Callable[[str], Path], tmp_path: Path
) -> None:
    image = copy_image(images("ext2-4k"), tmp_path / "sb.img")
    with open(image, "r+b") as f:
        f.seek(1024 + 0x38)
        f.write(b"\0\0")
    stderr = trionbd_fails("file", str(image), EXT2)
    assert stderr.strip() == (
        f"trionbd: ext2: image {image}: bad superblock magic 0x0000 at byte offset 1080 "
        "(expected 0xef53): not an ext2/ext3/ext4 filesystem"
    )
    # ext4-1k has 4 groups; the root directory lives in group 0, so only reading every
    # descriptor at start-up finds damage in group 3's
    image = copy_image(images("ext4-1k"), tmp_path / "gd.img")
    with open(image, "r+b") as f:
        f.seek(2048 + 3 * 64 + 0x0C)
        f.write(b"\xff\xff")
    stderr = trionbd_fails("file", str(image), EXT2)
    assert f"trionbd: ext2: image {image}: group descriptor 3 at byte offset 2240: " in stderr
    assert "checksum mismatch" in stderr


def test_a_damaged_inode_or_extent_tree_fails_only_its_file(
    images: Callable[[str], Path], tmp_path: Path, src: Path
) -> None:
    image = copy_image(images("ext4-4k"), tmp_path / "d.img")
    debugfs(image, "sif /sizes/s100000 block[0] 0x0001f30b", write=True)  # extent magic
    offset = imap(image, "/hello.txt", 4096)
    with open(image, "r+b") as f:  # i_mtime: the inode checksum no longer matches
        f.seek(offset + 0x10)
        f.write(b"\xff")
    with trionbd_process("file", str(image), EXT2) as server:
        exports = exports_by_name(server.uri)
        assert sorted(exports) == sorted(
            set(source_files(src)) - {"/hello.txt", "/d1/hard", "/sizes/s100000"}
        )
        message = refusal(server, "/hello.txt")
        assert re.search(rf"inode \d+ at byte offset {offset}: checksum mismatch", message)
        message = refusal(server, "sizes/s100000")
        assert "'sizes/s100000': inode" in message and "bad extent header magic" in message
        for name in ("/d1/d2/deep.bin", "/sparse_many"):
            assert read_export(server.uri_for(name), tmp_path) == (src / name[1:]).read_bytes()
        log = server.stderr
    assert re.search(r"ext2: image .*d\.img: not listing '/hello\.txt': inode \d+", log)
    assert re.search(r"not listing '/sizes/s100000': inode \d+: .*bad extent header magic", log)


# ------------------------------------------------------------------------------ ext2file


def test_ext2file_serves_one_file_under_any_name(
    images: Callable[[str], Path], src: Path, tmp_path: Path
) -> None:
    image = images("ext4-1k")
    deep = (src / "d1/d2/deep.bin").read_bytes()
    with trionbd_process("file", str(image), EXT2, "ext2file=/d1/d2/deep.bin") as server:
        exports = exports_by_name(server.uri)
        assert list(exports) == ["/d1/d2/deep.bin"]
        mtime = utc_text((src / "d1/d2/deep.bin").stat().st_mtime)
        assert exports["/d1/d2/deep.bin"]["description"] == (
            f"regular file, 300000 bytes, mode 0644, mtime {mtime}"
        )
        assert read_export(server.uri, tmp_path) == deep  # the default export
        assert read_export(server.uri_for("whatever"), tmp_path) == deep
    with trionbd_process("file", str(image), EXT2, "ext2file=/chain1") as server:
        assert read_export(server.uri, tmp_path) == (src / "hello.txt").read_bytes()
    stderr = trionbd_fails("file", str(image), EXT2, "ext2file=/nothere")
    assert f"ext2: ext2file=/nothere: image {image}: '/nothere': no entry 'nothere'" in stderr
    stderr = trionbd_fails("file", str(image), EXT2, "ext2file=/d1")
    assert "'/d1' is a directory" in stderr and "only regular files are exports" in stderr


def test_ext2file_exportname_takes_the_path_from_the_client(
    images: Callable[[str], Path], src: Path, tmp_path: Path
) -> None:
    image = images("ext3-4k")
    with trionbd_process("file", str(image), EXT2, "ext2file=exportname") as server:
        assert sorted(exports_by_name(server.uri)) == sorted(source_files(src))
        for name, source in {
            "/sizes/s150": "sizes/s150",
            "d1/hard": "hello.txt",
            "linkdir/deep.bin": "d1/d2/deep.bin",
        }.items():
            assert read_export(server.uri_for(name), tmp_path) == (src / source).read_bytes()
        assert "is a directory" in refusal(server, "d1/d2")


# ------------------------------------------------------------------------------ product shape


@pytest.fixture
def image_dir(images: Callable[[str], Path], tmp_path: Path) -> Path:
    """Two good images and a damaged one (all zeros, as large as a.img)."""
    d = tmp_path / "images"
    d.mkdir()
    copy_image(images("ext2-1k"), d / "a.img")
    copy_image(images("ext4-4k"), d / "b.img")
    with open(d / "c.img", "wb") as f:
        f.truncate((d / "a.img").stat().st_size)
    return d


def test_product_names_over_a_directory_of_images(
    image_dir: Path, src: Path, tmp_path: Path
) -> None:
    files = source_files(src)
    with trionbd_process("file", f"dir={image_dir}", EXT2) as server:
        exports = exports_by_name(server.uri)
        assert sorted(exports) == sorted(f"{i}.img{p}" for i in "ab" for p in files)
        for name in ("a.img/d1/d2/deep.bin", "b.img//d1/d2/deep.bin", "b.img/linkdir/deep.bin"):
            got = read_export(server.uri_for(name), tmp_path)
            assert got == (src / "d1/d2/deep.bin").read_bytes(), name
        assert served_data_ranges(server.uri_for("a.img/sparse_many")) == source_data_ranges(
            src / "sparse_many"
        )
        message = refusal(server, "c.img/hello.txt")
        assert message.startswith("ext2: image c.img: bad superblock magic"), message
        assert "is a directory" in refusal(server, "a.img/d1")
        assert "no export named 'z.img/x'" in refusal(server, "z.img/x")
        log = server.stderr
        # a damaged image is read again when next needed: repaired in place, it is served
        with open(image_dir / "c.img", "r+b") as f:
            f.write((image_dir / "a.img").read_bytes())
        assert (
            read_export(server.uri_for("c.img/hello.txt"), tmp_path)
            == (src / "hello.txt").read_bytes()
        )
        assert len(exports_by_name(server.uri)) == 3 * len(files)
    assert re.search(r"ext2: image c\.img: bad superblock magic .* \(not listed\)", log)


def test_product_with_ext2file_names_the_images(image_dir: Path, src: Path, tmp_path: Path) -> None:
    with trionbd_process("file", f"dir={image_dir}", EXT2, "ext2file=/d1/hard") as server:
        exports = exports_by_name(server.uri)
        assert sorted(exports) == ["a.img", "b.img"]
        for name in exports:
            assert read_export(server.uri_for(name), tmp_path) == (src / "hello.txt").read_bytes()
        assert "bad superblock magic" in refusal(server, "c.img")
        assert "no image named 'z.img'" in refusal(server, "z.img")
