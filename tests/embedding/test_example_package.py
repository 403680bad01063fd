"""The example package of docs/plugins.md, installed with pip into a directory of its own,
run by the real ``trionbd`` command through its entry points (and as module:attribute),
with real clients comparing every byte."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import PYTHON, ROOT, nbdsh, run, trionbd_process

EXAMPLE = ROOT / "examples" / "trionbd-example"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a ``trionbd`` that sees the example package (``pip install
    --target``, then ``PYTHONPATH``): nothing is installed into the project's venv."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("source") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source)  # building writes into the source tree
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    result = subprocess.run(
        [*pip, "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    yield {**os.environ, "PYTHONPATH": str(target)}


def trionbd(*args: str, env: dict[str, str]) -> str:
    return run([PYTHON, "-m", "trionbd", *args], env=env, cwd="/")


def nbdcopy(source: str, dest: str) -> None:
    run(["nbdcopy", source, dest])


def test_help_lists_the_installed_plugin_and_filter(env: dict[str, str]) -> None:
    listing = trionbd("--help", env=env)
    assert "  mem-example    a RAM disk (the example plugin of trionbd's docs/plugins.md)." in (
        listing
    )
    assert "  xor-example    XOR every byte with a key" in listing
    manual = trionbd("--filter=xor-example", "--help", env=env)
    assert manual.startswith("xor-example: XOR every byte with a key")
    assert re.search(r"\nParameters of xor-example:\n  xor-key=N +the key, a byte", manual)
    # Without the package, the name is unknown and the error says which names are known.
    bare = subprocess.run(
        [PYTHON, "-m", "trionbd", "mem-example", "1M"], capture_output=True, text=True, cwd="/"
    )
    assert bare.returncode == 2
    assert "unknown plugin 'mem-example' (known: file, http, memory" in bare.stderr


def test_the_plugin_by_entry_point_name_with_nbdcopy(env: dict[str, str], tmp_path: Path) -> None:
    data = random.Random(3).randbytes(8 * MiB)
    (tmp_path / "in").write_bytes(data)
    with trionbd_process("mem-example", "8M", env=env) as server:
        info = run(["nbdinfo", "--size", server.uri])
        assert int(info) == 8 * MiB
        nbdcopy(str(tmp_path / "in"), server.uri)
        nbdcopy(server.uri, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == data


def test_the_filter_by_entry_point_name_over_a_file(env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    plain = random.Random(4).randbytes(4 * MiB)
    image.write_bytes(bytes(b ^ 0xFF for b in plain))
    with trionbd_process("--filter=xor-example", "file", str(image), "xor-key=0xff", env=env) as s:
        nbdcopy(s.uri, str(tmp_path / "read"))
        assert (tmp_path / "read").read_bytes() == plain
        fresh = random.Random(5).randbytes(4 * MiB)
        (tmp_path / "fresh").write_bytes(fresh)
        nbdcopy(str(tmp_path / "fresh"), s.uri)
    assert image.read_bytes() == bytes(b ^ 0xFF for b in fresh)


def test_module_attribute_names_and_filter_parameters_routing(
    env: dict[str, str], tmp_path: Path
) -> None:
    """``module:Class`` for both; ``xor-key`` goes to the filter, the bare size to the
    plugin; the default key applies when none is given."""
    data = random.Random(6).randbytes(MiB)
    (tmp_path / "in").write_bytes(data)
    args = ["--filter=trionbd_example.filter:XorExample", "trionbd_example.plugin:MemExample"]
    for key in ([], ["xor-key=7"]):
        with trionbd_process(*args, "1M", *key, env=env) as server:
            nbdcopy(str(tmp_path / "in"), server.uri)
            nbdcopy(server.uri, str(tmp_path / "out"))
            assert (tmp_path / "out").read_bytes() == data
            # Zeroing goes through the filter too (libnbd's zero): it reads back as zeroes.
            nbdsh(server.uri, "h.zero(65536, 4096); assert h.pread(65536, 4096) == bytes(65536)")
    bad = subprocess.run(
        [PYTHON, "-m", "trionbd", *args, "1M", "xor-key=300"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
    )
    assert bad.returncode == 2
    assert bad.stderr == "trionbd: xor-example: xor-key=300 is not a byte\n"
