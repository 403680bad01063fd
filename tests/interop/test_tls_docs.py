"""docs/tls.md's recipes, run exactly as written, make credentials real clients connect
with: the certificates serve nbdinfo and nbdcopy over TCP (the client checks the CA and
the host name, the server the client's certificate); the PSK file is read by trionbd and
serves libnbd (through trionbd on Python 3.13, else through nbdkit, which reads the same
format)."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    HANG_GUARD,
    PYTHON,
    ROOT,
    nbdkit_process,
    random_file,
    read_line,
    run,
    trionbd_process,
)
from trionbd.server.tls import psk_supported, read_psk_file

DOC = ROOT / "docs" / "tls.md"
RECIPE = "# In an empty directory"
"""The first line of each recipe block in docs/tls.md."""


def recipes() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.DOTALL)
    return [block for block in blocks if block.startswith(RECIPE)]


def follow(recipe: str, where: Path) -> None:
    """Run a recipe as a user pasting it into bash would, stopping at the first error."""
    result = subprocess.run(
        ["bash", "-e", "-c", recipe], cwd=where, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{recipe}\nfailed:\n{result.stdout}{result.stderr}"


def test_the_doc_has_its_two_recipes() -> None:
    certificates, psk = recipes()
    assert "server/server-cert.pem" in certificates and "keys.psk" in psk


@pytest.fixture
def tcp_server(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """trionbd serving a file over TLS on 127.0.0.1 with the recipe's certificates and
    --tls-verify-peer, as docs/tls.md says; yields its port and the file's bytes."""
    certificates, _ = recipes()
    follow(certificates, tmp_path)
    data = random_file(tmp_path / "disk.img", 3 * 1024 * 1024 + 512)
    proc = subprocess.Popen(
        [PYTHON, "-m", "trionbd", "-f", "--print-uri", "-p", "0", "-i", "127.0.0.1",
         "--tls=require", "--tls-certificates=server", "--tls-verify-peer",
         "file", "disk.img"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        uri = read_line(proc, HANG_GUARD).strip()
        port = re.fullmatch(r"nbds://127\.0\.0\.1:(\d+)/", uri)
        assert port, uri
        yield port.group(1), data
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


def test_the_certificates_serve_real_clients(
    tcp_server: tuple[str, bytes], tmp_path: Path
) -> None:
    port, data = tcp_server
    # The name the recipe put in the certificate is the one the client connects to.
    uri = f"nbds://localhost:{port}/?tls-certificates={tmp_path / 'client'}"
    assert "with TLS" in run(["nbdinfo", uri])
    run(["nbdcopy", uri, str(tmp_path / "copy.img")])
    assert (tmp_path / "copy.img").read_bytes() == data
    # --tls-verify-peer is in force: a client that trusts the CA but has no certificate
    # of its own is refused.
    anonymous = tmp_path / "anonymous"
    anonymous.mkdir()
    shutil.copy(tmp_path / "ca-cert.pem", anonymous)
    refused = subprocess.run(
        ["nbdinfo", "--size", f"nbds://localhost:{port}/?tls-certificates={anonymous}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0, refused.stdout


def test_the_psk_file_is_read_and_serves_libnbd(tmp_path: Path) -> None:
    _, psk = recipes()
    follow(psk, tmp_path)
    keys = tmp_path / "keys.psk"
    assert re.fullmatch(r"alice:[0-9a-f]{64}\n", keys.read_text())
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert list(read_psk_file(str(keys))) == ["alice"]
    args = ["--tls=require", f"--tls-psk={keys}", "memory", "1M"]
    server = trionbd_process(*args) if psk_supported() else nbdkit_process(*args)
    with server as running:
        uri = f"nbds+unix://alice@/?socket={running.socket}&tls-psk-file={keys}"
        assert run(["nbdinfo", "--size", uri]).strip() == str(1 << 20)
