"""The smallest end-to-end check: the real command serves a file to real clients."""

from pathlib import Path

from tests.support import random_file, run, trionbd_process


def test_nbdcopy_reads_the_file_byte_for_byte(tmp_path: Path) -> None:
    data = random_file(tmp_path / "disk.img", 3 * 1024 * 1024 + 512)
    with trionbd_process("file", str(tmp_path / "disk.img")) as server:
        run(["nbdcopy", server.uri, str(tmp_path / "copy.img")])
        size = run(["nbdinfo", "--size", server.uri]).strip()
    assert (tmp_path / "copy.img").read_bytes() == data
    assert int(size) == len(data)
