"""The http plugin (alias curl) against a real nginx: plain, HTTPS, a Unix socket and a
proxy; redirects, authentication and headers; tar archives through the tar filter; read
by real clients (nbdcopy, nbdinfo, qemu-img, fio) and compared byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import trionbd
from tests.remote.conftest import Files
from tests.remote.servers import PASSWORD, USER, Nginx
from tests.support import (
    export_info,
    listing,
    read_export,
    run,
    serving,
    trionbd_exit,
    trionbd_process,
    trionbd_run,
)
from trionbd.plugins.http import HttpPlugin


def connections_used(log: Path, path: str) -> set[str]:
    """nginx's connection serial numbers of the requests for ``path``."""
    return {line.split()[0] for line in log.read_text().splitlines() if f" {path} " in line}


# --- data, byte for byte -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["http", "curl"])
def test_nbdcopy_reads_every_byte(name: str, web: Nginx, files: Files, tmp_path: Path) -> None:
    with trionbd_process(name, web.url("disk.img")) as server:
        info = export_info(server.uri)
        assert info["export-size"] == len(files.image)
        assert info["is_read_only"] is True
        assert info["can_multi_conn"] is True
        assert read_export(server.uri, tmp_path) == files.image
        # Four connections at once (multi-conn), a pool of connections=4 to nginx.
        out = tmp_path / "multi.img"
        run(["nbdcopy", "--connections=4", "--requests=16", server.uri, str(out)])
        assert out.read_bytes() == files.image


def test_qemu_img_and_fio(web: Nginx, files: Files, tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    source.write_bytes(files.image)
    with trionbd_process("http", f"url={web.url('disk.img')}", "connections=2") as server:
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri, str(source)])
        out = tmp_path / "converted.img"
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(out)])
        converted = out.read_bytes()  # qemu rounds the size up to 512-byte sectors
        assert converted[: len(files.image)] == files.image
        assert converted[len(files.image) :] == bytes(-len(files.image) % 512)
        fio = run(
            ["fio", "--name=rand", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randread",
             "--bs=4k", "--iodepth=16", "--size=4M", "--io_size=2M", "--output-format=json"]
        )  # fmt: skip
        job = json.loads(fio[fio.index("{") :])["jobs"][0]
        assert job["error"] == 0
        assert job["read"]["io_bytes"] == 2 << 20


def test_the_pool_keeps_its_connections(web: Nginx, files: Files, tmp_path: Path) -> None:
    """connections=1: hundreds of range GETs over one kept-alive connection."""
    web.access_log.write_text("")
    # One process: each worker process has a pool of its own.
    with trionbd_process("--workers=1", "http", web.url("agent/disk.img"), "connections=1",
                         "user-agent=test-agent/1") as server:  # fmt: skip
        run(["nbdcopy", "--connections=2", "--request-size=16384", server.uri, str(tmp_path / "x")])
    assert (tmp_path / "x").read_bytes() == files.image
    lines = [line for line in web.access_log.read_text().splitlines() if "agent/disk.img" in line]
    assert len(lines) > len(files.image) // 16384
    assert len(connections_used(web.access_log, "/agent/disk.img")) == 1


def test_tar_archive_members_over_http(web: Nginx, files: Files, tmp_path: Path) -> None:
    with trionbd_process("http", web.url("archive.tar"), "--filter=tar") as server:
        exports = listing(server.uri)
        assert sorted(e["export-name"] for e in exports) == sorted(files.members)
        for name, data in files.members.items():
            assert export_info(server.uri_for(name))["export-size"] == len(data)
            assert read_export(server.uri_for(name), tmp_path) == data


async def test_the_pool_lives_until_the_server_stops(web: Nginx, files: Files) -> None:
    plugin = HttpPlugin(url=web.url("disk.img"), connections=2)
    async with serving(plugin) as server:
        assert plugin.size == len(files.image)
        pool = plugin.remote._client
        assert pool is not None and not pool.is_closed
        addr = server.addresses[0]
        async with await trionbd.connect_uri(addr.uri("")) as disk:
            assert await disk.pread(1000, 4096) == files.image[4096:5096]
    assert plugin.remote._client is None and pool.is_closed


# --- TLS -----------------------------------------------------------------------------------


def test_https_with_cainfo(web: Nginx, files: Files, tmp_path: Path) -> None:
    with trionbd_process("http", web.url("disk.img", tls=True), f"cainfo={web.ca_file}") as server:
        assert read_export(server.uri, tmp_path) == files.image


