"""The ip filter: clients let in or kept out by address (TCP from 127.0.0.1 and ::1),
by Unix socket credentials (clients running as root and as nobody), and by the name
on their TLS client certificate. Address and credential rules run on trionbd and on
nbdkit 1.32 alike (nbdkit 1.32 has no ``dn:`` rules)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.support import (
    HANG_GUARD,
    PYTHON,
    ROOT,
    Running,
    nbdkit_process,
    short_tmpdir,
    trionbd_exit,
    trionbd_process,
    wait_until,
)
from trionbd.chain import ClientInfo
from trionbd.chain.clientinfo import Credentials
from trionbd.filters.ip import IpFilter, parse_rules
from trionbd.server.tls import client_dn

SERVERS = {"ours": [PYTHON, "-m", "trionbd"], "nbdkit": ["nbdkit"]}
Start = Callable[..., contextlib.AbstractContextManager[Running]]


def allowed(uri: str, *as_user: str) -> bool:
    """Whether ``nbdinfo --size URI`` (run with ``as_user`` in front, to change user)
    gets in."""
    result = subprocess.run(
        [*as_user, "nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60
    )
    if result.returncode == 0:
        assert result.stdout.strip() == "1048576"
        return True
    assert "nbdinfo:" in result.stderr, result.stderr
    return False


def ip(allow: str | None, deny: str | None) -> list[str]:
    return ["--filter=ip", "memory", "1M"] + [
        f"{key}={value}" for key, value in (("allow", allow), ("deny", deny)) if value
    ]


# --- TCP -----------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on IPv4 and IPv6 (a dual-stack socket's)."""
    with socket.socket(socket.AF_INET6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def tcp_server(program: list[str], args: list[str]) -> Iterator[int]:
    """``PROGRAM -f -p PORT ARGS`` (on every address) until the block ends; its port."""
    with short_tmpdir() as tmp:
        port, pidfile = free_port(), tmp / "pid"
        cmd = [*program, "-f", "-p", str(port), "-P", str(pidfile), *args]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            wait_until(lambda: pidfile.exists() or proc.poll() is not None, "it listens")
            assert proc.poll() is None, proc.communicate()[1]
            yield port
        finally:
            proc.terminate()
            proc.communicate(timeout=HANG_GUARD)


KEYWORDS = [
    ("anyipv6", "all", False, True),
    ("ALLIPV4", "any", True, False),
    ("anyunix", "all", False, False),
    (None, "anyunix", True, True),
    ("anyipv4,anyipv6", "all", True, True),
]
"""Cases nbdkit 1.32 can run too: Debian's 1.32.5 cannot parse address rules at all
("don't know how to parse rule: allow=127.0.0.1")."""
ADDRESSES = [
    ("127.0.0.1,::1", "all", True, True),
    ("127.0.0.1", "all", True, False),
    (None, "127.0.0.0/8", False, True),
    (None, "::1/128", True, False),
    ("10.0.0.0/8,fd00::/8", "all", False, False),
    ("::1", "anyipv6", True, True),  # the allow list goes first
]


@pytest.mark.parametrize(
    ("server", "allow", "deny", "v4", "v6"),
    [("ours", *case) for case in KEYWORDS + ADDRESSES] + [("nbdkit", *case) for case in KEYWORDS],
)
def test_tcp_clients_by_address(
    server: str, allow: str | None, deny: str | None, v4: bool, v6: bool
) -> None:
    with tcp_server(SERVERS[server], ip(allow, deny)) as port:
        got = allowed(f"nbd://127.0.0.1:{port}/"), allowed(f"nbd://[::1]:{port}/")
    assert got == (v4, v6)


# --- Unix sockets: root and nobody ---------------------------------------------------------------

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
"""Runs a command as nobody (uid and gid 65534 on Debian)."""


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another user needs root")
@pytest.mark.parametrize(
    ("allow", "deny", "root", "nobody"),
    [
        ("uid:0", "all", True, False),
        ("uid:65534", "all", False, True),
        ("gid:65534", "anyunix", False, True),
        (None, "uid:0", False, True),
        ("anyipv4", "all", False, False),
        ("anyunix", "all", True, True),
    ],
)
@pytest.mark.parametrize("start", [trionbd_process, nbdkit_process], ids=["ours", "nbdkit"])
def test_unix_clients_by_credentials(
    start: Start, allow: str | None, deny: str | None, root: bool, nobody: bool
) -> None:
    with start(*ip(allow, deny)) as server:
        sock = Path(server.socket)
        sock.parent.chmod(0o755)  # nobody may reach the socket: only the filter decides
        sock.chmod(0o777)
        got = allowed(server.uri), allowed(server.uri, *NOBODY)
    assert got == (root, nobody)


# --- TLS client certificates ---------------------------------------------------------------------


def test_tls_clients_by_certificate_name(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    ca.cert_pem.write_to_path(str(server_dir / "ca-cert.pem"))
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(server_dir / "server-cert.pem"))
    cert.private_key_pem.write_to_path(str(server_dir / "server-key.pem"))
    names = {}
    for who, cn in (("backup", "backup.example.com"), ("other", "other.example.com")):
        d = tmp_path / who
        d.mkdir()
        ca.cert_pem.write_to_path(str(d / "ca-cert.pem"))
        client = ca.issue_cert(cn, common_name=cn, organization_name="Big, Co")
        client.cert_chain_pems[0].write_to_path(str(d / "client-cert.pem"))
        client.private_key_pem.write_to_path(str(d / "client-key.pem"))
        pem = client.cert_chain_pems[0].bytes()
        names[who] = x509.load_pem_x509_certificate(pem).subject.rfc4514_string()
    assert "O=Big\\, Co" in names["backup"]  # a comma inside a value, escaped
    tls = ["--tls=on", f"--tls-certificates={server_dir}", "--tls-verify-peer"]
    with trionbd_process(*tls, *ip(f"anyipv6,dn:{names['backup']}", "all")) as server:

        def uri(who: str) -> str:
            return (
                f"nbds+unix:///?socket={quote(server.socket, safe='/')}"
                f"&tls-certificates={tmp_path / who}"
            )

        assert allowed(uri("backup"))
        assert not allowed(uri("other"))
        assert not allowed(server.uri)  # no TLS, no certificate
        refused = f", gid 0) ({names['other']}) is not permitted to connect"
        assert "ip: the client (pid " in server.stderr and refused in server.stderr


def test_certificate_names_as_rfc_4514_writes_them() -> None:
    """The server's DN of a certificate subject (as ``getpeercert()`` gives it) is the
    one cryptography writes, escapes included."""
    attributes = [
        (NameOID.COUNTRY_NAME, "countryName", "US"),
        (NameOID.ORGANIZATION_NAME, "organizationName", 'Big, "Co" <+;>\\'),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "organizationalUnitName", "#1 team "),
        (NameOID.COMMON_NAME, "commonName", " client.example.com"),
        (NameOID.DOMAIN_COMPONENT, "domainComponent", "example"),
    ]
    name = x509.Name([x509.NameAttribute(oid, value) for oid, _, value in attributes])
    subject = tuple(((long, value),) for _, long, value in attributes)
    assert client_dn({"subject": subject}) == name.rfc4514_string()
    assert client_dn({}) is None and client_dn(None) is None


