"""The data the servers serve, built once per run in a private directory (under /tmp).

Every data file ends up wholly in the page cache, in pages of the base page size (see
:func:`cache_in_small_pages`), so all servers read and write memory at the same cost.

Every fixture is built on first use, so ``--only`` builds only what its workloads need.
"""

from __future__ import annotations

import io
import os
import random
import shlex
import subprocess
import tarfile
import time
from functools import cached_property
from pathlib import Path

import pyzstd

MiB = 1 << 20
CHUNK = 4 * MiB
MEMBER_NAME = "data/member.img"
"""Where the member lives in the tar archive and (with a leading /) in the ext4 image."""
SMALL_FILES = {"README": 1000, "data/notes.txt": 5000}
"""Small files stored before the member, so it does not start at offset 0 of its container."""
FILES_PER_DIR = 1000
"""The many-file ext4 image puts this many files in each directory."""


def write_random(path: Path, size: int) -> None:
    """Fill ``path`` with ``size`` random bytes (no holes: every block is real data)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def cache_in_small_pages(path: Path) -> None:
    """Put the whole file in the page cache as clean pages of PAGE_SIZE each.

    Written or read in large chunks, a file lands in the page cache in large folios (up to
    MiBs, on ext4 since Linux 6.16). A 4 KiB write then dirties a whole large folio, and
    random 4 KiB writes through any NBD server fell from about 120 000 to 15 000 per
    second here: the kernel, not the server, set the pace. So each chunk is evicted and
    written back (same bytes, blocks already allocated) one page at a time.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)  # only clean pages can be evicted
        size = os.fstat(fd).st_size
        for offset in range(0, size, CHUNK):
            data = memoryview(os.pread(fd, CHUNK, offset))
            os.posix_fadvise(fd, offset, len(data), os.POSIX_FADV_DONTNEED)
            for i in range(0, len(data), page):
                os.pwrite(fd, data[i : i + page], offset + i)
        os.fsync(fd)
    finally:
        os.close(fd)


def preread(path: Path) -> None:
    """Read the whole file (or each file of a directory) once, so the page cache holds it
    before anything is timed."""
    if path.is_dir():
        for child in path.iterdir():
            preread(child)
        return
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        while f.readinto(buf):
            pass


def write_compressible(path: Path, size: int, seed: int) -> None:
    """Fill ``path`` with ``size`` bytes shaped like a disk image for compressors: each MiB
    is random bytes (an already compressed file: 30 %), zeroes (unused space: 20 %), or
    text-like bytes (16 letters and a space, random: 50 %, which gzip shrinks to about
    55 %). The same seed gives the same bytes."""
    rng = random.Random(seed)
    letters = bytes.maketrans(bytes(range(256)), (b"etaoinshrdlucmf " * 16))
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(MiB, left)
            kind = rng.random()
            if kind < 0.3:
                f.write(rng.randbytes(n))
            elif kind < 0.5:
                f.write(bytes(n))
            else:
                f.write(rng.randbytes(n).translate(letters))
            left -= n


