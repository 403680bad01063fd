"""TLS with real clients: ``--tls=require|on|off``, ``--tls-certificates`` (nbdkit's file
names, made by trustme), ``--tls-verify-peer``, and the start-up rules for missing
credentials. Clients: nbdinfo/nbdcopy/nbdsh (libnbd, ``nbds+unix://...?tls-certificates=``)
and qemu-img (``tls-creds-x509``)."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme

from tests.support import (
    PYTHON,
    ROOT,
    libnbd_python,
    qemu10,
    random_file,
    run,
    short_tmpdir,
    trionbd_exit,
    trionbd_process,
)
from trionbd.server.tls import psk_supported


@dataclass(frozen=True)
class Certs:
    server: Path
    """--tls-certificates: ca-cert.pem, server-cert.pem, server-key.pem."""
    client: Path
    """libnbd/qemu client directory: our CA, a client certificate signed by it."""
    rogue: Path
    """Trusts our CA, but its client certificate comes from a different CA."""
    anonymous: Path
    """Trusts our CA and has no client certificate."""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    root = tmp_path_factory.mktemp("certs")
    ca, other_ca = trustme.CA(), trustme.CA()
    dirs = Certs(*(root / name for name in ("server", "client", "rogue", "anonymous")))
    for d in (dirs.server, dirs.client, dirs.rogue, dirs.anonymous):
        d.mkdir()
        ca.cert_pem.write_to_path(str(d / "ca-cert.pem"))
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    server.cert_chain_pems[0].write_to_path(str(dirs.server / "server-cert.pem"))
    server.private_key_pem.write_to_path(str(dirs.server / "server-key.pem"))
    for d, issuer in ((dirs.client, ca), (dirs.rogue, other_ca)):
        client = issuer.issue_cert("client.example.com")
        client.cert_chain_pems[0].write_to_path(str(d / "client-cert.pem"))
        client.private_key_pem.write_to_path(str(d / "client-key.pem"))
    return dirs


def tls_uri(socket: str, certs: Path, export: str = "") -> str:
    return f"nbds+unix:///{export}?socket={quote(socket, safe='/')}&tls-certificates={certs}"


def client(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


# --- --tls=require -------------------------------------------------------------------------------


def test_require_serves_tls_clients_byte_for_byte(certs: Certs, tmp_path: Path) -> None:
    data = random_file(tmp_path / "disk.img", 5 * 1024 * 1024 + 4096)
    with trionbd_process(
        "--tls=require", f"--tls-certificates={certs.server}", "file", str(tmp_path / "disk.img")
    ) as server:
        # The printed URI says TLS is needed.
        assert server.uri.startswith("nbds+unix:///?socket=")
        uri = tls_uri(server.socket, certs.client)
        info = run(["nbdinfo", uri])
        assert "with TLS" in info and f"export-size: {len(data)}" in info
        run(["nbdcopy", uri, str(tmp_path / "copy.img")])
        assert (tmp_path / "copy.img").read_bytes() == data
        # Writes go through TLS too (libnbd: write, flush, read back).
        patch = bytes(range(256)) * 64
        out = libnbd_python(
            "import nbd\n"
            "h = nbd.NBD()\n"
            "h.set_uri_allow_local_file(True)\n"
            f"h.connect_uri({uri!r})\n"
            "h.pwrite(bytes(range(256)) * 64, 1_000_000)\n"
            "h.flush()\n"
            f"print(h.pread({len(patch)}, 1_000_000).hex())\n"
        )
        assert bytes.fromhex(out.strip()) == patch
    assert (tmp_path / "disk.img").read_bytes()[1_000_000 : 1_000_000 + len(patch)] == patch


def test_require_refuses_plain_clients(certs: Certs) -> None:
    with trionbd_process(
        "--tls=require", f"--tls-certificates={certs.server}", "memory", "1M"
    ) as server:
        plain = f"nbd+unix:///?socket={server.socket}"
        for cmd in (["nbdinfo", plain], ["nbdinfo", "--list", plain]):
            result = client(cmd)
            assert result.returncode != 0, result.stdout
        # qemu without credentials is told why.
        result = client(["qemu-img", "info", plain])
        assert result.returncode != 0
        assert "TLS is required" in result.stderr
        # The server stays up for TLS clients.
        assert run(["nbdinfo", "--size", tls_uri(server.socket, certs.client)]).strip() == "1048576"


def test_qemu_img_with_x509_credentials(certs: Certs, tmp_path: Path) -> None:
    data = random_file(tmp_path / "disk.img", 2 * 1024 * 1024)
    with trionbd_process(
        "--tls=require", f"--tls-certificates={certs.server}", "file", str(tmp_path / "disk.img")
    ) as server:
        creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs.client}"
        opts = f"driver=nbd,path={server.socket},tls-creds=tls0,tls-hostname=localhost"
        info = run(["qemu-img", "info", "--object", creds, "--image-opts", opts])
        assert "virtual size: 2 MiB (2097152 bytes)" in info
        out = tmp_path / "qemu-copy.img"
        run(["qemu-img", "convert", "--object", creds, "--image-opts", opts, "-O", "raw", str(out)])
        assert out.read_bytes() == data


def test_qemu_10_negotiates_extended_headers_inside_tls(certs: Certs, tmp_path: Path) -> None:
    """What was negotiated before STARTTLS is forgotten; qemu 10 asks for extended
    headers after the TLS handshake and gets them."""
    data = random_file(tmp_path / "disk.img", 2 * 1024 * 1024)
    with trionbd_process(
        "--tls=require", f"--tls-certificates={certs.server}", "file", str(tmp_path / "disk.img")
    ) as server:
        creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs.client}"
        opts = f"driver=nbd,path={server.socket},tls-creds=tls0,tls-hostname=localhost"
        out = tmp_path / "copy.img"
        result = client(
            [qemu10("qemu-img"), "--trace", "nbd_receive_option_reply", "convert",
             "--object", creds, "--image-opts", opts, "-O", "raw", str(out)]
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stderr.splitlines() if "option reply" in line]
    assert "option reply 5 (starttls), type 1 (ack)" in replies[0]
    assert "option reply 11 (extended headers), type 1 (ack)" in replies[1]
    assert out.read_bytes() == data


# --- --tls=on and off ----------------------------------------------------------------------------


def test_on_serves_both_and_is_tls_reaches_open(certs: Certs, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with trionbd_process(
        "--tls=on", f"--tls-certificates={certs.server}", "--filter=log", "memory", "1M",
        f"logfile={log}",
    ) as server:  # fmt: skip
        assert server.uri.startswith("nbd+unix:")  # TLS is optional: the plain URI
        assert "without TLS" in run(["nbdinfo", f"nbd+unix:///?socket={server.socket}"])
        assert "with TLS" in run(["nbdinfo", tls_uri(server.socket, certs.client)])
    # The log filter reports what open() was told, per connection (nbdinfo opens twice).
    seen = set(re.findall(r"connection=(\d+) Connect .* tls=(\d)", log.read_text()))
    assert seen == {("1", "0"), ("2", "1")}, seen


def test_default_is_on_when_certificates_are_given(certs: Certs) -> None:
    with trionbd_process(f"--tls-certificates={certs.server}", "memory", "1M") as server:
        assert "with TLS" in run(["nbdinfo", tls_uri(server.socket, certs.client)])
        assert "without TLS" in run(["nbdinfo", f"nbd+unix:///?socket={server.socket}"])


def test_off_refuses_starttls(certs: Certs) -> None:
    with trionbd_process("--tls=off", f"--tls-certificates={certs.server}", "memory", "1M") as s:
        result = client(["nbdinfo", tls_uri(s.socket, certs.client)])
        assert result.returncode != 0
        assert "without TLS" in run(["nbdinfo", f"nbd+unix:///?socket={s.socket}"])


# --- --tls-verify-peer ---------------------------------------------------------------------------


def test_verify_peer_accepts_certificates_from_our_ca_only(certs: Certs) -> None:
    with trionbd_process(
        "--tls=require", f"--tls-certificates={certs.server}", "--tls-verify-peer",
        "memory", "1M",
    ) as server:  # fmt: skip
        assert run(["nbdinfo", "--size", tls_uri(server.socket, certs.client)]).strip() == (
            "1048576"
        )
        for refused in (certs.rogue, certs.anonymous):
            result = client(["nbdinfo", "--size", tls_uri(server.socket, refused)])
            assert result.returncode != 0, (refused, result.stdout)
            assert result.stdout == ""
        # The server keeps serving good clients after refusing bad ones.
        assert run(["nbdinfo", "--size", tls_uri(server.socket, certs.client)]).strip() == (
            "1048576"
        )
        assert server.stderr.count("TLS handshake failed") == 2, server.stderr


def test_without_verify_peer_any_client_certificate_will_do(certs: Certs) -> None:
    with trionbd_process(
        "--tls=require", f"--tls-certificates={certs.server}", "memory", "1M"
    ) as server:
        for d in (certs.rogue, certs.anonymous):
            assert run(["nbdinfo", "--size", tls_uri(server.socket, d)]).strip() == "1048576"


# --- start-up rules ------------------------------------------------------------------------------


def test_require_without_certificates_does_not_start(tmp_path: Path) -> None:
    result = trionbd_exit("--tls=require", f"--tls-certificates={tmp_path}", "memory", "1M")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "--tls=require but no TLS certificates were found in" in result.stderr
    assert "ca-cert.pem, server-cert.pem and server-key.pem" in result.stderr


def test_on_without_certificates_warns_and_serves_plain(tmp_path: Path) -> None:
    with trionbd_process("--tls=on", f"--tls-certificates={tmp_path}", "memory", "1M") as server:
        assert "without TLS" in run(["nbdinfo", server.uri])
        assert "TLS is disabled: no certificates were found" in server.stderr


def test_unreadable_key_fails_start_up(certs: Certs, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        (broken / name).write_bytes((certs.server / name).read_bytes())
    (broken / "server-key.pem").write_text("not a key\n")
    result = trionbd_exit(f"--tls-certificates={broken}", "null")
    assert result.returncode == 1
    assert "cannot load the TLS server certificate and key" in result.stderr


@pytest.mark.skipif(psk_supported(), reason="this Python's ssl module has PSK callbacks")
def test_psk_is_refused_on_python_without_psk_callbacks(tmp_path: Path) -> None:
    keys = tmp_path / "keys.psk"
    run(["psktool", "-u", "alice", "-p", str(keys)])
    result = trionbd_exit(f"--tls-psk={keys}", "memory", "1M")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("trionbd: --tls-psk needs Python 3.13 or later")


def psk_python() -> str | None:
    """An interpreter whose ssl module has PSK callbacks and that can run trionbd: this
    one, or the one named by TRIONBD_PSK_PYTHON (e.g. a Python 3.13 venv with trio and
    crc32c installed)."""
    for python in (PYTHON, os.environ.get("TRIONBD_PSK_PYTHON")):
        if python is None:
            continue
        probe = subprocess.run(
            [python, "-c", "import ssl, trio, crc32c, trionbd; assert ssl.HAS_PSK"],
            capture_output=True, env=os.environ | {"PYTHONPATH": str(ROOT)}, check=False,
        )  # fmt: skip
        if probe.returncode == 0:
            return python
    return None


@pytest.mark.skipif(
    psk_python() is None,
    reason="needs a Python >= 3.13 with trio and crc32c: set TRIONBD_PSK_PYTHON",
)
def test_psk_with_libnbd(tmp_path: Path) -> None:
    python = psk_python()
    assert python is not None
    keys, strangers = tmp_path / "keys.psk", tmp_path / "strangers.psk"
    run(["psktool", "-u", "alice", "-p", str(keys)])
    run(["psktool", "-u", "mallory", "-p", str(strangers)])
    # alice's name with another key: the handshake must fail.
    (tmp_path / "forged.psk").write_text("alice:" + "00" * 32 + "\n")
    with short_tmpdir() as tmp:
        sock = tmp / "sock"
        proc = subprocess.Popen(
            [python, "-m", "trionbd", "-f", "--print-uri", "-U", str(sock), "--tls=require",
             f"--tls-psk={keys}", "memory", "1M"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("nbds+unix:")

            def uri(user: str, file: Path) -> str:
                return f"nbds+unix://{user}@/?socket={sock}&tls-psk-file={file}"

            assert run(["nbdinfo", "--size", uri("alice", keys)]).strip() == "1048576"
            for user, file in (("mallory", strangers), ("alice", tmp_path / "forged.psk")):
                assert client(["nbdinfo", "--size", uri(user, file)]).returncode != 0, user
            plain = client(["nbdinfo", f"nbd+unix:///?socket={sock}"])
            assert plain.returncode != 0
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert err.count("TLS handshake failed") == 2, err
