"""The gzip, xz and zstd filters through the real ``trionbd`` command, with files made by
the real tools (gzip, pigz, xz -T0, zstd; pyzstd's SeekableZstdFile for the seekable
zstd format, which Debian's zstd cannot write) and real clients: every export copied
with nbdcopy and compared byte for byte, random reads at random offsets with nbdsh,
tar over gzip over a directory, damaged files, and the gzip index file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.chain.raw_client import RawClient
from tests.formats.test_gzip import sample
from tests.formats.test_zstd import seekable
from tests.support import (
    export_info,
    listing,
    nbdsh,
    read_export,
    trionbd_exit,
    trionbd_process,
)
from trionbd.protocol.constants import Opt, Rep

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gzip", "pigz", "xz", "zstd", "bzip2", "nbdcopy", "nbdsh")),
    reason="gzip, pigz, xz, zstd, bzip2, nbdcopy and nbdsh are needed",
)

KiB, MiB = 1 << 10, 1 << 20
SIZE = 6 * MiB + 12345


def tool(cmd: list[str], data: bytes) -> bytes:
    return subprocess.run(cmd, input=data, stdout=subprocess.PIPE, check=True).stdout


@pytest.fixture(scope="module")
def data() -> bytes:
    return sample(SIZE, seed=11)


@pytest.fixture(scope="module")
def files(data: bytes, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same data compressed every way the filters read, by file name."""
    root = tmp_path_factory.mktemp("compressed")
    third = len(data) // 3
    made = {
        "gzip.gz": tool(["gzip", "-c", "-6"], data),
        "pigz.gz": tool(["pigz", "-c", "-p", "2"], data),
        "members.gz": tool(["gzip", "-c"], data[:third])
        + tool(["pigz", "-c", "-1"], data[third : 2 * third])
        + tool(["gzip", "-c", "-9"], data[2 * third :]),
        "blocks.xz": tool(["xz", "-c", "-T0", "-3", "--block-size=1MiB"], data),
        "threads.xz": tool(["xz", "-c", "-T0", "-3"], data),
        "crc32.xz": tool(["xz", "-c", "-1", "--check=crc32", "--block-size=512KiB"], data),
        "seekable.zst": seekable(data, frame=256 * KiB, checksum=True),
        "plain.zst": tool(["zstd", "-q", "-c", "-3"], data),
    }
    paths = {}
    for name, blob in made.items():
        paths[name] = root / name
        paths[name].write_bytes(blob)
    (root / "expected.img").write_bytes(data)
    return paths


FILTER_OF = {".gz": "gzip", ".xz": "xz", ".zst": "zstd"}


def filter_of(path: Path) -> str:
    return FILTER_OF[path.suffix]


RANDOM_READS = """
import random
data = open({expected!r}, "rb").read()
assert h.get_size() == len(data)
rng = random.Random({seed})
for _ in range({count}):
    offset = rng.randrange(len(data))
    n = min(rng.choice((1, 512, 4096, 65536, 300000)), len(data) - offset)
    assert h.pread(n, offset) == data[offset : offset + n], (offset, n)
assert h.is_read_only()
print("ok")
"""


def random_reads(uri: str, expected: Path, seed: int, count: int = 200) -> None:
    script = RANDOM_READS.format(expected=str(expected), seed=seed, count=count)
    assert nbdsh(uri, script).strip() == "ok"


@pytest.mark.parametrize(
    "name",
    ["gzip.gz", "pigz.gz", "members.gz", "blocks.xz", "threads.xz", "crc32.xz",
     "seekable.zst", "plain.zst"],
)  # fmt: skip
def test_every_byte_and_random_reads(name: str, files: dict[str, Path], tmp_path: Path) -> None:
    path = files[name]
    expected = path.parent / "expected.img"
    with trionbd_process("-v", "file", str(path), f"--filter={filter_of(path)}") as server:
        info = export_info(server.uri)
        assert info["export-size"] == SIZE
        assert info["is_read_only"] and info["can_multi_conn"]
        assert read_export(server.uri, tmp_path) == expected.read_bytes()
        random_reads(server.uri, expected, seed=len(name))
        if name == "plain.zst":
            says = "has no seek table: decompressing it once into an unlinked temporary file"
            assert says in server.stderr


def kept_files(pid: int, directory: Path) -> list[int]:
    """The sizes of the unlinked files in ``directory`` that process ``pid`` holds open."""
    sizes = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith(f"{directory}/") and target.endswith(" (deleted)"):
            sizes.append(os.stat(fd).st_size)
    return sizes


