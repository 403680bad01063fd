"""The remote servers of the http and s3 tests, started on 127.0.0.1 and stopped by the
tests: Debian's nginx (plain, HTTPS with trustme certificates, a Unix socket), a small
HTTP server of our own for the faults nginx will not make, and moto's S3 server."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from tests.support import START_TIMEOUT, short_tmpdir

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free a moment ago (a start that loses the race is retried)."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path) -> bool:
    """True once ``port`` accepts connections; False if ``proc`` exited first."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex((LOCALHOST, port)) == 0:
                return True
        time.sleep(0.05)
    raise AssertionError(f"{proc.args} did not listen on {port}:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- nginx ---------------------------------------------------------------------------------

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {tmp}/error.log info;
pid {tmp}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    log_format conns '$connection "$request" $status "$http_range"';
    access_log {tmp}/access.log conns;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 1000000;
    server {{
        listen {host}:{port};
        listen {host}:{tls_port} ssl;
        listen unix:{tmp}/nginx.sock;
        ssl_certificate {tmp}/server.pem;
        ssl_certificate_key {tmp}/server.key;
        root {root};
        location = /moved {{ return 302 /disk.img; }}
        location = /moved-away {{ return 301 http://{host}:{port}/moved; }}
        location /private/ {{
            auth_basic "trionbd tests";
            auth_basic_user_file {tmp}/htpasswd;
        }}
        location /cookie/ {{
            if ($http_cookie !~ "session=s3cr3t") {{ return 403; }}
        }}
        location /header/ {{
            if ($http_x_token != "t0k3n") {{ return 403; }}
        }}
        location /agent/ {{
            if ($http_user_agent != "test-agent/1") {{ return 403; }}
        }}
    }}
    server {{
        listen {host}:{proxy_port};
        access_log {tmp}/proxy.log conns;
        location / {{ proxy_pass http://{host}:{port}; }}
    }}
}}
"""
USER, PASSWORD = "alice", "wonderland"


@dataclass
class Nginx:
    """A running nginx serving ``root``."""

    root: Path
    port: int
    tls_port: int
    proxy_port: int
    """A forward proxy (for plain http) logging to ``proxy_log``."""
    socket: str
    ca: trustme.CA
    ca_file: Path
    access_log: Path
    proxy_log: Path

    def url(self, path: str, tls: bool = False) -> str:
        if tls:
            return f"https://localhost:{self.tls_port}/{path}"
        return f"http://{LOCALHOST}:{self.port}/{path}"


@contextlib.contextmanager
def nginx(root: Path) -> Iterator[Nginx]:
    """nginx on two free ports of 127.0.0.1 (plain and HTTPS, for ``localhost`` and
    127.0.0.1 with a trustme CA) and a Unix socket, serving the files under ``root``."""
    with short_tmpdir() as tmp:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", LOCALHOST)
        cert.private_key_pem.write_to_path(str(tmp / "server.key"))
        cert.cert_chain_pems[0].write_to_path(str(tmp / "server.pem"))
        ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
        (tmp / "htpasswd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        log = tmp / "error.log"
        for _ in range(5):
            port, tls_port, proxy_port = free_port(), free_port(), free_port()
            conf = NGINX_CONF.format(
                tmp=tmp, host=LOCALHOST, port=port, tls_port=tls_port, proxy_port=proxy_port,
                root=root,
            )  # fmt: skip
            (tmp / "nginx.conf").write_text(conf)
            cmd = ["nginx", "-p", str(tmp), "-e", str(log), "-c", str(tmp / "nginx.conf")]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                if all(_wait_for_port(proc, p, log) for p in (port, tls_port, proxy_port)):
                    yield Nginx(
                        root, port, tls_port, proxy_port, str(tmp / "nginx.sock"), ca,
                        tmp / "ca.pem", tmp / "access.log", tmp / "proxy.log",
                    )  # fmt: skip
                    return
            finally:
                _stop(proc)
            if "Address already in use" not in log.read_text():
                raise AssertionError(f"nginx did not start:\n{log.read_text()}")
        raise AssertionError("nginx found no free port in 5 tries")


# --- a server of faults --------------------------------------------------------------------


@dataclass
class Faults:
    """What :class:`FaultServer` does; tests change it between requests.

    ``head`` answers HEAD: "ok", a status number, or "drop" (close at once). ``plan`` is
    a queue of actions for the next GETs (then "ok"): "ok", a status number, "drop"
    (half the body, then close), "slow" (half the body, then nothing for ``slow``
    seconds), "short" and "long" (a body one byte short or long for its Content-Range,
    framed as such), "wrong-range" (the next range), "whole" (200 and the whole body,
    ignoring the range), "trickle" (the body a byte at a time, ``trickle`` seconds apart)."""

    head: str | int = "ok"
    plan: list[str | int | tuple[int, str]] = field(default_factory=list)
    """A (status, code) pair answers with S3's XML error body of that code."""
    slow: float = 30.0
    trickle: float = 0.05


class FaultServer(http.server.ThreadingHTTPServer):
    """An HTTP/1.1 server of ``data`` on 127.0.0.1 that follows :class:`Faults`."""

    daemon_threads = True

    def __init__(self, data: bytes):
        super().__init__((LOCALHOST, 0), _FaultHandler)
        self.data = data
        self.faults = Faults()
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str | None]] = []
        """(method, Range header) of every request, in order."""
        self.sent = 0
        """Body bytes written to clients."""
        self.broken = threading.Event()
        """Set when a client went away while we were sending to it."""

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.server_address[1]}/disk.img"

    def next_action(self) -> str | int | tuple[int, str]:
        with self.lock:
            return self.faults.plan.pop(0) if self.faults.plan else "ok"

    def gets(self) -> int:
        return sum(1 for method, _ in self.requests if method == "GET")


