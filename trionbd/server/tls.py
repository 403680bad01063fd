"""TLS for NBD connections, with nbdkit's options and rules.

``--tls=off|on|require`` picks the mode (the NBD spec's NOTLS, SELECTIVETLS and
FORCEDTLS). Credentials come from the standard library's :mod:`ssl`:

* X.509: a directory holding ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``
  (and optionally ``ca-crl.pem``), nbdkit's file names. Without ``--tls-certificates``
  the directories nbdkit searches are tried: ``$HOME/.pki/nbdkit`` and
  ``$HOME/.config/pki/nbdkit``, or ``/etc/pki/nbdkit`` for root.
  ``--tls-verify-peer`` asks every client for a certificate signed by ``ca-cert.pem``
  (and not revoked by ``ca-crl.pem``) and refuses clients without one.
* PSK: ``--tls-psk=FILE``, one ``identity:hexkey`` per line (``psktool``'s format). It
  overrides certificates. Python's :mod:`ssl` has PSK callbacks only since 3.13; on an
  older Python the option is refused (exit 2).

Only TLS 1.2 and later are offered. A verified client certificate's subject is given to
plugins and filters as ``ClientInfo.certificate_dn`` (:func:`client_dn`).

Without ``--tls``, TLS is ``on`` when credentials are found, else ``off`` (as nbdkit).
``--tls=on`` without credentials warns and turns TLS off; ``--tls=require`` without
credentials refuses to start.
"""

from __future__ import annotations

import binascii
import enum
import logging
import os
import ssl
import sys
from dataclasses import dataclass

from ..chain.errors import ConfigError, StartupError

log = logging.getLogger("trionbd.tls")

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CA_CRL = "ca-crl.pem"
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
PSK_PYTHON = (3, 13)
"""The first Python whose ``ssl`` module has PSK callbacks."""
ROOT_CERTIFICATES_DIR = "/etc/pki/nbdkit"


class TLSMode(enum.Enum):
    """``--tls=``: what a client must do about TLS."""

    OFF = "off"
    """STARTTLS is refused (``ERR_POLICY``)."""
    ON = "on"
    """Clients choose; a filter may treat plain clients differently (``is_tls``)."""
    REQUIRE = "require"
    """Every option but STARTTLS and ABORT is refused (``ERR_TLS_REQD``) until TLS."""


@dataclass(frozen=True)
class TLSSettings:
    """What the command line asked for; :meth:`resolve` turns it into a context."""

    mode: TLSMode | None = None
    """``None``: not given (on when credentials are found)."""
    certificates: str | None = None
    psk: str | None = None
    verify_peer: bool = False

    def check(self) -> None:
        """Refuse what cannot work whatever the files say (a ``ConfigError``, exit 2)."""
        if self.psk is not None and self.mode is not TLSMode.OFF and not psk_supported():
            raise ConfigError(
                f"--tls-psk needs Python {PSK_PYTHON[0]}.{PSK_PYTHON[1]} or later (the ssl "
                f"module has no PSK callbacks before); this is Python "
                f"{sys.version_info.major}.{sys.version_info.minor}: use X.509 certificates "
                "(--tls-certificates=DIR)"
            )

    def resolve(self) -> tuple[TLSMode, ssl.SSLContext | None]:
        """The mode in force and its server context (``None`` when off).

        Raises ``StartupError`` for credentials that exist but cannot be loaded, and
        for ``--tls=require`` without credentials.
        """
        self.check()
        if self.mode is TLSMode.OFF:
            return TLSMode.OFF, None
        mode = self.mode or TLSMode.ON
        if self.psk is not None:
            return mode, psk_context(read_psk_file(self.psk))
        dirs = [self.certificates] if self.certificates else default_certificate_dirs()
        for directory in dirs:
            if is_certificate_dir(directory):
                log.debug("TLS certificates from %s", directory)
                return mode, certificate_context(directory, self.verify_peer)
        where = " or ".join(dirs) or "(no directory: HOME is not set)"
        wanted = f"{CA_CERT}, {SERVER_CERT} and {SERVER_KEY}"
        if mode is TLSMode.REQUIRE:
            raise StartupError(
                f"--tls=require but no TLS certificates were found in {where} (expected "
                f"{wanted}; use --tls-certificates=DIR)"
            )
        if self.mode is TLSMode.ON or self.certificates:
            log.warning(
                "TLS is disabled: no certificates were found in %s (expected %s); "
                "clients asking for TLS are refused",
                where,
                wanted,
            )
        return TLSMode.OFF, None