@pytest.mark.parametrize("name", ["members.gz", "blocks.xz", "seekable.zst", "plain.zst"])
def test_decompressed_data_is_kept_in_a_temporary_file(
    name: str, files: dict[str, Path], tmp_path: Path
) -> None:
    """The server keeps what it decompressed in an unlinked file in $TMPDIR, one per
    export: gzip and plain zstd fill it at start-up; xz and seekable zstd as blocks are
    read, to at most the export's size. Copies from several connections, before and
    after it is filled, are the source byte for byte. One process (xz is process-safe:
    each worker would keep a file of its own, filled by the reads it happened to serve)."""
    path = files[name]
    expected = (path.parent / "expected.img").read_bytes()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    args = ("--workers=1", "file", str(path), f"--filter={filter_of(path)}")
    with trionbd_process(*args, env=env) as server:
        filled_at_start = name in ("members.gz", "plain.zst")
        assert kept_files(server.proc.pid, tmp) == [SIZE if filled_at_start else 0]
        random_reads(server.uri, path.parent / "expected.img", seed=3, count=20)
        for _ in range(2):
            assert read_export(server.uri, tmp_path) == expected
            assert kept_files(server.proc.pid, tmp) == [SIZE]


def test_descriptions_say_what_was_decompressed(files: dict[str, Path]) -> None:
    says = {
        "members.gz": f"{SIZE} bytes, gzip-compressed (",
        "blocks.xz": f"{SIZE} bytes, xz-compressed (7 blocks, the largest 1.0 MiB)",
        "seekable.zst": f"{SIZE} bytes, seekable zstd (25 frames)",
        "plain.zst": f"{SIZE} bytes, zstd-compressed (",
    }
    for name, text in says.items():
        path = files[name]
        with trionbd_process("file", str(path), f"--filter={filter_of(path)}") as server:
            assert export_info(server.uri)["description"].startswith(text), name
    with trionbd_process("file", str(files["members.gz"]), "--filter=gzip") as server:
        assert export_info(server.uri)["description"].endswith(" in 3 members)")


def test_writes_are_refused(files: dict[str, Path]) -> None:
    script = """
try:
    h.pwrite(b"x" * 512, 0)
except nbd.Error as e:
    print("refused", e.errno)
"""
    for name in ("gzip.gz", "blocks.xz", "seekable.zst"):
        path = files[name]
        with trionbd_process("file", str(path), f"--filter={filter_of(path)}") as server:
            assert nbdsh(server.uri, script).startswith("refused"), name


# --- several exports below: each decompressed on its own --------------------------------


def make_tar_gz(path: Path, members: dict[str, bytes], compress: list[str]) -> None:
    tar = path.with_suffix("")
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as t:
        for name, content in members.items():
            src = path.parent / "src" / name
            src.parent.mkdir(parents=True, exist_ok=True)
            src.write_bytes(content)
            t.add(src, arcname=name)
    path.write_bytes(tool(compress, tar.read_bytes()))
    tar.unlink()


