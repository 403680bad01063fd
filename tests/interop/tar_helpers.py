"""Helpers of the tar filter's tests: source trees, archives made by GNU tar, maps.

Archives are always written by the real ``tar`` (GNU tar); the tests then compare what
the filter serves with the source files and, after writes, with what GNU tar extracts.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from pathlib import Path

from tests.support import run, sparse_file

TAR = "--filter=tar"
MTIME = 1_700_000_000
"""Modification time given to every source file (2023-11-14T22:13:20Z)."""
MTIME_TEXT = "2023-11-14T22:13:20Z"
KiB = 1024
MiB = 1024 * 1024


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    """Create ``files`` (path -> content) under ``root`` with mode 0644 and MTIME."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)
        os.utime(path, (MTIME, MTIME))


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def make_sparse(path: Path, size: int, data: list[tuple[int, int]], seed: int) -> bytes:
    """A sparse file of ``size`` bytes with random bytes in the ``data`` ranges (holes
    elsewhere, as far as the file system allows), mode 0644 and MTIME; its content."""
    content = sparse_file(path, size, data, seed)
    path.chmod(0o644)
    os.utime(path, (MTIME, MTIME))
    return content


def gnu_tar(archive: Path, src: Path, members: list[str], *options: str) -> Path:
    """``tar OPTIONS -C SRC -cf ARCHIVE --no-recursion MEMBERS`` (members in that order)."""
    run(["tar", *options, "-C", str(src), "--no-recursion", "-cf", str(archive), *members])
    return archive


def extract(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` with GNU tar into ``dest`` (created)."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["tar", "-C", str(dest), "-xf", str(archive)])
    return dest


def data_offsets(archive: Path) -> dict[str, int]:
    """Where each regular member's data starts in ``archive`` (read with the stdlib's
    tarfile, independently of the filter), by name without a leading ``./``."""
    with tarfile.open(archive) as tar:
        return {m.name.removeprefix("./"): m.offset_data for m in tar if m.isreg()}


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map --json`` as merged ``(offset, length, type)`` runs."""
    runs = json.loads(run(["nbdinfo", "--map", "--json", uri]))
    return merge([(r["offset"], r["length"], r["type"]) for r in runs])


def merge(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for offset, length, kind in runs:
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, kind)
        else:
            out.append((offset, length, kind))
    return out