def default_certificate_dirs() -> list[str]:
    """Where nbdkit looks for certificates when ``--tls-certificates`` is not given."""
    if os.geteuid() == 0:
        return [ROOT_CERTIFICATES_DIR]
    home = os.environ.get("HOME")
    if not home:
        return []
    return [os.path.join(home, ".pki", "nbdkit"), os.path.join(home, ".config", "pki", "nbdkit")]


def is_certificate_dir(directory: str) -> bool:
    """nbdkit's test: the CA certificate, server certificate and key are all readable."""
    return all(
        os.access(os.path.join(directory, name), os.R_OK)
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY)
    )


def _new_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    return context


def certificate_context(directory: str, verify_peer: bool) -> ssl.SSLContext:
    """A server context from an nbdkit-style certificate directory."""
    context = _new_context()
    cert, key = os.path.join(directory, SERVER_CERT), os.path.join(directory, SERVER_KEY)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise StartupError(
            f"cannot load the TLS server certificate and key ({cert}, {key}): {e}"
        ) from None
    # The CA is loaded even without --tls-verify-peer, so a broken file shows at start-up.
    ca = os.path.join(directory, CA_CERT)
    crl = os.path.join(directory, CA_CRL)
    try:
        context.load_verify_locations(cafile=ca)
        if os.access(crl, os.R_OK):
            context.load_verify_locations(cafile=crl)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"cannot load {ca} (or {crl}): {e}") from None
    if verify_peer:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def psk_supported() -> bool:
    return sys.version_info >= PSK_PYTHON and getattr(ssl, "HAS_PSK", False)


def read_psk_file(path: str) -> dict[str, bytes]:
    """Parse a PSK file: ``identity:hexkey`` per line (``psktool``'s format)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StartupError(f"--tls-psk: cannot read {path}: {e}") from None
    keys: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        identity, sep, hexkey = line.rpartition(":")
        try:
            key = binascii.unhexlify(hexkey.strip())
        except (binascii.Error, ValueError):
            key = b""
        if not sep or not identity or not key:
            raise StartupError(f"--tls-psk: {path} line {number}: expected IDENTITY:HEXKEY")
        keys[identity] = key
    if not keys:
        raise StartupError(f"--tls-psk: {path} holds no keys")
    return keys


def psk_context(keys: dict[str, bytes]) -> ssl.SSLContext:
    """A server context authenticating clients by pre-shared key (Python >= 3.13)."""
    context = _new_context()
    # TLS 1.2 needs a PSK cipher suite; TLS 1.3 negotiates PSK with its own suites.
    context.set_ciphers("PSK:ECDHE-PSK:DHE-PSK")

    def lookup(identity: str | None) -> bytes:
        key = keys.get(identity or "")
        if key is None:
            log.warning("TLS: unknown PSK identity %r", identity)
            return b""  # an empty key makes the handshake fail
        return key

    context.set_psk_server_callback(lookup)  # type: ignore[attr-defined,unused-ignore]
    return context


# --- the client's certificate --------------------------------------------------------------------

_DN_NAMES = {
    "commonName": "CN",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}
"""The attribute types RFC 4514 writes by short name; others keep OpenSSL's long name."""


def client_dn(cert: dict[str, object] | None) -> str | None:
    """The subject of a verified client certificate (``getpeercert()``) as RFC 4514
    writes a Distinguished Name (``CN=client.example.com,O=BigCo,C=US``: the last RDN
    first); ``None`` without one."""
    subject = (cert or {}).get("subject")
    if not isinstance(subject, tuple) or not subject:
        return None
    return ",".join(
        "+".join(f"{_DN_NAMES.get(kind, kind)}={_dn_value(value)}" for kind, value in rdn)
        for rdn in reversed(subject)
    )


def _dn_value(value: str) -> str:
    """A DN attribute value with RFC 4514's escapes."""
    for char in '\\"+,;<>':
        value = value.replace(char, "\\" + char)
    value = value.replace("\0", "\\00")
    if value[:1] in ("#", " "):
        value = "\\" + value
    if value.endswith(" ") and not value.endswith("\\ "):
        value = value[:-1] + "\\ "
    return value
