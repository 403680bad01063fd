r"""log: log every connection and request, in nbdkit's log file format.

Writes one line per event to a file (or to standard error): export listings,
connections with the export's size and capabilities, every request with its reply,
and disconnections. The format is nbdkit's log filter format, field for field, so
scripts written for nbdkit's logs read these too. Placed first (``--filter=log``
before any other filter) it shows what clients asked; placed later it shows how the
filters above changed the requests.

Every line starts with a UTC timestamp ``YYYY-MM-DD HH:MM:SS.UUUUUU``. Lines of a
client connection then carry ``connection=N``, the server's connection number (0 for
a context the server opened for itself, e.g. for ``--filter=shared`` above this one).
A request is logged twice: when it starts (the line ends with `` ...``) and when it
returns (the action is prefixed with ``...``); the two share ``id=N``, which counts
the requests of one connection from 1. Requests run concurrently, so lines of
different ids may interleave. A request's elapsed time is the difference of its two
timestamps. An example (long lines wrapped here; in the file every event is one line):

    2026-01-01 10:00:00.000100 Ready thread_model=3
    2026-01-01 10:00:00.100000 ListExports id=1 readonly=0 tls=0 ...
    2026-01-01 10:00:00.100020 ...ListExports id=1 exports=("") return=0
    2026-01-01 10:00:00.100500 connection=1 Connect export="" tls=0 size=0x100000
        minsize=0x1 prefsize=0x1000 maxsize=0x2000000 write=1 flush=1 rotational=0
        trim=1 zero=2 fua=2 extents=1 cache=0 fast_zero=0
    2026-01-01 10:00:00.101000 connection=1 Read id=1 offset=0x0 count=0x200 ...
    2026-01-01 10:00:00.101010 connection=1 ...Read id=1 return=0
    2026-01-01 10:00:00.102000 connection=1 Zero id=2 offset=0x10000 count=0x1000
        trim=1 fua=0 fast=0 ...
    2026-01-01 10:00:00.102030 connection=1 ...Zero id=2 return=-1 error=ENOSPC
    2026-01-01 10:00:00.103000 connection=1 Disconnect transactions=2

``Ready`` gives the strictest thread model (concurrency) of this filter and the layers
below it: 0 serialize connections, 1 serialize all requests, 2 serialize requests,
3 parallel. Requests: ``Read`` (offset, count), ``Write`` and ``Trim`` (offset, count,
fua), ``Zero`` (offset, count, trim = the client allows punching holes, fua, fast),
``Extents`` (offset, count, req_one; its reply lists ``extents=(OFFSET LENGTH "TYPE"
...)`` with TYPE ``""``, ``"hole"``, ``"zero"`` or ``"hole,zero"``), ``Cache`` (offset,
count) and ``Flush``. A reply is ``return=0`` or ``return=-1 error=NAME``, NAME being
the NBD error the client receives (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW,
ENOTSUP, ESHUTDOWN). Numbers are hexadecimal as shown; ``Connect`` gives the
capabilities of the layer below as 0/1, and zero, fua and cache as 0 (none),
1 (emulated) or 2 (native). Names are written bare if made only of
``A-Za-z0-9.-_=,:/``, else in double quotes with ``$ ` \ "`` escaped by a backslash;
unlike nbdkit, control characters are written as ``\xNN`` so that one event is always
one line. Requests the server rejects itself (out of range, bad flags) never reach
the filter and are not logged; a request cut short by shutdown gets no reply line.

Differences from nbdkit: ``minsize``, ``prefsize`` and ``maxsize`` are the block size
limits the server advertises (nbdkit writes 0 when the plugin sets none); nbdkit's
``Preconnect`` and ``Fork`` lines have no counterpart here.

nbdkit's ``logscript=`` is not supported.

Example:
  trionbd --filter=log file disk.img logfile=disk.log
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeVar

from ..chain import (
    Export,
    Extent,
    Filter,
    Layer,
    NBDError,
    Next,
    Param,
    StartupError,
    current_client,
    each_export,
    parse_bool,
)
from ..protocol.constants import CmdFlag, State
from ..protocol.errnos import nbd_error

if TYPE_CHECKING:
    from ..nursery import Lifetime

log = logging.getLogger(__name__)

T = TypeVar("T")

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_=,:/")
_ENTER, _LEAVE, _PRINT = range(3)


def shell_quote(text: str) -> str:
    """``text`` as nbdkit's log writes names, with control characters as ``\\xNN``."""
    if text and all(c in _SAFE for c in text):
        return text
    out = ['"']
    for c in text:
        if c in '$`\\"':
            out.append("\\" + c)
        elif c < " " or c == "\x7f":
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def error_name(e: Exception, flags: int) -> str:
    """The name of the NBD error a client receives when a request raises ``e``."""
    if isinstance(e, NBDError):
        code = e.errno
    elif isinstance(e, OSError):
        code = e.errno or errno.EIO
    else:
        return "EIO"  # the server answers unexpected exceptions with EIO
    return nbd_error(code, flags).name