def test_https_with_capath(web: Nginx, files: Files, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    web.ca.cert_pem.write_to_path(str(certs / "test-ca.pem"))
    run(["openssl", "rehash", str(certs)])
    with trionbd_process("http", web.url("disk.img", tls=True), f"capath={certs}") as server:
        assert read_export(server.uri, tmp_path) == files.image


def test_https_unknown_ca_is_refused_unless_sslverify_false(
    web: Nginx, files: Files, tmp_path: Path
) -> None:
    url = web.url("disk.img", tls=True)
    result = trionbd_exit("http", url, "retries=0")
    assert result.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr or "certificate" in result.stderr
    with trionbd_process("http", url, "sslverify=false") as server:
        assert read_export(server.uri, tmp_path) == files.image


# --- where it connects ---------------------------------------------------------------------


def test_unix_socket_path(web: Nginx, files: Files, tmp_path: Path) -> None:
    args = ("http", "http://localhost/disk.img", f"unix-socket-path={web.socket}")
    with trionbd_process(*args) as server:
        assert read_export(server.uri, tmp_path) == files.image


def test_proxy(web: Nginx, files: Files, tmp_path: Path) -> None:
    # Nothing listens on port 1: only the proxy can get the data.
    url = "http://127.0.0.1:1/disk.img"
    with trionbd_process("http", url, f"proxy=http://127.0.0.1:{web.proxy_port}") as server:
        assert read_export(server.uri, tmp_path) == files.image
    assert "GET http://127.0.0.1:1/disk.img" in web.proxy_log.read_text() or (
        "GET /disk.img" in web.proxy_log.read_text()
    )
    assert trionbd_exit("http", url, "retries=0").returncode == 1


def test_redirects_are_followed_once_at_start_up(web: Nginx, files: Files, tmp_path: Path) -> None:
    web.access_log.write_text("")
    with trionbd_process("--workers=1", "http", web.url("moved-away")) as server:
        assert read_export(server.uri, tmp_path) == files.image
    log = web.access_log.read_text()
    assert log.count('"HEAD /moved-away') == 1 and log.count('"HEAD /moved ') == 1
    assert '"GET /moved' not in log.replace('"GET /moved-away', "")  # reads use the final URL
    assert log.count('"GET /disk.img') > 1
    result = trionbd_exit("http", web.url("moved"), "followlocation=false")
    assert result.returncode == 1
    assert "followlocation=false" in result.stderr and "/disk.img" in result.stderr


# --- authentication and headers ------------------------------------------------------------


def test_basic_authentication(web: Nginx, files: Files, tmp_path: Path) -> None:
    url = web.url("private/disk.img")
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    for password in (f"password={PASSWORD}", f"password=+{secret}"):
        with trionbd_process("http", url, f"user={USER}", password) as server:
            assert read_export(server.uri, tmp_path) == files.image
    # password=- reads a line of stdin when stdin is not a terminal.
    result = trionbd_run(
        "-U", "-", "--run", "nbdinfo --size \"$uri\"", "http", url, f"user={USER}", "password=-",
        input=PASSWORD + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(len(files.image))
    wrong = trionbd_exit("http", url, f"user={USER}", "password=nope")
    assert wrong.returncode == 1
    assert "401" in wrong.stderr


def test_cookie_header_and_user_agent(web: Nginx, files: Files, tmp_path: Path) -> None:
    cookie = tmp_path / "cookie"
    cookie.write_text("session=s3cr3t\n")
    cases = [
        ("cookie/disk.img", "cookie=session=s3cr3t"),
        ("cookie/disk.img", f"cookie=+{cookie}"),
        ("header/disk.img", "header=X-Token: t0k3n"),
        ("agent/disk.img", "user-agent=test-agent/1"),
    ]
    for path, param in cases:
        with trionbd_process("http", web.url(path), param) as server:
            assert read_export(server.uri, tmp_path) == files.image
        refused = trionbd_exit("http", web.url(path))
        assert refused.returncode == 1
        assert "403" in refused.stderr


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (("url=ftp://host/x",), "is not an http:// or https:// URL"),
        (("http://h/x", "nosuch=1"), "unknown parameter 'nosuch'"),
        (("http://h/x", "header=no colon"), "is not a header"),
        (("http://h/x", "password=x"), "password= needs user="),
        (("http://h/x", "connections=0"), "connections=0"),
        (("http://h/x", "timeout=soon"), "is not a number of seconds"),
        (("http://h/x", "sslverify=false", "cainfo=/x"), "make no sense"),
        (("http://h/x", "cainfo=/nonexistent/ca.pem"), "cannot load cainfo="),
    ],
)
def test_bad_parameters_exit_2(args: tuple[str, ...], message: str) -> None:
    result = trionbd_exit("http", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_a_missing_file_fails_start_up(web: Nginx) -> None:
    result = trionbd_exit("curl", web.url("nothing-here.img"))
    assert result.returncode == 1
    assert re.search(r"HTTP 404 Not Found", result.stderr), result.stderr


def test_help_of_both_names() -> None:
    for name in ("http", "curl"):
        help_text = trionbd_run(name, "--help").stdout
        assert help_text.startswith("http: serve a file from an HTTP or HTTPS server"), help_text
        assert "unix-socket-path=" in help_text
