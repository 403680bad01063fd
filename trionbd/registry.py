"""Finding plugins and filters by name: built-in modules, entry points, module:attribute.

It lives above ``chain/``, beside the command line that uses it: it imports the
``trionbd.plugins`` and ``trionbd.filters`` packages, which the chain never does.

Built-ins are the modules of ``trionbd.plugins`` and ``trionbd.filters``; each has a
``PLUGIN`` or ``FILTER`` attribute. A built-in's name is its module's with ``_`` written
``-`` (module ``multi_conn`` is the filter ``multi-conn``, as in nbdkit). Installed
packages add their own through the entry point groups ``trionbd.plugins`` and
``trionbd.filters``. Any importable class can be named directly as
``package.module:ClassName``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import sys
from typing import Any, TypeVar

from .chain.errors import ConfigError
from .chain.filter import Filter
from .chain.plugin import Plugin

T = TypeVar("T", Plugin, Filter)

_KINDS: dict[type, tuple[str, str, str]] = {
    Plugin: ("plugin", "trionbd.plugins", "PLUGIN"),
    Filter: ("filter", "trionbd.filters", "FILTER"),
}


ALIASES = {Plugin: {"curl": "http", "S3": "s3"}, Filter: {}}
"""Other names of built-ins (nbdkit's), accepted wherever a name is."""


def builtin_names(base: type[Plugin] | type[Filter]) -> list[str]:
    _, package, _ = _KINDS[base]
    mod = importlib.import_module(package)
    return sorted(
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(mod.__path__)
        if not m.name.startswith("_")
    )


def entry_point_names(base: type[Plugin] | type[Filter]) -> list[str]:
    _, group, _ = _KINDS[base]
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=group))


def load(base: type[T], name: str) -> type[T]:
    """The class named ``name``: built-in, entry point, or ``module:attribute``."""
    kind, package, attr = _KINDS[base]
    name = ALIASES[base].get(name, name)
    obj: Any
    if ":" in name:
        module_name, _, attr_name = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"cannot load {kind} {name!r}: {e}") from None
    elif name in builtin_names(base):
        obj = getattr(importlib.import_module(f"{package}.{name.replace('-', '_')}"), attr)
    else:
        eps = importlib.metadata.entry_points(group=package, name=name)
        if not eps:
            known = ", ".join(builtin_names(base) + entry_point_names(base))
            raise ConfigError(f"unknown {kind} {name!r} (known: {known})")
        obj = next(iter(eps)).load()
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{name!r} is not a trionbd {kind} class")
    return obj


def manual(cls: type) -> str:
    """A plugin's or filter's manual: its module docstring (or its class docstring)."""
    module = sys.modules.get(cls.__module__)
    text = (module.__doc__ if module else None) or cls.__doc__ or ""
    return text.strip()


def summary(cls: type) -> str:
    """The first line of the manual, without the ``name:`` prefix."""
    first = manual(cls).split("\n", 1)[0]
    name = getattr(cls, "name", "")
    prefix = f"{name}:"
    return first[len(prefix) :].strip() if first.startswith(prefix) else first
