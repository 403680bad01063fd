"""What the server and the client share below the protocol: addresses and NBD URIs
(:mod:`.address`), and the transport that moves a connection's bytes (:mod:`.transport`)."""

from .address import Address, parse_uri
from .transport import Buffer, Transport

__all__ = ["Address", "Buffer", "Transport", "parse_uri"]
