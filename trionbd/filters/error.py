"""error: inject errors into requests, to test how clients cope.

Fails a chosen share of requests with a chosen error before they reach the layer
below. Nothing is injected unless a rate is set. Each injected error is logged
(``injecting EIO error into pread``) and the client receives it as an NBD error.

The errors are EPERM, EIO, ENOMEM, EINVAL, ENOSPC, ESHUTDOWN and, beyond nbdkit,
ENOTSUP and EOVERFLOW, which clients receive as EINVAL except for fast zero requests
(ENOTSUP) and reads with the DF flag (EOVERFLOW). ``error``, ``error-rate`` and
``error-file`` apply to every command; ``error-CMD``, ``error-CMD-rate`` and
``error-CMD-file`` (CMD being pread, pwrite, trim, zero, extents, cache or flush) to one
command, and win over the general ones whatever their order. A file named by
``error-file`` switches errors on and off at run time: create or remove it (it is
checked on every request). With ``error-seed`` (a trionbd extension) the same sequence
of requests fails the same way on every run.

Rates 0 and 1 (0% and 100%) draw no random numbers: they never or always inject, so
tests that need certainty use them (with ``error-file`` to switch at a known moment),
and tests of other rates set ``error-seed``.

Examples:
  trionbd --filter=error file disk.img error-rate=1%
  trionbd --filter=error file disk.img error=ENOSPC error-pwrite-rate=100% \\
      error-zero-rate=100%
  trionbd --filter=error file disk.img error-rate=100% error-file=/tmp/inject
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..chain import Extent, Filter, NBDError, Next, Param, parse_int

log = logging.getLogger(__name__)

COMMANDS = ("pread", "pwrite", "trim", "zero", "extents", "cache", "flush")
ERRORS = ("EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "ESHUTDOWN", "ENOTSUP", "EOVERFLOW")
"""The errors that can be injected: those an NBD client can receive."""
_NAMES = {getattr(errno, name): name for name in ERRORS}

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*$")


def parse_error(text: str) -> int:
    """An error name (``EIO``) as its errno value."""
    if text not in ERRORS:
        raise ValueError(f"unknown error name {text!r} (use one of {', '.join(ERRORS)})")
    code: int = getattr(errno, text)
    return code


def parse_rate(text: str) -> float:
    """``0.1`` or ``10%`` as a probability from 0 to 1."""
    m = _RATE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a rate (a number from 0 to 1, or 0% to 100%)")
    rate = float(m.group(1)) / (100 if m.group(2) else 1)
    if not 0 <= rate <= 1:
        raise ValueError(f"rate {text!r} is out of range (0 to 1, or 0% to 100%)")
    return rate


@dataclass(frozen=True)
class Setting:
    """How one command fails."""

    error: int
    rate: float
    file: str | None


def _params() -> tuple[Param, ...]:
    params = [
        Param("error", "the error to inject", parse_error, metavar="NAME", default="EIO"),
        Param(
            "error-rate",
            "share of requests that fail: a probability from 0 to 1 (0.1) or a percentage "
            "from 0% to 100% (10%); 0: never",
            parse_rate,
            default="0",
        ),
        Param("error-file", "inject only while PATH exists", metavar="PATH"),
    ]
    for cmd in COMMANDS:
        params += [
            Param(f"error-{cmd}", f"the error to inject into {cmd}", parse_error, metavar="NAME"),
            Param(f"error-{cmd}-rate", f"share of {cmd} requests that fail", parse_rate),
            Param(f"error-{cmd}-file", f"inject into {cmd} only while PATH exists", metavar="PATH"),
        ]
    params.append(
        Param("error-seed", "seed of the random choices", parse_int, default="a fresh one each run")
    )
    return tuple(params)


class ErrorFilter(Filter):
    """Fails requests with a configured error at a configured rate."""

    name = "error"
    process_safe = True  # error-seed= then gives each worker the same sequence
    params = _params()

    def __init__(
        self,
        error: int = errno.EIO,
        error_rate: float = 0.0,
        error_file: str | None = None,
        error_seed: int | None = None,
        **per_command: Any,
    ):
        def setting(cmd: str) -> Setting:
            file = per_command.get(f"error_{cmd}_file", error_file)
            return Setting(
                error=per_command.get(f"error_{cmd}", error),
                rate=per_command.get(f"error_{cmd}_rate", error_rate),
                file=os.path.abspath(file) if file is not None else None,
            )

        self.settings = {cmd: setting(cmd) for cmd in COMMANDS}
        self.random = random.Random(error_seed)

    def inject(self, cmd: str) -> None:
        """Raise the configured error for ``cmd`` if this request is chosen to fail."""
        s = self.settings[cmd]
        if s.rate <= 0:
            return
        if s.file is not None and not os.path.exists(s.file):
            return
        if s.rate < 1 and self.random.random() >= s.rate:
            return
        name = _NAMES[s.error]
        log.error("error: injecting %s error into %s", name, cmd)
        raise NBDError(s.error, f"error filter: injecting {name} error into {cmd}")

    async def pread(self, next: Next, h: Any, count: int, offset: int, flags: int) -> bytes:
        self.inject("pread")
        return await next.pread(count, offset, flags)

    async def pwrite(self, next: Next, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.inject("pwrite")
        await next.pwrite(buf, offset, flags)

    async def flush(self, next: Next, h: Any, flags: int) -> None:
        self.inject("flush")
        await next.flush(flags)

    async def trim(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        self.inject("trim")
        await next.trim(count, offset, flags)

    async def zero(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        self.inject("zero")
        await next.zero(count, offset, flags)

    async def extents(
        self, next: Next, h: Any, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        self.inject("extents")
        return await next.extents(count, offset, flags)

    async def cache(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        self.inject("cache")
        await next.cache(count, offset, flags)


FILTER = ErrorFilter