@pytest.fixture
def archives(tmp_path: Path, data: bytes) -> tuple[Path, dict[str, bytes]]:
    """A directory of .tar.gz files (gzip and pigz), a damaged one and a text file;
    returns it and the exports that tar over gzip should give (name -> bytes)."""
    d = tmp_path / "archives"
    d.mkdir()
    a = {"disk.img": data[: 3 * MiB], "etc/notes.txt": b"notes\n" * 1000}
    b = {"big/root.img": data[MiB:], "empty": b""}
    make_tar_gz(d / "a.tar.gz", a, ["gzip", "-c"])
    make_tar_gz(d / "b.tar.gz", b, ["pigz", "-c", "-p", "2"])
    damaged = bytearray((d / "a.tar.gz").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (d / "bad.tar.gz").write_bytes(bytes(damaged))
    (d / "readme.txt").write_text("not gzip\n")
    shutil.rmtree(d / "src")
    expected = {f"a.tar.gz/{k}": v for k, v in a.items()}
    expected.update({f"b.tar.gz/{k}": v for k, v in b.items()})
    return d, expected


def test_tar_over_gzip_over_a_directory(
    archives: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    d, expected = archives
    with trionbd_process("file", f"dir={d}", "--filter=tar", "--filter=gzip") as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == list(expected)
        for name, content in expected.items():
            assert read_export(server.uri_for(name), tmp_path) == content, name
        with RawClient(server.socket) as client:
            refused = client.info("bad.tar.gz/disk.img", Opt.GO)
            assert refused.reply == Rep.ERR_UNKNOWN
            says = "gzip: bad.tar.gz: gzip member at offset 0: CRC-32 mismatch (trailer at "
            assert says in refused.message, refused.message
            ok = client.info("b.tar.gz/empty")
            assert ok.reply == Rep.ACK and ok.size == 0
        log = server.stderr
    assert "bad.tar.gz" in log and "readme.txt" in log  # why they are not listed


def test_gzip_over_a_directory_passes_the_list_through(
    archives: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    d, _ = archives
    names = sorted(os.listdir(d))
    with trionbd_process("file", f"dir={d}", "--filter=gzip") as server:
        with RawClient(server.socket) as client:
            assert client.list_names() == (Rep.ACK, names)
        with tarfile.open(d / "b.tar.gz") as t:
            member = t.extractfile("big/root.img")
            assert member is not None
            head = member.read(1000)
            start = t.getmember("big/root.img").offset_data
        tar_bytes = read_export(server.uri_for("b.tar.gz"), tmp_path)
        assert tar_bytes[start : start + 1000] == head
        with RawClient(server.socket) as client:
            for name, says in (
                ("readme.txt", "gzip: readme.txt: gzip member header at offset 0: bad magic"),
                ("bad.tar.gz", "gzip: bad.tar.gz: gzip member at offset 0: "),
                ("missing.gz", "gzip: missing.gz: file: no export named 'missing.gz'"),
            ):
                refused = client.info(name)
                assert refused.reply == Rep.ERR_UNKNOWN and refused.message.startswith(says), (
                    refused.message
                )
        # A file that appears later is read then (a failure below is not remembered).
        shutil.copy(d / "a.tar.gz", d / "missing.gz")
        assert export_info(server.uri_for("missing.gz"))["export-size"] > 3 * MiB


# --- damaged files --------------------------------------------------------------------


def flip(blob: bytes, pos: int) -> bytes:
    return blob[:pos] + bytes([blob[pos] ^ 0x55]) + blob[pos + 1 :]


def test_a_damaged_single_file_stops_the_start_up(files: dict[str, Path], tmp_path: Path) -> None:
    gz = files["gzip.gz"].read_bytes()
    xz = files["blocks.xz"].read_bytes()
    zst = files["plain.zst"].read_bytes()
    cases = {
        "truncated.gz": (gz[: len(gz) // 2], "truncated"),
        "crc.gz": (flip(gz, len(gz) - 6), "CRC-32 mismatch (trailer at offset"),
        "garbage.gz": (gz + b"garbage", f"trailing garbage at offset {len(gz)}"),
        "truncated.xz": (xz[:-100], "xz: stream footer at offset"),
        "notxz.xz": (b"\0" * 64 + b"x" * 64, "footer at offset"),
        "truncated.zst": (zst[: len(zst) // 2], "truncated: the file ends at offset"),
        "notzstd.zst": (b"hello world!", "bad magic 68656c6c at offset 0"),
    }
    for name, (blob, says) in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        result = trionbd_exit("file", str(path), f"--filter={filter_of(path)}")
        assert result.returncode == 1, (name, result.stderr)
        line = f"{filter_of(path)}: {path}: "
        assert line in result.stderr and says in result.stderr, (name, result.stderr)
        assert f"{filter_of(path)}: {path}: {filter_of(path)}:" not in result.stderr


def test_a_damaged_block_fails_its_reads_only(files: dict[str, Path], tmp_path: Path) -> None:
    """xz blocks and zstd frames are checked when read: a damaged one fails the reads
    that need it (EIO), every other byte is served, and so are other clients."""
    for name in ("blocks.xz", "seekable.zst"):
        blob = files[name].read_bytes()
        path = tmp_path / name
        path.write_bytes(flip(blob, len(blob) // 2))
        script = f"""
data = open({str(files[name].parent / "expected.img")!r}, "rb").read()
bad = []
for offset in range(0, len(data), 128 * 1024):
    n = min(4096, len(data) - offset)
    try:
        assert h.pread(n, offset) == data[offset : offset + n], offset
    except nbd.Error as e:
        bad.append((offset, e.errno))
print(len(bad), sorted(set(e for _, e in bad)))
"""
        with trionbd_process("-v", "file", str(path), f"--filter={filter_of(path)}") as server:
            count, errnos = nbdsh(server.uri, script).split(" ", 1)
            assert 0 < int(count) <= 8 and errnos.strip() == "['EIO']", (name, count, errnos)
            assert export_info(server.uri)["export-size"] == SIZE  # still serving
            log = server.stderr
        assert "block at offset" in log or "frame at offset" in log, log


# --- gzip: the index file -------------------------------------------------------------


def test_gzip_index_is_saved_reused_and_rebuilt(files: dict[str, Path], tmp_path: Path) -> None:
    gz = tmp_path / "disk.gz"
    shutil.copy(files["members.gz"], gz)
    index = tmp_path / "disk.gz.index"
    expected = files["members.gz"].parent / "expected.img"
    args = ("-v", "file", str(gz), "--filter=gzip", f"index={index}")

    def serve_once() -> str:
        with trionbd_process(*args) as server:
            random_reads(server.uri, expected, seed=5, count=30)
            return server.stderr

    first = serve_once()
    assert f"no index in {index} yet" in first and f"index saved to {index}" in first
    saved = index.read_bytes()
    second = serve_once()
    assert f"index loaded from {index}" in second and "index saved" not in second
    os.utime(gz, ns=(1, 1_600_000_000_000_000_000))  # same bytes, but it may have changed
    third = serve_once()
    assert "rebuilding the index" in third and f"index saved to {index}" in third
    assert index.read_bytes() != saved  # tied to the new identity
    index.write_bytes(b"TRIONBD GZIP INDEX\n\0" + b"\xff" * 100)
    fourth = serve_once()
    assert "is unusable" in fourth and f"index saved to {index}" in fourth
    assert "index loaded" in serve_once()


def test_gzip_index_needs_one_file_and_a_plugin_that_identifies_it(
    archives: tuple[Path, dict[str, bytes]], files: dict[str, Path], tmp_path: Path
) -> None:
    d, _ = archives
    index = str(tmp_path / "x.index")
    several = trionbd_exit("file", f"dir={d}", "--filter=gzip", f"index={index}")
    assert several.returncode == 1
    assert "keeps the index of one gzip file, but the layer below lists several" in (several.stderr)
    between = trionbd_exit(
        "file", str(files["gzip.gz"]), "--filter=gzip", f"index={index}", "--filter=offset",
        "offset=0",
    )  # fmt: skip
    assert between.returncode == 1
    assert "needs a plugin directly below gzip" in between.stderr, between.stderr


def test_gzip_progress_is_logged_for_slow_inputs(files: dict[str, Path]) -> None:
    """Reading takes longer than a second (each of its 8 reads below is delayed by 0.2 s):
    INFO lines give the progress and the time it took. (The delay filter's unnamed
    export is labelled as such: only a plugin's export has its file name.)"""
    with trionbd_process(
        "-v", "file", str(files["gzip.gz"]), "--filter=gzip", "--filter=delay", "rdelay=0.2"
    ) as server:
        log = server.stderr
    assert "trionbd: INFO: gzip: reading delay export '': " in log, log
    assert "trionbd: INFO: gzip: delay export '': read in " in log, log


# --- xz: parameters and single blocks ---------------------------------------------------


def test_xz_max_block_and_single_block_files(
    files: dict[str, Path], data: bytes, tmp_path: Path
) -> None:
    refused = trionbd_exit("file", str(files["blocks.xz"]), "--filter=xz", "xz-max-block=512K")
    assert refused.returncode == 1
    assert "more than the limit of 524288 (xz-max-block)" in refused.stderr, refused.stderr
    bad = trionbd_exit("file", str(files["blocks.xz"]), "--filter=xz", "xz-max-depth=0")
    assert bad.returncode == 2 and "xz-max-depth must be at least 1" in bad.stderr
    one = tmp_path / "one.xz"
    one.write_bytes(tool(["xz", "-c", "-1"], data * 3))  # one block of 18 MiB
    with trionbd_process("file", str(one), "--filter=xz", "xz-max-depth=1") as server:
        assert read_export(server.uri, tmp_path) == data * 3
        assert "is a single block of 18.0 MiB: the first read will be slow" in server.stderr


# --- a compressed container given to a container filter -------------------------------


@pytest.mark.parametrize(
    ("compress", "says"),
    [
        (["gzip", "-c"], "this looks like gzip: add --filter=gzip"),
        (["xz", "-c"], "this looks like xz: add --filter=xz"),
        (["zstd", "-q", "-c"], "this looks like zstd: add --filter=zstd"),
        (["bzip2", "-c"], "this looks like bzip2, which trionbd cannot decompress"),
    ],
    ids=["gzip", "xz", "zstd", "bzip2"],
)
def test_a_compressed_container_gets_a_hint(
    compress: list[str], says: str, data: bytes, tmp_path: Path
) -> None:
    src = tmp_path / "disk.img"
    src.write_bytes(data[:100_000])
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as t:
        t.add(src, arcname="disk.img")
    for name, container in (("tar", tar), ("ext2", src), ("zip", src), ("iso", src)):
        path = tmp_path / f"{name}.compressed"
        path.write_bytes(tool(compress, container.read_bytes()))
        result = trionbd_exit("file", str(path), f"--filter={name}")
        assert result.returncode == 1, (name, result.stderr)
        assert f"{name}: " in result.stderr and says in result.stderr, (name, result.stderr)