# --- rules ---------------------------------------------------------------------------------------


def client(**kw: object) -> ClientInfo:
    return ClientInfo(1, "peer", **kw)  # type: ignore[arg-type]


V4 = client(family=socket.AF_INET, address=("192.168.1.7", 40000))
V6 = client(family=socket.AF_INET6, address=("fe80::1%eth0", 40000, 0, 2))
UNIX = client(family=socket.AF_UNIX, credentials=Credentials(4242, 1000, 100))
VSOCK = client(family=socket.AF_VSOCK, address=(3, 1234))
PIPE = client()


@pytest.mark.parametrize(
    ("allow", "deny", "let_in"),
    [
        (None, "all", {"pipe"}),  # not a socket: always let in
        ("192.168.0.0/16", "all", {"v4", "pipe"}),
        ("fe80::/10", "all", {"v6", "pipe"}),
        ("pid:4242", "all", {"unix", "pipe"}),
        ("uid:1000", "all", {"unix", "pipe"}),
        ("gid:100", "all", {"unix", "pipe"}),
        ("gid:1000", "all", {"pipe"}),
        ("vsock-cid:3", "all", {"vsock", "pipe"}),
        ("vsock-port:1234", "all", {"vsock", "pipe"}),
        ("anyvsock", "all", {"vsock", "pipe"}),
        (None, "anyipv4,anyipv6", {"unix", "vsock", "pipe"}),
    ],
)
def test_rules(allow: str | None, deny: str | None, let_in: set[str]) -> None:
    f = IpFilter([parse_rules(allow)] if allow else None, [parse_rules(deny)] if deny else None)
    clients = {"v4": V4, "v6": V6, "unix": UNIX, "vsock": VSOCK, "pipe": PIPE}
    assert {name for name, c in clients.items() if f.permits(c)} == let_in


def test_dn_takes_the_rest_of_its_parameter() -> None:
    rules = parse_rules("127.0.0.1,dn:CN=a,O=b")
    assert [r.text for r in rules] == ["127.0.0.1", "dn:CN=a,O=b"]
    assert rules[1].matches(client(family=socket.AF_UNIX, certificate_dn="CN=a,O=b"))


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("allow=1.2.3.4,,5.6.7.8", "'1.2.3.4,,5.6.7.8' has an empty entry in its rule list"),
        ("deny=1.2.3.4/33", "'1.2.3.4/33' is not a rule"),
        ("deny=uid:-1", "'uid:-1': uid -1 is out of range"),
        ("allow=pid:x", "'pid:x': 'x' is not a number"),
        ("allow=dn:", "'dn:': dn: needs a Distinguished Name"),
        ("allow=localhost", "'localhost' is not a rule"),
    ],
)
def test_bad_rules_exit_2(param: str, message: str) -> None:
    result = trionbd_exit("--filter=ip", "memory", "1M", param)
    assert result.returncode == 2 and message in result.stderr, result.stderr
