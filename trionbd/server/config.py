"""Server-wide settings (what the command line's options become)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ..protocol.constants import HandshakeFlag
from .tls import TLSMode

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a negotiating client has for each option: from the greeting, and again from
each complete option, until its next option has arrived complete; the time the plugin
and filters take to answer an option does not count (and is never cut short). A client
that stalls (or trickles bytes) is closed after this long, while one asking about
thousands of exports on one connection (``nbdinfo --list``) may negotiate for as long
as it keeps going."""
SHUTDOWN_TIMEOUT = 5.0
"""Seconds in-flight requests get to finish when the server shuts down."""
MAX_IN_FLIGHT = 64
"""Requests of one connection served concurrently; the reader waits beyond this."""
MAX_BUFFERED = 256 * 1024 * 1024
"""Bytes of READ and WRITE payload one connection's requests in flight may hold; beyond
this the connection's reader waits until requests finish (one request always fits)."""


@dataclass
class ServerConfig:
    readonly: bool = False
    """Open every export read-only (``-r``)."""
    handshake_flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    structured_replies: bool = True
    """Offer structured replies (``--no-sr`` turns this off, and extended headers with
    them: they imply structured replies)."""
    extended_headers: bool = True
    """Offer extended headers, 64-bit requests and replies (``--no-eh`` turns this off)."""
    meta_contexts: bool = True
    """Offer ``base:allocation`` (``--no-mc`` turns this off)."""
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT
    """Seconds per option while negotiating (``None``: no limit); see HANDSHAKE_TIMEOUT."""
    idle_timeout: float | None = None
    """Close a connection in transmission that has sent nothing for this many seconds
    while none of its requests is in flight (``None``: never)."""
    shutdown_timeout: float = SHUTDOWN_TIMEOUT
    max_in_flight: int = MAX_IN_FLIGHT
    max_buffered: int = MAX_BUFFERED
    max_connections: int | None = None
    """Clients served at once; more are refused (see ``Server``)."""
    keepalive: bool = False
    """Turn TCP keepalive (``SO_KEEPALIVE``) on for every accepted TCP connection, so
    that the kernel notices a client host that went away silently (``--keepalive``)."""
    tls: TLSMode = TLSMode.OFF
    """``--tls``: whether STARTTLS is offered, and whether it is required."""
    tls_context: ssl.SSLContext | None = None
    """The server-side TLS context (needed unless ``tls`` is ``OFF``)."""
