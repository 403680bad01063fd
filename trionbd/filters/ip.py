"""ip: allow or deny clients by address, Unix socket credentials or certificate name.

Each ``allow`` and ``deny`` parameter holds a comma-separated list of rules; both may
be repeated, each adding its rules to its list. A client is let in if it matches any
rule of the allow list; otherwise it is kept out if it matches any rule of the deny
list; otherwise it is let in. The order of the parameters does not matter. Without
either list the filter lets everybody in; so does it a client on something other than
a TCP, Unix or AF_VSOCK socket (``-s`` over pipes).

Rules (keywords in any case):

* ``all`` or ``any``: every client.
* ``anyipv4`` (``allipv4``), ``anyipv6`` (``allipv6``), ``anyunix`` (``allunix``),
  ``anyvsock`` (``allvsock``): every client over IPv4, IPv6, a Unix socket, AF_VSOCK.
* ``A.B.C.D``, ``A.B.C.D/NN``, ``A:B::C``, ``A:B::C/NN``: an IPv4 or IPv6 address or
  network (``127.0.0.1``, ``10.0.0.0/8``, ``::1``, ``fd00::/8``).
* ``pid:PID``, ``uid:UID``, ``gid:GID``: over a Unix socket, the connecting process,
  its user or its group (numeric, as the kernel tells them: ``SO_PEERCRED``). Process
  ids are reused: ``pid:`` alone is no safe check.
* ``vsock-cid:CID``, ``vsock-port:PORT``: over AF_VSOCK, the client's context id or
  port.
* ``dn:DN``: over TLS, a client whose certificate (verified: ``--tls-verify-peer``) has
  this subject, written as RFC 4514 writes Distinguished Names, most specific part
  first: ``dn:CN=client.example.com,O=BigCo,C=US`` (each part exactly as in the
  certificate, values escaped as RFC 4514 says: ``\\,`` for a comma). Since DNs hold
  commas, ``dn:`` takes the rest of its parameter: make it the last rule of its
  ``allow=`` or ``deny=`` and give another parameter for more rules.

A client that is not let in may still negotiate, but every option that needs the
export list or an export (``NBD_OPT_LIST``, ``INFO``, ``GO``, ``EXPORT_NAME``) is
refused as a policy error ("not permitted"), with a warning in the log. Put this filter
first (nearest the client): a filter above it that answers a client without asking the
layers below (``shared`` reusing its one context) would let anybody through.

Examples:
  trionbd --filter=ip file disk.img allow=127.0.0.1,::1 deny=all
  trionbd --filter=ip -U /run/disk.sock file disk.img allow=uid:1000 deny=all
  trionbd --filter=ip --tls=require --tls-verify-peer file disk.img \\
      allow=dn:CN=backup.example.com,O=BigCo deny=all
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..chain import (
    ClientInfo,
    ExportList,
    Filter,
    Layer,
    NBDError,
    Next,
    Param,
    current_client,
    parse_int,
)

log = logging.getLogger(__name__)

FAMILIES = {
    "any": None,
    "anyipv4": socket.AF_INET,
    "anyipv6": socket.AF_INET6,
    "anyunix": socket.AF_UNIX,
    "anyvsock": socket.AF_VSOCK,
}
"""The keywords that match a whole family (``None``: every client); ``all...`` too."""
FILTERED = frozenset(f for f in FAMILIES.values() if f is not None)
"""Clients on other sockets, or none (pipes), are always let in."""
IDS: dict[str, tuple[int, int, Callable[[ClientInfo], int | None]]] = {
    "pid": (1, 2**63 - 1, lambda c: c.credentials.pid if c.credentials else None),
    "uid": (0, 2**63 - 1, lambda c: c.credentials.uid if c.credentials else None),
    "gid": (0, 2**63 - 1, lambda c: c.credentials.gid if c.credentials else None),
    "vsock-cid": (0, 2**32 - 1, lambda c: _vsock(c, 0)),
    "vsock-port": (0, 2**32 - 1, lambda c: _vsock(c, 1)),
}
"""``KIND:N`` rules: the range of N, and what of a client they compare N with."""


def _vsock(client: ClientInfo, part: int) -> int | None:
    if client.family != socket.AF_VSOCK or not isinstance(client.address, tuple):
        return None
    return int(client.address[part])


@dataclass(frozen=True)
class Rule:
    """One rule of an allow or deny list."""

    text: str
    matches: Callable[[ClientInfo], bool]


def parse_rules(text: str) -> list[Rule]:
    """The rules of one ``allow=`` or ``deny=`` value."""
    rules = []
    rest = text
    while rest:
        if rest[:3].lower() == "dn:":
            rules.append(_dn_rule(rest))
            break
        entry, _, rest = rest.partition(",")
        if not entry:
            raise ValueError(f"{text!r} has an empty entry in its rule list")
        rules.append(_rule(entry))
    if not rules:
        raise ValueError("an empty rule list")
    return rules


def _rule(entry: str) -> Rule:
    word = entry.lower()
    if word.startswith("all"):
        word = "any" + word[3:]
    if word in FAMILIES:
        family = FAMILIES[word]
        return Rule(entry, lambda c: family is None or c.family == family)
    kind, colon, number = entry.partition(":")
    if colon and kind.lower() in IDS:
        low, high, of = IDS[kind.lower()]
        try:
            wanted = parse_int(number)
        except ValueError:
            raise ValueError(f"{entry!r}: {number!r} is not a number") from None
        if not low <= wanted <= high:
            raise ValueError(f"{entry!r}: {kind.lower()} {wanted} is out of range")
        return Rule(entry, lambda c: of(c) == wanted)
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise ValueError(
            f"{entry!r} is not a rule (an address or network, all, anyipv4, anyipv6, "
            "anyunix, anyvsock, pid:, uid:, gid:, vsock-cid:, vsock-port: or dn:)"
        ) from None
    return Rule(entry, lambda c: (address := _address(c)) is not None and address in network)


def _dn_rule(entry: str) -> Rule:
    dn = entry[3:]
    if not dn:
        raise ValueError(f"{entry!r}: dn: needs a Distinguished Name")
    return Rule(entry, lambda c: c.certificate_dn == dn)


def _address(client: ClientInfo) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if client.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return ipaddress.ip_address(str(client.address[0]).split("%", 1)[0])  # no IPv6 scope


def _who(client: ClientInfo) -> str:
    if client.credentials is not None:  # on a Unix socket, whose peer has no name
        who = "the client (pid {}, uid {}, gid {})".format(*client.credentials)
    else:
        who = f"the client {client.peer}"
    return f"{who} ({client.certificate_dn})" if client.certificate_dn else who


class IpFilter(Filter):
    """Lets clients in or keeps them out by who they are."""

    name = "ip"
    process_safe = True  # the rules are fixed at start-up; each client is checked on its own
    params = (
        Param(
            "allow",
            "let in the clients matching any of these rules",
            parse_rules,
            repeat=True,
            metavar="RULE[,RULE...]",
        ),
        Param(
            "deny",
            "keep out the clients matching any of these rules (and none of the allow list)",
            parse_rules,
            repeat=True,
            metavar="RULE[,RULE...]",
        ),
    )

    def __init__(self, allow: list[list[Rule]] | None = None, deny: list[list[Rule]] | None = None):
        self.allow = [rule for rules in allow or [] for rule in rules]
        self.deny = [rule for rules in deny or [] for rule in rules]

    def permits(self, client: ClientInfo) -> bool:
        """Whether ``client`` is let in."""
        if client.family not in FILTERED:
            return True
        if any(rule.matches(client) for rule in self.allow):
            return True
        return not any(rule.matches(client) for rule in self.deny)

    def _check(self) -> None:
        client = current_client()
        if client is None or self.permits(client):  # None: start-up work, no client
            return
        raise NBDError(errno.EACCES, f"ip: {_who(client)} is not permitted to connect")

    async def list_exports(self, below: Layer, readonly: bool, is_tls: bool) -> ExportList:
        self._check()
        return await below.list_exports(readonly, is_tls)

    async def default_export(self, below: Layer, readonly: bool, is_tls: bool) -> str:
        self._check()
        return await below.default_export(readonly, is_tls)

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        self._check()
        return await below.open(readonly, export_name, is_tls), None


FILTER = IpFilter
