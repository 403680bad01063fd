"""What the server and the client share below the protocol: addresses and NBD URIs
(:mod:`.address`), and the transport that moves a connection's bytes (:mod:`.transport`)."""

from .address import Address, parse_uri
from .transport import Transport

__all__ = ["Address", "Transport", "parse_uri"]
