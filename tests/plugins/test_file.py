"""The file plugin: data, holes (SEEK_HOLE), trim, zeroing with and without NO_HOLE,
FAST_ZERO, dir= exports, read-only files, configuration errors; and real clients."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.nbdclient import connect
from tests.support import (
    libnbd_python,
    listing,
    random_file,
    run,
    seek_map,
    serving,
    trionbd_process,
)
from trionbd.chain import ConfigError
from trionbd.plugins import file as file_module
from trionbd.plugins.file import FilePlugin
from trionbd.protocol import Cmd, CmdFlag, Err, Info, Opt, Rep, TransmissionFlag, wire

MiB = 1 << 20
TF = TransmissionFlag


def plugin(**kw: str) -> FilePlugin:
    p = FilePlugin(**kw)
    p.get_ready()
    return p


def sparse_file(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        os.fsync(f.fileno())
    return path.read_bytes()


def blocks(path: Path) -> int:
    return os.stat(path).st_blocks


# --- data ------------------------------------------------------------------------------------


async def test_reads_and_writes_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = random_file(path, 3 * MiB + 513)
    async with serving(plugin(file=str(path))) as server:
        c = await connect(server)
        await c.go()
        assert c.size == len(data)
        assert c.flags == (
            TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES
            | TF.SEND_DF | TF.CAN_MULTI_CONN | TF.SEND_CACHE | TF.SEND_FAST_ZERO
        )  # fmt: skip
        assert await c.read(0, len(data)) == data
        await c.write(12345, b"hello", CmdFlag.FUA)
        await c.write(len(data) - 3, b"end")
        assert await c.error(Cmd.FLUSH) == 0
        assert await c.error(Cmd.CACHE, 0, len(data)) == 0
        assert await c.error(Cmd.WRITE, len(data) - 2, 3, data=b"xyz") == Err.ENOSPC
    expected = bytearray(data)
    expected[12345:12350] = b"hello"
    expected[-3:] = b"end"
    assert path.read_bytes() == expected


async def test_block_status_matches_seek_hole(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    content = sparse_file(
        path,
        8 * MiB + 100,
        [(MiB, b"a" * (MiB // 2)), (4 * MiB, b"b" * 4096), (8 * MiB + 50, b"c" * 50)],
    )
    expected = seek_map(path)
    assert len(expected) >= 5  # the file system really is sparse here
    async with serving(plugin(file=str(path))) as server:
        c = await connect(server)
        await c.go(meta=True)
        got: list[tuple[int, int, int]] = []
        pos = 0
        while pos < c.size:
            [chunk] = await c.request(Cmd.BLOCK_STATUS, pos, c.size - pos)
            for length, flags in chunk.extents:  # type: ignore[union-attr]
                if got and got[-1][2] == flags and got[-1][0] + got[-1][1] == pos:
                    got[-1] = (got[-1][0], got[-1][1] + length, flags)
                else:
                    got.append((pos, length, flags))
                pos += length
        assert got == expected
        assert await c.read(0, len(content)) == content


async def test_trim_punches_a_hole(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = random_file(path, 4 * MiB)
    before = blocks(path)
    async with serving(plugin(file=str(path))) as server:
        c = await connect(server)
        await c.go()
        assert await c.error(Cmd.TRIM, MiB, MiB, CmdFlag.FUA) == 0
        got = await c.read(MiB - 1, MiB + 2)
        assert got == data[MiB - 1 : MiB] + bytes(MiB) + data[2 * MiB : 2 * MiB + 1]
    assert seek_map(path) == [(0, MiB, 0), (MiB, MiB, 3), (2 * MiB, 2 * MiB, 0)]
    assert blocks(path) == before - MiB // 512


async def test_zero_without_no_hole_deallocates(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = random_file(path, 4 * MiB)
    before = blocks(path)
    async with serving(plugin(file=str(path))) as server:
        c = await connect(server)
        await c.go()
        assert await c.error(Cmd.WRITE_ZEROES, MiB, 2 * MiB) == 0
        assert await c.read(0, 4 * MiB) == data[:MiB] + bytes(2 * MiB) + data[3 * MiB :]
    assert blocks(path) == before - 2 * MiB // 512
    assert seek_map(path)[1] == (MiB, 2 * MiB, 3)


async def test_zero_with_no_hole_stays_allocated(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = random_file(path, 4 * MiB)
    before = blocks(path)
    async with serving(plugin(file=str(path))) as server:
        c = await connect(server)
        await c.go()
        assert await c.error(Cmd.WRITE_ZEROES, MiB, 2 * MiB, CmdFlag.NO_HOLE) == 0
        assert await c.error(Cmd.WRITE_ZEROES, 0, 4096, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO) == 0
        assert (
            await c.read(0, 4 * MiB)
            == bytes(4096) + data[4096:MiB] + bytes(2 * MiB) + (data[3 * MiB :])
        )
    assert blocks(path) == before


@pytest.fixture
def no_zero_range(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A file system without FALLOC_FL_ZERO_RANGE (like tmpfs); records the modes tried."""
    tried: list[int] = []
    real = file_module.fallocate

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        tried.append(mode)
        if mode & file_module.FALLOC_FL_ZERO_RANGE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        real(fd, mode, offset, length)

    monkeypatch.setattr(file_module, "fallocate", fallocate)
    return tried


