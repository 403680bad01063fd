"""readonly: make the layer below read-only, always or while a file exists.

Without ``readonly-file`` the export is read-only, as with ``-r`` but for this chain
only: the layer below is opened read-only, and clients see a read-only export that
they cannot write, trim or zero.

With ``readonly-file=PATH`` the export stays writable (and is advertised so), but every
write, trim and zero request fails with EPERM ("operation not permitted") while PATH
exists. Create the file to write-protect the export at run time, remove it to allow
writes again; the check is made on every request. Reads, flushes and block status
always work.

See also the protect filter, which write-protects byte ranges.

Examples:
  trionbd --filter=readonly file disk.img
  trionbd --filter=readonly file disk.img readonly-file=/run/disk.ro
  touch /run/disk.ro     # from now on writes fail
"""

from __future__ import annotations

import errno
import os
from typing import Any

from ..chain import Filter, Layer, NBDError, Next, Param


class ReadonlyFilter(Filter):
    """Refuses writes: always (read-only export), or while a file exists."""

    name = "readonly"
    process_safe = True
    params = (
        Param(
            "readonly-file",
            "refuse writes with EPERM only while this file exists (without it: the export "
            "is read-only)",
            metavar="PATH",
        ),
    )

    def __init__(self, readonly_file: str | None = None):
        self.path = os.path.abspath(readonly_file) if readonly_file is not None else None

    def _check(self, what: str) -> None:
        if self.path is not None and os.path.exists(self.path):
            raise NBDError(errno.EPERM, f"readonly: {what} refused while {self.path} exists")

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        # Without a file the layer below is opened read-only, as -r would open it.
        return await below.open(readonly or self.path is None, export_name, is_tls), None

    async def pwrite(self, next: Next, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self._check("write")
        await next.pwrite(buf, offset, flags)

    async def trim(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        self._check("trim")
        await next.trim(count, offset, flags)

    async def zero(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        self._check("zero")
        await next.zero(count, offset, flags)


FILTER = ReadonlyFilter
