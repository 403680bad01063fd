"""Server-wide settings (what the command line's options become)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ..protocol.constants import HandshakeFlag
from .tls import TLSMode

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a client has to finish negotiating before it is disconnected."""
SHUTDOWN_TIMEOUT = 5.0
"""Seconds in-flight requests get to finish when the server shuts down."""
MAX_IN_FLIGHT = 64
"""Requests of one connection served concurrently; the reader waits beyond this."""


@dataclass
class ServerConfig:
    readonly: bool = False
    """Open every export read-only (``-r``)."""
    handshake_flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    structured_replies: bool = True
    """Offer structured replies (``--no-sr`` turns this off)."""
    meta_contexts: bool = True
    """Offer ``base:allocation`` (``--no-mc`` turns this off)."""
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT
    shutdown_timeout: float = SHUTDOWN_TIMEOUT
    max_in_flight: int = MAX_IN_FLIGHT
    max_connections: int | None = None
    tls: TLSMode = TLSMode.OFF
    """``--tls``: whether STARTTLS is offered, and whether it is required."""
    tls_context: ssl.SSLContext | None = None
    """The server-side TLS context (needed unless ``tls`` is ``OFF``)."""