async def test_fast_zero_fails_at_once_when_zeroing_would_mean_writing(
    tmp_path: Path, no_zero_range: list[int]
) -> None:
    path = tmp_path / "disk.img"
    data = random_file(path, 2 * MiB)
    async with serving(plugin(file=str(path))) as server:
        c = await connect(server)
        await c.go()
        fast_allocated = CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO
        events = await c.request(Cmd.WRITE_ZEROES, 0, MiB, fast_allocated)
        assert [(e.error, e.message) for e in events] == [  # type: ignore[union-attr]
            (Err.ENOTSUP, "file: zeroing this file is not faster than writing")
        ]
        assert path.read_bytes() == data  # untouched
        # Without FAST_ZERO the same request writes zeroes.
        assert await c.error(Cmd.WRITE_ZEROES, 0, MiB, CmdFlag.NO_HOLE) == 0
        assert path.read_bytes() == bytes(MiB) + data[MiB:]
        assert seek_map(path) == [(0, 2 * MiB, 0)]
        # Punching a hole is fast: FAST_ZERO without NO_HOLE succeeds.
        assert await c.error(Cmd.WRITE_ZEROES, MiB, MiB, CmdFlag.FAST_ZERO) == 0
        assert seek_map(path) == [(0, MiB, 0), (MiB, MiB, 3)]
    assert no_zero_range.count(file_module.FALLOC_FL_ZERO_RANGE) == 1  # remembered as missing


def test_fast_zero_on_tmpfs_with_a_real_client() -> None:
    """tmpfs has no FALLOC_FL_ZERO_RANGE: the real thing, through libnbd."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or "tmpfs" not in run(["stat", "-f", "-c", "%T", str(shm)]):
        pytest.skip("needs a tmpfs at /dev/shm")
    with tmp_in(shm) as tmp:
        path = tmp / "disk.img"
        data = random_file(path, MiB)
        with trionbd_process("file", str(path)) as server:
            out = libnbd(
                server.uri,
                """
try:
    h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    print("refused", e.errno)
h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO)
print("punched")
""",
            )
            assert out.split() == ["refused", "ENOTSUP", "punched"]
        assert path.read_bytes() == data[:65536] + bytes(65536) + data[131072:]


# --- dir= --------------------------------------------------------------------------------------


async def test_dir_serves_each_regular_file(tmp_path: Path) -> None:
    random_file(tmp_path / "a.img", 4096, seed=1)
    b = random_file(tmp_path / "b.img", 8192, seed=2)
    (tmp_path / "subdir").mkdir()
    (tmp_path / "subdir" / "c.img").write_bytes(b"c")
    (tmp_path / bytes.fromhex("ff2e696d67").decode("utf-8", "surrogateescape")).write_bytes(b"x")
    async with serving(plugin(dir=str(tmp_path))) as server:
        c = await connect(server)
        await c.handshake()
        listed = await c.option(Opt.LIST)
        assert [(r.reply, r.payload) for r in listed] == [
            (Rep.SERVER, b"\0\0\0\x05a.imgregular file, 4096 bytes"),
            (Rep.SERVER, b"\0\0\0\x05b.imgregular file, 8192 bytes"),
            (Rep.ACK, b""),
        ]
        for name in ("nope", "subdir", "subdir/c.img", "..", ".", "n" * 4096):
            [err] = await c.option(Opt.GO, wire.name_and_infos(name, []))
            assert err.reply == Rep.ERR_UNKNOWN, name
        info = await c.option(Opt.INFO, wire.name_and_infos("", [Info.NAME]))
        assert info[1].payload == b"\0\x01a.img"  # the default export is the first name
        await c.option(Opt.GO, wire.name_and_infos("b.img", []))
        assert await c.read(0, 8192) == b


async def test_export_identity_changes_with_the_file(tmp_path: Path) -> None:
    """What the gzip filter's index= relies on: the same while the file is untouched,
    different after a rewrite, a replacement or a change of size; None if unknown."""
    path = tmp_path / "a.img"
    random_file(path, 4096, seed=1)
    one = plugin(file=str(path))
    many = plugin(dir=str(tmp_path))
    first = await one.export_identity("")
    assert first is not None
    assert await one.export_identity("") == first == await many.export_identity("a.img")
    os.utime(path, ns=(1, 1_700_000_000_123_456_789))
    touched = await one.export_identity("")
    assert touched not in (None, first)
    random_file(tmp_path / "new.img", 4096, seed=1)
    os.utime(tmp_path / "new.img", ns=(1, 1_700_000_000_123_456_789))
    os.replace(tmp_path / "new.img", path)  # same size and time, another inode
    assert await one.export_identity("") not in (None, touched)
    path.write_bytes(path.read_bytes() + b"x")
    os.utime(path, ns=(1, 1_700_000_000_123_456_789))
    assert await one.export_identity("") not in (None, touched, first)
    assert await many.export_identity("missing.img") is None


async def test_dir_with_real_clients(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    disks = {f"disk{i}.img": random_file(images / f"disk{i}.img", 65536 * i, seed=i)
             for i in (1, 2, 3)}  # fmt: skip
    with trionbd_process("file", f"dir={images}") as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == sorted(disks)
        assert [e["export-size"] for e in exports] == [65536, 131072, 196608]
        for name, data in disks.items():
            copy = tmp_path / f"copy-{name}"
            run(["nbdcopy", server.uri_for(name), str(copy)])
            assert copy.read_bytes() == data


# --- read-only ---------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only_file(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable, even for root (chattr +i), for the duration."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("root needs chattr to make a read-only file")
        run(["chattr", "+i", str(path)])
        try:
            yield
        finally:
            run(["chattr", "-i", str(path)])
    else:
        path.chmod(0o444)
        yield


async def test_read_only_file_is_served_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    data = random_file(path, 65536)
    with read_only_file(path):
        async with serving(plugin(file=str(path))) as server:
            c = await connect(server)
            await c.go()
            assert c.flags & TF.READ_ONLY
            assert await c.error(Cmd.WRITE, 0, 4, data=b"nope") == Err.EPERM
            assert await c.error(Cmd.TRIM, 0, 4096) == Err.EPERM
            assert await c.error(Cmd.WRITE_ZEROES, 0, 4096) == Err.EPERM
            assert await c.read(0, 65536) == data
    assert path.read_bytes() == data


def test_read_only_with_real_clients(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = random_file(path, MiB)
    # Strict mode off: libnbd would refuse unadvertised commands itself, without asking.
    script = """