class _FaultHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        server = self.server
        server.requests.append(("HEAD", None))
        head = server.faults.head
        if head == "drop":
            self.close_connection = True
            return
        if head != "ok":
            self._status(int(head))
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(server.data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        server = self.server
        rng = self.headers.get("Range")
        server.requests.append(("GET", rng))
        action = server.next_action()
        data = server.data
        if isinstance(action, int):
            self._status(action)
            return
        if isinstance(action, tuple):
            self._status(*action)
            return
        if rng is None or action == "whole":
            self._send(200, data, None)
            return
        first, last = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        last = min(last, len(data) - 1)
        if action == "wrong-range":
            first, last = first + 1, last + 1
        body = data[first : last + 1]
        crange = f"bytes {first}-{last}/{len(data)}"
        if action == "short":
            body = body[:-1]
        elif action == "long":
            body = body + b"x"
        self._send(206, body, crange, action)

    def _status(self, status: int, code: str = "") -> None:
        message = f"<Error><Code>{code}</Code><Message>as planned</Message></Error>"
        body = message.encode() if code else b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send(self, status: int, body: bytes, crange: str | None, action: str = "ok") -> None:
        server = self.server
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if crange is not None:
            self.send_header("Content-Range", crange)
        self.end_headers()
        try:
            if action in ("drop", "slow"):
                half = body[: len(body) // 2]
                self.wfile.write(half)
                self.wfile.flush()
                server.sent += len(half)
                if action == "slow":
                    time.sleep(server.faults.slow)
                self.close_connection = True
                return
            if action == "trickle":
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    server.sent += 1
                    time.sleep(server.faults.trickle)
                return
            for i in range(0, len(body), 1 << 16):
                self.wfile.write(body[i : i + (1 << 16)])
                server.sent += len(body[i : i + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            server.broken.set()
            self.close_connection = True


@contextlib.contextmanager
def fault_server(data: bytes) -> Iterator[FaultServer]:
    server = FaultServer(data)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# --- moto's S3 server ----------------------------------------------------------------------

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws/config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws/credentials",
}
"""Credentials for moto (it takes any unless told to check), no instance metadata
lookups, and none of the machine's own AWS files."""


@dataclass
class Moto:
    endpoint: str
    log: Path

    def client(self) -> Any:
        """A boto3 S3 client of moto (boto3 comes with moto)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
        )

    def requests(self, *needles: str) -> int:
        """How many requests moto logged whose line contains every one of ``needles``."""
        lines = self.log.read_text().splitlines()
        return sum(1 for line in lines if all(n in line for n in needles))


@contextlib.contextmanager
def moto_server() -> Iterator[Moto]:
    """``python -m moto.server`` on a free port of 127.0.0.1."""
    with short_tmpdir() as tmp:
        log = tmp / "moto.log"
        for _ in range(5):
            port = free_port()
            cmd = [sys.executable, "-m", "moto.server", "-H", LOCALHOST, "-p", str(port)]
            with open(log, "w") as out:
                env = {**os.environ, **S3_ENV}
                proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env)
            try:
                if _wait_for_port(proc, port, log):
                    yield Moto(f"http://{LOCALHOST}:{port}", log)
                    return
            finally:
                _stop(proc)
            if "Address already in use" not in log.read_text():
                raise AssertionError(f"moto did not start:\n{log.read_text()}")
        raise AssertionError("moto found no free port in 5 tries")
