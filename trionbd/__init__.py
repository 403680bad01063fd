"""trionbd: a Network Block Device server on Trio, with nbdkit's plugin/filter chain.

Serve block devices from a Trio application, inside its own nursery::

    import trio, trionbd
    from trionbd.plugins.memory import MemoryPlugin

    async def main():
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trionbd.serve, MemoryPlugin(1 << 30), "tcp:127.0.0.1:0")
            print(server.uris)
            async with await trionbd.connect_uri(server.uris[0]) as client:
                await client.pwrite(b"hello", 0)
            nursery.cancel_scope.cancel()  # graceful shutdown

The names here are the public API, re-exported from private modules: serving
(:func:`serve`, :class:`Server`, :class:`ExportTable`), writing plugins and filters
(:class:`Plugin`, :class:`Filter`, :class:`Chain`, ...; see ``docs/plugins.md``) and the
client (:func:`connect_uri` and friends; the details are in :mod:`trionbd.client`).
"""

__version__ = "0.1.0"

from .chain import (
    BlockSize,
    CacheMode,
    Chain,
    ClientInfo,
    Concurrency,
    ConfigError,
    Export,
    Extent,
    Filter,
    FuaMode,
    Layer,
    NBDError,
    Next,
    Param,
    Plugin,
    Sparse,
    StartupError,
    ZeroMode,
    current_client,
    parse_bool,
    parse_choice,
    parse_int,
    parse_size,
)
from .client import (
    Client,
    ConnectionFailed,
    ExportInfo,
    Handshake,
    OptionError,
    RequestError,
    connect,
    connect_tcp,
    connect_unix,
    connect_uri,
    handshake,
    open_stream,
)
from .exporttable import ExportTable
from .net import Address
from .nursery import Lifetime, open_lifetime
from .protocol.constants import CmdFlag, State
from .server import Server, ServerConfig, serve
from .server.server import ExportStats, ListenerSpec

__all__ = [
    "Address",
    "BlockSize",
    "CacheMode",
    "Chain",
    "Client",
    "ClientInfo",
    "CmdFlag",
    "Concurrency",
    "ConfigError",
    "ConnectionFailed",
    "Export",
    "ExportInfo",
    "ExportStats",
    "ExportTable",
    "Extent",
    "Filter",
    "FuaMode",
    "Handshake",
    "Layer",
    "Lifetime",
    "ListenerSpec",
    "NBDError",
    "Next",
    "OptionError",
    "Param",
    "Plugin",
    "RequestError",
    "Server",
    "ServerConfig",
    "Sparse",
    "StartupError",
    "State",
    "ZeroMode",
    "__version__",
    "connect",
    "connect_tcp",
    "connect_unix",
    "connect_uri",
    "current_client",
    "handshake",
    "open_lifetime",
    "open_stream",
    "parse_bool",
    "parse_choice",
    "parse_int",
    "parse_size",
    "serve",
]