h.set_strict_mode(0)
for name, call in [("pwrite", lambda: h.pwrite(b"x" * 512, 0)),
                   ("trim", lambda: h.trim(512, 0)),
                   ("zero", lambda: h.zero(512, 0))]:
    try:
        call()
    except nbd.Error as e:
        print(name, e.errno)
print(h.is_read_only())
"""
    with trionbd_process("-r", "file", str(path)) as server:
        assert libnbd(server.uri, script).split() == [
            "pwrite", "EPERM", "trim", "EPERM", "zero", "EPERM", "True",
        ]  # fmt: skip
    with read_only_file(path), trionbd_process("file", str(path)) as server:
        assert libnbd(server.uri, script).split()[-1] == "True"
        result = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4096", server.uri],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # qemu sees READ_ONLY in the transmission flags and refuses to open read-write.
        assert result.returncode != 0 and "Permission denied" in result.stderr
    assert path.read_bytes() == data


# --- trim and holes with real clients -------------------------------------------------------


def test_qemu_io_discard_and_write_zeroes(tmp_path: Path) -> None:
    """discard and write -z -u (may unmap) punch holes; plain write -z (NO_HOLE) allocates."""
    path = tmp_path / "disk.img"
    data = random_file(path, 4 * MiB)
    before = blocks(path)
    with trionbd_process("file", str(path)) as server:
        commands = ["discard 1M 1M", "write -z -u 3M 512k", "write -z 2M 4k"]
        run(["qemu-io", "-f", "raw", *[a for c in commands for a in ("-c", c)], server.uri])
    with open(path, "rb") as f:
        assert os.lseek(f.fileno(), MiB, os.SEEK_HOLE) == MiB
        assert os.lseek(f.fileno(), MiB, os.SEEK_DATA) >= 2 * MiB
        assert os.lseek(f.fileno(), 3 * MiB, os.SEEK_HOLE) == 3 * MiB
        assert os.lseek(f.fileno(), 3 * MiB, os.SEEK_DATA) == 3 * MiB + MiB // 2
    # Only the discarded and unmapped ranges were freed; the NO_HOLE 4k stays allocated
    # (ext4 may still report it as a hole to SEEK_HOLE: an unwritten extent).
    assert blocks(path) == before - (MiB + MiB // 2) // 512
    expected = bytearray(data)
    expected[MiB : 2 * MiB] = bytes(MiB)
    expected[2 * MiB : 2 * MiB + 4096] = bytes(4096)
    expected[3 * MiB : 3 * MiB + MiB // 2] = bytes(MiB // 2)
    assert path.read_bytes() == expected


# --- configuration ----------------------------------------------------------------------------


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of file=PATH or dir=DIR"):
        FilePlugin()
    with pytest.raises(ConfigError, match="exactly one of"):
        FilePlugin(file="a", dir="b")
    with pytest.raises(ConfigError, match="No such file or directory"):
        plugin(file=str(tmp_path / "missing.img"))
    with pytest.raises(ConfigError, match="not a regular file or block device"):
        plugin(file=str(tmp_path))
    with pytest.raises(ConfigError, match="not a directory"):
        plugin(dir=str(tmp_path / "missing"))


# --- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def tmp_in(parent: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def libnbd(uri: str, script: str) -> str:
    """Run ``script`` with a libnbd handle ``h`` connected to ``uri`` (and ``nbd``)."""
    prologue = f"import nbd\nh = nbd.NBD()\nh.connect_uri({uri!r})\n"
    return libnbd_python(prologue + script + "\nh.shutdown()\n")
