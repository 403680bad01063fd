"""Fixtures of the remote plugins' tests: the files nginx serves, nginx itself and moto's
S3 server, one of each per test module (each xdist worker starts its own)."""

from __future__ import annotations

import io
import random
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.remote.servers import S3_ENV, Moto, Nginx, moto_server, nginx

MiB = 1 << 20
IMAGE_SIZE = 5 * MiB + 12345
"""Not a multiple of any block size: the last read is short."""


@dataclass
class Files:
    root: Path
    image: bytes
    """``disk.img`` (also under private/, cookie/, header/ and agent/)."""
    archive: bytes
    """``archive.tar``."""
    members: dict[str, bytes]
    """The regular files in ``archive.tar`` by name."""


def make_tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def tar_members(rng: random.Random, count: int, prefix: str = "") -> dict[str, bytes]:
    """``count`` members of sizes from 0 to about 300 KiB, one in a subdirectory."""
    sizes = [0, 1, 511, 4096, 300 * 1024 + 7] + [rng.randrange(1, 200_000) for _ in range(count)]
    names = [f"{prefix}m{i:03d}.bin" for i in range(count)]
    names[-1] = f"{prefix}dir/last member.img"
    return {name: rng.randbytes(sizes[i % len(sizes)]) for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("www")
    root.chmod(0o755)
    rng = random.Random(17)
    image = rng.randbytes(IMAGE_SIZE)
    (root / "disk.img").write_bytes(image)
    for sub in ("private", "cookie", "header", "agent"):
        (root / sub).mkdir()
        shutil.copy(root / "disk.img", root / sub / "disk.img")
    members = tar_members(rng, 12)
    archive = make_tar(members)
    (root / "archive.tar").write_bytes(archive)
    return Files(root, image, archive, members)


@pytest.fixture(scope="module")
def web(files: Files) -> Iterator[Nginx]:
    with nginx(files.root) as server:
        yield server


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with moto_server() as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's credentials in the environment that trionbd and nbdkit inherit."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