def compress(cmd: list[str], source: Path, out: Path) -> Path:
    """Run ``cmd`` (a compressor writing to stdout) on ``source`` into ``out``."""
    with open(source, "rb") as src, open(out, "wb") as dst:
        result = subprocess.run(cmd, stdin=src, stdout=dst, stderr=subprocess.PIPE, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {result.stderr.decode().strip()}")
    return out


def mke2fs(image: Path, source: Path, size: int, inodes: int | None = None) -> None:
    """Make an ext4 image of ``size`` bytes holding the tree ``source`` (mke2fs -d)."""
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(source), "-E", "root_owner=0:0"]
    if inodes is not None:
        cmd += ["-N", str(inodes)]
    cmd += [str(image), f"{size // 1024}k"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")


class Fixtures:
    """Paths of the data files, each created when first asked for."""

    def __init__(
        self,
        root: Path,
        file_size: int,
        member_size: int,
        tar_members: int,
        ext4_files: int,
        trionbd: str = "trionbd",
    ) -> None:
        self.root = root
        self.trionbd = trionbd
        """The trionbd command (to build the gzip index file once)."""
        self.file_size = file_size
        self.member_size = member_size
        self.tar_members = tar_members
        self.ext4_files = ext4_files

    @cached_property
    def file(self) -> Path:
        """The plain data file of ``file_size`` random bytes (workloads 1-4, 6, 8)."""
        path = self.root / "data.img"
        write_random(path, self.file_size)
        cache_in_small_pages(path)
        return path

    @cached_property
    def member(self) -> Path:
        """A plain file with exactly the bytes of the tar member and the ext4 file."""
        path = self.root / "member.img"
        write_random(path, self.member_size)
        cache_in_small_pages(path)
        return path

    def _tree_with_member(self) -> Path:
        tree = self.root / "member-tree"
        if not tree.exists():
            for name, size in SMALL_FILES.items():
                (tree / name).parent.mkdir(parents=True, exist_ok=True)
                (tree / name).write_bytes(b"x" * size)
            os.link(self.member, tree / MEMBER_NAME)
        return tree

    @cached_property
    def archive(self) -> Path:
        """A tar archive: small files, then the member at ``MEMBER_NAME``."""
        path = self.root / "archive.tar"
        tree = self._tree_with_member()
        with tarfile.open(path, "w") as tar:
            for name in [*SMALL_FILES, MEMBER_NAME]:
                tar.add(tree / name, arcname=name)
        cache_in_small_pages(path)
        return path

    @cached_property
    def image(self) -> Path:
        """An ext4 image holding the small files and the member at ``/MEMBER_NAME``."""
        path = self.root / "image.ext4"
        mke2fs(path, self._tree_with_member(), self.member_size + 64 * MiB)
        cache_in_small_pages(path)
        return path

    @cached_property
    def many_tar(self) -> tuple[Path, list[str]]:
        """A tar archive of ``tar_members`` small members, and their names."""
        path = self.root / "many.tar"
        names = [f"m{i // FILES_PER_DIR:03}/member{i:06}.txt" for i in range(self.tar_members)]
        with tarfile.open(path, "w") as tar:
            for i, name in enumerate(names):
                data = f"member {i}\n".encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        cache_in_small_pages(path)
        return path, names

    @cached_property
    def many_dir(self) -> tuple[Path, list[str]]:
        """A directory of ``tar_members`` small files (``file dir=``), and their names."""
        path = self.root / "many-dir"
        path.mkdir()
        names = [f"file{i:06}.txt" for i in range(self.tar_members)]
        for i, name in enumerate(names):
            (path / name).write_bytes(f"file {i}\n".encode())
        return path, names

    @cached_property
    def many_ext4(self) -> tuple[Path, list[str]]:
        """An ext4 image of ``ext4_files`` small files (in directories), and their paths."""
        path = self.root / "many.ext4"
        tree = self.root / "many-tree"
        names = [f"d{i // FILES_PER_DIR:03}/file{i:06}.txt" for i in range(self.ext4_files)]
        for i, name in enumerate(names):
            if i % FILES_PER_DIR == 0:
                (tree / name).parent.mkdir(parents=True)
            (tree / name).write_bytes(f"file {i}\n".encode())
        # One 4 KiB block per file, plus room for inode tables and the journal.
        size = self.ext4_files * 4096 * 5 // 4 + 64 * MiB
        mke2fs(path, tree, size, inodes=self.ext4_files + 1024)
        cache_in_small_pages(path)
        return path, ["/" + name for name in names]

    # --- compressed images and archives (the gzip, xz, zstd, tar over gzip, zip rows) ---

    @cached_property
    def compressible(self) -> Path:
        """``file_size`` compressible bytes (see :func:`write_compressible`): what the
        compressed images hold."""
        path = self.root / "compressible.img"
        write_compressible(path, self.file_size, seed=1)
        return path

    def _cached(self, path: Path) -> Path:
        cache_in_small_pages(path)
        return path

    @cached_property
    def image_gz(self) -> Path:
        """:attr:`compressible` compressed by pigz -6 (one gzip member, as gzip writes)."""
        return self._cached(
            compress(["pigz", "-6", "-c"], self.compressible, self.root / "image.gz")
        )

    @cached_property
    def image_xz(self) -> Path:
        """:attr:`compressible` compressed by xz -T0 -3 (blocks of 12 MiB: three dictionaries)."""
        return self._cached(
            compress(["xz", "-T0", "-3", "-c"], self.compressible, self.root / "image.xz")
        )

    @cached_property
    def image_zst(self) -> Path:
        """:attr:`compressible` in the seekable zstd format (level 3, 1 MiB frames; pyzstd)."""
        path = self.root / "image.zst"
        with (
            open(self.compressible, "rb") as src,
            pyzstd.SeekableZstdFile(
                path, "w", level_or_option=3, max_frame_content_size=MiB
            ) as dst,
        ):
            while chunk := src.read(CHUNK):
                dst.write(chunk)
        return self._cached(path)

    @cached_property
    def image_zst_plain(self) -> Path:
        """:attr:`compressible` compressed by zstd -3 (no seek table)."""
        cmd = ["zstd", "-3", "-T0", "-q", "-c"]
        return self._cached(compress(cmd, self.compressible, self.root / "plain.zst"))

    @cached_property
    def image_gz_index(self) -> Path:
        """trionbd's gzip index of :attr:`image_gz` (index=), made by starting trionbd once."""
        path = self.root / "image.gz.index"
        with subprocess.Popen(
            [self.trionbd, "-f", "-U", str(self.root / "index.sock"), "file", str(self.image_gz),
             "--filter=gzip", f"index={path}"],
            stderr=subprocess.PIPE,
        ) as proc:  # fmt: skip
            try:
                while not path.exists() and proc.poll() is None:
                    time.sleep(0.05)
            finally:
                proc.terminate()
                _, err = proc.communicate(timeout=60)
        if not path.exists():
            raise RuntimeError(f"trionbd did not write the gzip index: {err.decode().strip()}")
        return path

    @cached_property
    def compressible_member(self) -> Path:
        """``member_size`` compressible bytes: the member of the .tar.gz and the zip."""
        path = self.root / "cmember.img"
        write_compressible(path, self.member_size, seed=2)
        return path

    def _tree_with_compressible_member(self) -> Path:
        tree = self.root / "cmember-tree"
        if not tree.exists():
            for name, size in SMALL_FILES.items():
                (tree / name).parent.mkdir(parents=True, exist_ok=True)
                (tree / name).write_bytes(b"x" * size)
            os.link(self.compressible_member, tree / MEMBER_NAME)
        return tree

    @cached_property
    def archive_tgz(self) -> Path:
        """A .tar.gz (pigz -6): small files, then the compressible member at MEMBER_NAME."""
        tar = self.root / "carchive.tar"
        tree = self._tree_with_compressible_member()
        with tarfile.open(tar, "w") as t:
            for name in [*SMALL_FILES, MEMBER_NAME]:
                t.add(tree / name, arcname=name)
        path = compress(["pigz", "-6", "-c"], tar, self.root / "carchive.tar.gz")
        tar.unlink()
        return self._cached(path)

    @cached_property
    def archive_zip(self) -> Path:
        """A zip (Info-ZIP zip -6, deflated): small files, then the member at MEMBER_NAME."""
        path = self.root / "carchive.zip"
        tree = self._tree_with_compressible_member()
        cmd = ["zip", "-q", "-6", str(path), *SMALL_FILES, MEMBER_NAME]
        result = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed: {result.stderr.strip()}")
        return self._cached(path)
