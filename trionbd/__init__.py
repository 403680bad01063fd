"""trionbd: a Network Block Device server on Trio, with nbdkit's plugin/filter chain.

The public API is re-exported here from private modules::

    import trio, trionbd

    async def main():
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trionbd.serve, trionbd.Chain(MemoryPlugin(size=1 << 30)), listeners
            )
"""

__version__ = "0.1.0"

from .chain import (
    BlockSize,
    CacheMode,
    Chain,
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
)
from .nursery import Lifetime, open_lifetime
from .server import Server, ServerConfig, serve

__all__ = [
    "BlockSize",
    "CacheMode",
    "Chain",
    "Concurrency",
    "ConfigError",
    "Export",
    "Extent",
    "Filter",
    "FuaMode",
    "Layer",
    "Lifetime",
    "NBDError",
    "Next",
    "Param",
    "Plugin",
    "Server",
    "ServerConfig",
    "Sparse",
    "StartupError",
    "ZeroMode",
    "__version__",
    "open_lifetime",
    "serve",
]
