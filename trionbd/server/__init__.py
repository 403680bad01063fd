"""The Trio side: sockets, connections, the serve loop."""

from ..net import Address
from .config import ServerConfig
from .listeners import open_tcp_listeners, open_unix_listener, private_socket_path
from .server import Server, serve

__all__ = [
    "Address",
    "Server",
    "ServerConfig",
    "open_tcp_listeners",
    "open_unix_listener",
    "private_socket_path",
    "serve",
]
