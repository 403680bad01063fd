"""file: serve a file or block device, or every regular file in a directory.

With ``file=PATH`` (the magic parameter) the one file is the export, whatever name a
client asks for. With ``dir=DIR`` each regular file directly inside DIR is an export
named by its file name (``nbdinfo --list`` shows them); the default export is the
first name in sorted order.

Reads and writes use pread/pwrite on the file; block status comes from
SEEK_DATA/SEEK_HOLE; trim punches holes; zeroing punches holes too unless the client
asks for allocated zeroes (NO_HOLE), then uses FALLOC_FL_ZERO_RANGE, falling back to
writing zeroes (or, with FAST_ZERO, failing at once); flush is fdatasync; cache is
posix_fadvise(WILLNEED). The export is read-only when the file is not writable or with
``-r``. All clients share the page cache, so multi-conn is advertised.

Reads and writes run inline in the server's event loop: they normally hit the page
cache, where a worker-thread round trip costs more than the copy (see bench/). Slow
operations (fdatasync, fallocate) run in worker threads.

Examples:
  trionbd file disk.img
  trionbd file dir=/var/images
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Any

import trio

from ..chain import (
    ConfigError,
    Export,
    Extent,
    NBDError,
    Param,
    Plugin,
    describe_file,
    parse_choice,
)
from ..chain.types import CacheMode, FuaMode, ZeroMode
from ..osutil import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
    punch_hole,
)
from ..protocol.constants import FUA_BIT, UNALLOCATED, CmdFlag

MAX_EXTENTS = 4096
"""Extents returned per block status call (clients ask again for the rest)."""


@dataclass
class Handle:
    fd: int
    path: str
    size: int
    writable: bool
    is_block: bool
    can_punch: bool = True
    can_zero_range: bool = True


class FilePlugin(Plugin):
    """Serve a file, a block device, or every regular file in a directory."""

    name = "file"
    process_safe = True  # every process opens the file itself; the page cache is shared
    params = (
        Param("file", "the file or block device to serve", metavar="PATH"),
        Param("dir", "serve each regular file in DIR as an export", metavar="DIR"),
        Param(
            "cache",
            "none: advise the kernel not to keep served data cached",
            parse_choice("default", "none"),
            default="default",
        ),
    )
    magic_param = "file"
    nonblocking = True

    def __init__(self, file: str | None = None, dir: str | None = None, cache: str = "default"):
        if (file is None) == (dir is None):
            raise ConfigError("file: give exactly one of file=PATH or dir=DIR")
        self.file = os.path.abspath(file) if file is not None else None
        self.dir = os.path.abspath(dir) if dir is not None else None
        self.drop_cache = cache == "none"

    def get_ready(self) -> None:
        if self.file is not None:
            try:
                st = os.stat(self.file)
            except OSError as e:
                raise ConfigError(f"file: {self.file}: {e.strerror}") from None
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ConfigError(f"file: {self.file}: not a regular file or block device")
            if not os.access(self.file, os.R_OK):
                raise ConfigError(f"file: {self.file}: not readable")
        else:
            assert self.dir is not None
            if not os.path.isdir(self.dir):
                raise ConfigError(f"file: {self.dir}: not a directory")

    # --- exports -------------------------------------------------------------------------

    def _dir_files(self) -> list[os.DirEntry[str]]:
        assert self.dir is not None
        with os.scandir(self.dir) as it:
            return sorted((e for e in it if e.is_file()), key=lambda e: e.name)

    async def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        if self.dir is None:
            return [Export("")]
        files = await trio.to_thread.run_sync(self._dir_files)
        return [Export(e.name, describe_file(e.stat().st_size)) for e in files]

    async def default_export(self, readonly: bool, is_tls: bool) -> str:
        if self.dir is None:
            return ""
        files = await trio.to_thread.run_sync(self._dir_files)
        return files[0].name if files else ""

    async def export_identity(self, export_name: str) -> bytes | None:
        """A regular file's inode, size and modification time (nanoseconds); None for a
        block device, whose contents change without its times changing."""
        try:
            st = os.stat(self._path(export_name))
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return f"file ino {st.st_ino} size {st.st_size} mtime {st.st_mtime_ns}".encode()

    def _path(self, export_name: str) -> str:
        if self.file is not None:
            return self.file
        assert self.dir is not None
        if not export_name or "/" in export_name or export_name in (".", ".."):
            raise NBDError(errno.ENOENT, f"file: no export named {export_name!r} in {self.dir}")
        return os.path.join(self.dir, export_name)

    # --- per connection ------------------------------------------------------------------

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> Handle:
        path = self._path(export_name)
        writable = not readonly and os.access(path, os.W_OK)
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NBDError(errno.ENOENT, f"file: no export named {export_name!r}") from None
        except OSError as e:
            raise NBDError(e.errno or errno.EIO, f"file: {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise NBDError(errno.ENOENT, f"file: {path} is not a regular file")
            size = os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        return Handle(fd, path, size, writable, stat.S_ISBLK(st.st_mode))

    async def close(self, h: Handle) -> None:
        os.close(h.fd)

    async def get_size(self, h: Handle) -> int:
        return h.size

    async def export_description(self, h: Handle) -> str | None:
        return None if self.dir is None else describe_file(h.size)

    async def can_write(self, h: Handle) -> bool:
        return h.writable

    async def can_multi_conn(self, h: Any) -> bool:
        return True

    async def can_fua(self, h: Any) -> FuaMode:
        return FuaMode.NATIVE

    async def can_zero(self, h: Any) -> ZeroMode:
        return ZeroMode.NATIVE

    async def can_fast_zero(self, h: Any) -> bool:
        return True

    async def can_extents(self, h: Handle) -> bool:
        return not h.is_block

    # --- data ----------------------------------------------------------------------------

    async def pread(self, h: Handle, count: int, offset: int, flags: int) -> bytes:
        data = os.pread(h.fd, count, offset)
        if len(data) < count:
            # Only possible if the file shrank under us: the bytes are gone.
            raise NBDError(errno.EIO, f"file: {h.path}: short read at offset {offset}")
        if self.drop_cache:
            os.posix_fadvise(h.fd, offset, count, os.POSIX_FADV_DONTNEED)
        return data

    async def pwrite(self, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        view = memoryview(buf)
        while view:
            n = os.pwrite(h.fd, view, offset)
            view = view[n:]
            offset += n
        if flags & FUA_BIT:
            await self.flush(h, 0)

    async def flush(self, h: Handle, flags: int) -> None:
        await trio.to_thread.run_sync(os.fdatasync, h.fd)

    async def trim(self, h: Handle, count: int, offset: int, flags: int) -> None:
        if h.can_punch and not h.is_block:
            # trim is advisory: where holes cannot be punched, doing nothing is correct
            h.can_punch = await trio.to_thread.run_sync(punch_hole, h.fd, offset, count)
        if flags & FUA_BIT:
            await self.flush(h, 0)

    async def zero(self, h: Handle, count: int, offset: int, flags: int) -> None:
        done = False
        # Punch first when allowed: ZERO_RANGE keeps the blocks allocated (as unwritten
        # extents), so sparse copies (nbdcopy) would not stay sparse.
        if not flags & CmdFlag.NO_HOLE and h.can_punch and not h.is_block:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            done = await self._try_fallocate(h, mode, count, offset)
            h.can_punch = done
        if not done and h.can_zero_range and not h.is_block:
            done = await self._try_fallocate(h, FALLOC_FL_ZERO_RANGE, count, offset)
            h.can_zero_range = done
        if not done:
            if flags & CmdFlag.FAST_ZERO:
                raise NBDError(errno.ENOTSUP, "file: zeroing this file is not faster than writing")
            zeroes = bytes(min(count, 1 << 20))
            end = offset + count
            while offset < end:
                n = min(len(zeroes), end - offset)
                await self.pwrite(h, zeroes[:n], offset, 0)
                offset += n
        if flags & FUA_BIT:
            await self.flush(h, 0)

    async def _try_fallocate(self, h: Handle, mode: int, count: int, offset: int) -> bool:
        try:
            await trio.to_thread.run_sync(fallocate, h.fd, mode, offset, count)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise
        return True

    async def extents(self, h: Handle, count: int, offset: int, flags: int) -> list[Extent]:
        out: list[Extent] = []
        pos = offset
        end = min(offset + count, h.size)
        while pos < end and len(out) < MAX_EXTENTS:
            try:
                data = os.lseek(h.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end  # only a hole up to the end of the file
            if data > pos:
                stop = min(data, end)
                out.append(Extent(pos, stop - pos, UNALLOCATED))
                pos = stop
                continue
            hole = os.lseek(h.fd, pos, os.SEEK_HOLE)
            stop = min(hole, end)
            out.append(Extent(pos, stop - pos, 0))
            pos = stop
        return out

    async def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    async def cache(self, h: Handle, count: int, offset: int, flags: int) -> None:
        os.posix_fadvise(h.fd, offset, count, os.POSIX_FADV_WILLNEED)


PLUGIN = FilePlugin
