"""Declared parameters of plugins and filters, and the parsers of their values.

A plugin or filter lists its parameters as ``Param`` objects; the command line's
``key=value`` words are matched against them and the parsed values passed to the
class's constructor as keyword arguments (``tar-entry=x`` becomes ``tar_entry="x"``).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

MAX_SIZE = (1 << 63) - 1
"""Largest size accepted anywhere (the NBD size field is 64-bit; we keep it signed)."""

_SUFFIXES = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]?)(?:i?[bB])?\s*$")


def parse_size(text: str) -> int:
    """``"4096"``, ``"1M"``, ``"2G"``, ``"1MiB"``, ... (powers of 1024) up to 2^63-1."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _SUFFIXES:
        raise ValueError(f"{text!r} is not a size (a number with an optional k/M/G/T/P/E suffix)")
    value = int(m.group(1)) << _SUFFIXES[m.group(2).lower()]
    if value > MAX_SIZE:
        raise ValueError(f"{text!r} is larger than the maximum size {MAX_SIZE}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    """``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0``."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def parse_choice(*choices: str) -> Callable[[str], str]:
    """A parser accepting exactly one of ``choices``."""

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    parse.__name__ = "|".join(choices)
    return parse


def parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def parse_seconds(text: str) -> float:
    """A finite number of seconds greater than 0 (nbdkit takes whole ones for most;
    trionbd decimals too)."""
    value = _float(text)
    if not 0 < value < math.inf:
        raise ValueError(f"{text!r} is not a number of seconds greater than 0")
    return value


def parse_seconds_or_zero(text: str) -> float:
    """A finite number of seconds, 0 or more (0 usually means "no limit")."""
    value = _float(text)
    if not 0 <= value < math.inf:
        raise ValueError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


@dataclass(frozen=True)
class Param:
    """One ``key=value`` parameter of a plugin or filter."""

    name: str
    help: str
    parse: Callable[[str], Any] = str
    required: bool = False
    repeat: bool = False
    """May be given several times; the constructor receives a list."""
    metavar: str = ""
    """What the value looks like in ``--help`` (``PATH``, ``SIZE``); when not given, it
    follows from ``parse``: ``STRING``, ``SIZE``, ``BOOL``, ``N``, a choice's words as
    they are typed (``default|none``), or the parser's name (``parse_delay``: ``DELAY``)."""
    default: str = ""
    """The default as ``--help`` shows it (``64K``, ``false``); empty: none to show."""

    def __post_init__(self) -> None:
        if not self.metavar:
            kind = getattr(self.parse, "__name__", "")
            named = {"str": "STRING", "parse_size": "SIZE", "parse_bool": "BOOL", "parse_int": "N"}
            if "|" in kind:  # parse_choice's words
                shown = kind
            else:
                shown = named.get(kind) or kind.removeprefix("parse_").upper() or "VALUE"
            object.__setattr__(self, "metavar", shown)

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")


def build_kwargs(
    owner: str, params: Sequence[Param], items: Iterable[tuple[str, str]]
) -> dict[str, Any]:
    """Parse ``items`` (key, value) against ``params`` into constructor keyword arguments."""
    by_name = {p.name: p for p in params}
    kwargs: dict[str, Any] = {}
    for key, value in items:
        param = by_name.get(key)
        if param is None:
            known = ", ".join(by_name) or "none"
            raise ConfigError(f"{owner}: unknown parameter {key!r} (known: {known})")
        try:
            parsed = param.parse(value)
        except ValueError as e:
            raise ConfigError(f"{owner}: bad value for {key}={value}: {e}") from None
        if param.repeat:
            kwargs.setdefault(param.attr, []).append(parsed)
        elif param.attr in kwargs:
            raise ConfigError(f"{owner}: parameter {key!r} given more than once")
        else:
            kwargs[param.attr] = parsed
    for param in params:
        if param.required and param.attr not in kwargs:
            raise ConfigError(f"{owner}: parameter {param.name!r} is required")
    return kwargs


def describe_params(params: Sequence[Param], magic: str | None = None) -> str:
    """The parameter list shown by ``trionbd NAME --help``; ``magic`` names the plugin's
    magic parameter (the one a bare word sets)."""
    if not params:
        return "  (no parameters)"
    rows = []
    for p in params:
        notes = [t for t, on in (("required", p.required), ("repeatable", p.repeat)) if on]
        if p.name == magic:
            notes.append(f"may be given bare, without {p.name}=")
        if p.default:
            notes.append(f"default: {p.default}")
        rows.append((f"{p.name}={p.metavar}", p.help + (f" ({'; '.join(notes)})" if notes else "")))
    return help_columns(rows)


HELP_WIDTH = 88
"""Columns of ``--help`` text."""


def help_columns(rows: Iterable[tuple[str, str]], indent: int = 2, column: int = 26) -> str:
    """Help lines: each row's left text, then its help wrapped beside it starting at
    ``column`` (on the next line when the left text reaches the column)."""
    lines = []
    for left, text in rows:
        head = " " * indent + left
        wrapped = textwrap.wrap(text, HELP_WIDTH - column) or [""]
        if len(head) + 2 > column:
            lines.append(head)
        else:
            lines.append(head.ljust(column) + wrapped.pop(0))
        lines += [" " * column + line for line in wrapped]
    return "\n".join(lines)