def _extents_text(extents: Iterable[Extent]) -> str:
    items = []
    for e in extents:
        kind = ",".join(
            n for bit, n in ((State.HOLE, "hole"), (State.ZERO, "zero")) if e.flags & bit
        )
        items.append(f'0x{e.offset:x} 0x{e.length:x} "{kind}"')
    return f"extents=({' '.join(items)})"


def _flag(flags: int, bit: int) -> int:
    return 1 if flags & bit else 0


@dataclass
class Handle:
    """The log filter's handle: one open context and its request counter."""

    number: int
    transactions: int = 0


class LogFilter(Filter):
    """Logs connections and requests in nbdkit's log file format."""

    name = "log"
    process_safe = False  # connection numbers and request ids count in this process only
    params = (
        Param("logfile", "write the log to this file (default: standard error)", metavar="PATH"),
        Param(
            "logappend",
            "append to an existing logfile; false: truncate it",
            parse_bool,
            default="false",
        ),
    )

    def __init__(self, logfile: str | None = None, logappend: bool = False):
        self.path = os.path.abspath(logfile) if logfile is not None else None
        self.append = logappend
        self.stream: IO[str] | None = None
        self._list_ids = 0
        self._write_failed = False
        self._second = -1
        self._date = ""
        """The timestamp's date and time for ``_second`` (a Unix time)."""

    # --- lifecycle -----------------------------------------------------------------------

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        if self.stream is None:
            self.stream = self._open()
        model = self.concurrency
        layer: Layer | None = below
        while layer is not None:
            model = min(model, layer.target.concurrency)
            layer = layer.below
        self._write(None, "Ready", 0, f"thread_model={int(model)}", _PRINT)

    def _open(self) -> IO[str]:
        if self.path is None:
            return sys.stderr
        try:
            # Line-buffered: each event reaches the file as one write of one line.
            return open(  # closed in unload
                self.path,
                "a" if self.append else "w",
                buffering=1,
                encoding="utf-8",
                errors="backslashreplace",
            )
        except OSError as e:
            raise StartupError(f"log: cannot open logfile {self.path}: {e.strerror}") from e

    def unload(self) -> None:
        if self.stream is not None and self.stream is not sys.stderr:
            try:
                self.stream.close()
            except OSError:
                pass  # already reported by _write
        self.stream = None

    # --- writing -------------------------------------------------------------------------

    def _write(self, conn: Handle | None, act: str, id: int, fields: str, kind: int) -> None:
        """Write one event line. A whole line goes out in one ``write`` from the Trio
        thread, so concurrent requests never mix their lines. Writing inline is
        deliberate: a log line is a page-cache write."""
        assert self.stream is not None, "log: used before after_fork"
        seconds, ns = divmod(time.time_ns(), 1_000_000_000)
        if seconds != self._second:  # formatting the date costs more than the rest
            self._second = seconds
            self._date = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
        parts = [f"{self._date}.{ns // 1000:06d}"]
        if conn is not None:
            parts.append(f"connection={conn.number}")
        parts.append(f"...{act}" if kind == _LEAVE else act)
        if id:
            parts.append(f"id={id}")
        if fields:
            parts.append(fields)
        if kind == _ENTER:
            parts.append("...")
        try:
            self.stream.write(" ".join(parts) + "\n")
        except OSError as e:
            # A full disk must not fail the clients' requests: say so once, go on.
            if not self._write_failed:
                self._write_failed = True
                log.error("log: cannot write to %s: %s", self.path or "stderr", e.strerror)

    async def _request(
        self,
        h: Handle,
        act: str,
        fields: str,
        flags: int,
        call: Callable[..., Awaitable[T]],
        *args: Any,
        describe: Callable[[T], str] | None = None,
    ) -> T:
        h.transactions += 1
        id = h.transactions
        self._write(h, act, id, fields, _ENTER)
        try:
            result = await call(*args)
        except Exception as e:
            self._write(h, act, id, f"return=-1 error={error_name(e, flags)}", _LEAVE)
            raise
        reply = "return=0" if describe is None else f"{describe(result)} return=0"
        self._write(h, act, id, reply, _LEAVE)
        return result

    # --- exports and connections ---------------------------------------------------------

    async def list_exports(self, below: Layer, readonly: bool, is_tls: bool) -> Iterable[Export]:
        self._list_ids += 1
        id = self._list_ids
        self._write(None, "ListExports", id, f"readonly={int(readonly)} tls={int(is_tls)}", _ENTER)
        try:
            exports = [e async for e in each_export(await below.list_exports(readonly, is_tls))]
        except Exception as e:
            self._write(None, "ListExports", id, f"return=-1 error={error_name(e, 0)}", _LEAVE)
            raise
        names = " ".join(shell_quote(e.name) for e in exports)
        self._write(None, "ListExports", id, f"exports=({names}) return=0", _LEAVE)
        return exports

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        next = await below.open(readonly, export_name, is_tls)
        client = current_client()
        h = Handle(client.id if client is not None else 0)
        bs = await next.block_size()
        fields = (
            f"export={shell_quote(export_name)} tls={int(is_tls)} "
            f"size=0x{await next.get_size():x} minsize=0x{bs.minimum:x} "
            f"prefsize=0x{bs.preferred:x} maxsize=0x{bs.maximum:x} "
            f"write={int(await next.can_write())} flush={int(await next.can_flush())} "
            f"rotational={int(await next.is_rotational())} trim={int(await next.can_trim())} "
            f"zero={int(await next.can_zero())} fua={int(await next.can_fua())} "
            f"extents={int(await next.can_extents())} cache={int(await next.can_cache())} "
            f"fast_zero={int(await next.can_fast_zero())}"
        )
        self._write(h, "Connect", 0, fields, _PRINT)
        return next, h

    async def close(self, next: Next, h: Handle) -> None:
        self._write(h, "Disconnect", 0, f"transactions={h.transactions}", _PRINT)

    # --- requests ------------------------------------------------------------------------

    async def pread(self, next: Next, h: Handle, count: int, offset: int, flags: int) -> bytes:
        fields = f"offset=0x{offset:x} count=0x{count:x}"
        return await self._request(h, "Read", fields, flags, next.pread, count, offset, flags)

    async def pwrite(self, next: Next, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        fields = f"offset=0x{offset:x} count=0x{len(buf):x} fua={_flag(flags, CmdFlag.FUA)}"
        await self._request(h, "Write", fields, flags, next.pwrite, buf, offset, flags)

    async def flush(self, next: Next, h: Handle, flags: int) -> None:
        await self._request(h, "Flush", "", flags, next.flush, flags)

    async def trim(self, next: Next, h: Handle, count: int, offset: int, flags: int) -> None:
        fields = f"offset=0x{offset:x} count=0x{count:x} fua={_flag(flags, CmdFlag.FUA)}"
        await self._request(h, "Trim", fields, flags, next.trim, count, offset, flags)

    async def zero(self, next: Next, h: Handle, count: int, offset: int, flags: int) -> None:
        fields = (
            f"offset=0x{offset:x} count=0x{count:x} trim={1 - _flag(flags, CmdFlag.NO_HOLE)} "
            f"fua={_flag(flags, CmdFlag.FUA)} fast={_flag(flags, CmdFlag.FAST_ZERO)}"
        )
        await self._request(h, "Zero", fields, flags, next.zero, count, offset, flags)

    async def extents(
        self, next: Next, h: Handle, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        fields = f"offset=0x{offset:x} count=0x{count:x} req_one={_flag(flags, CmdFlag.REQ_ONE)}"
        return await self._request(
            h, "Extents", fields, flags, next.extents, count, offset, flags, describe=_extents_text
        )

    async def cache(self, next: Next, h: Handle, count: int, offset: int, flags: int) -> None:
        fields = f"offset=0x{offset:x} count=0x{count:x}"
        await self._request(h, "Cache", fields, flags, next.cache, count, offset, flags)


FILTER = LogFilter
