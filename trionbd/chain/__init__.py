"""What a plugin or filter author sees: base classes, the layer below, values, errors."""

from .chain import Chain
from .clientinfo import ClientInfo, current_client
from .container import ContainerFilter, Progress
from .errors import ConfigError, DropConnection, NBDError, StartupError
from .filter import Filter
from .forward import ForwardingPlugin
from .layer import Layer, LayerContext, clip_extents
from .next import CachedCaps, Caps, Next
from .params import (
    Param,
    parse_bool,
    parse_choice,
    parse_int,
    parse_seconds,
    parse_seconds_or_zero,
    parse_size,
)
from .plugin import Plugin
from .product import BuildOnce, ProductNames
from .types import (
    BlockSize,
    CacheMode,
    Concurrency,
    Export,
    ExportList,
    Extent,
    FuaMode,
    Sparse,
    ZeroMode,
    describe_file,
    each_export,
)

__all__ = [
    "BlockSize",
    "BuildOnce",
    "CacheMode",
    "CachedCaps",
    "Caps",
    "Chain",
    "ClientInfo",
    "Concurrency",
    "ConfigError",
    "ContainerFilter",
    "DropConnection",
    "Export",
    "ExportList",
    "Extent",
    "Filter",
    "ForwardingPlugin",
    "FuaMode",
    "Layer",
    "LayerContext",
    "NBDError",
    "Next",
    "Param",
    "Plugin",
    "ProductNames",
    "Progress",
    "Sparse",
    "StartupError",
    "ZeroMode",
    "clip_extents",
    "current_client",
    "describe_file",
    "each_export",
    "parse_bool",
    "parse_choice",
    "parse_int",
    "parse_seconds",
    "parse_seconds_or_zero",
    "parse_size",
]
