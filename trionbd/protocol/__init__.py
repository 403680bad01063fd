"""Sans-IO NBD: bytes in, events out; events in, bytes out. No Trio, no sockets.

``ServerConnection`` is the server's side of one connection, ``ClientConnection`` the
client's. Both follow the fixed newstyle handshake and compact requests, with simple
and structured replies.
"""

from .client import ClientConnection
from .constants import *  # noqa: F403
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import *  # noqa: F403
from .server import Phase, ServerConnection

__all__ = [
    "ClientConnection",
    "LocalProtocolError",
    "Phase",
    "ProtocolError",
    "RemoteProtocolError",
    "ServerConnection",
]
