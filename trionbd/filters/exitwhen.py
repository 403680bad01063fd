"""exitwhen: exit gracefully when an event occurs.

Events: a file created or deleted, a pipe closed, a process that exits, or whatever a
script of yours detects. Once one has occurred the server stops accepting clients,
opens no new export for the clients still negotiating, serves those connected until
they disconnect, and then exits with status 0; when nobody is connected, it exits at
once. Several events may be given, of any kind (each parameter may repeat): the first
to occur ends the server. Without any, the filter does nothing.

Events are checked when a client opens an export or closes one, and every
``exit-when-poll`` seconds (60 by default) in between. An event that has occurred
before the server starts ends it as soon as it has started, before any client.

* ``exit-when-file-created=FILE`` and ``exit-when-file-deleted=FILE``: the file exists
  (and can be read), or no longer exists.
* ``exit-when-pipe-closed=FD``: descriptor FD, inherited from whoever started the
  server, is the read end of a pipe (or a socket); the event is its other end being
  closed. Nothing is read from it. The descriptor must be open at start-up.
* ``exit-when-process-exits=PID``: process PID has exited (as long as it is a zombie
  that its parent has not collected, it has not). Its ``/proc`` entry is opened at
  start-up, so a later process that happens to get the same id is not mistaken for it.
* ``exit-when-script=COMMAND``: ``sh -c COMMAND`` runs at every check; exit status 88
  means the event has occurred, 0 that it has not; any other status is logged as an
  error and counts as not yet (89 and up are reserved by nbdkit). Give scripts by
  absolute path: in the background the server runs in ``/``.

Examples:
  trionbd --filter=exitwhen memory 1G exit-when-file-created=/tmp/stop
  trionbd --filter=exitwhen file disk.img exit-when-process-exits=$$
"""

from __future__ import annotations

import errno
import logging
import os
import select
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from ..chain import ConfigError, Filter, Layer, NBDError, Next, Param, parse_int, parse_seconds

if TYPE_CHECKING:
    from ..nursery import Lifetime

log = logging.getLogger(__name__)

EVENT_STATUS = 88
"""The exit status by which an ``exit-when-script`` says the event has occurred."""


def parse_pid(text: str) -> int:
    pid = parse_int(text)
    if pid < 1:
        raise ValueError(f"{text!r} is not a process id")
    return pid


Check = Callable[[], Awaitable[str | None]]
"""One event's check: what occurred (for the log), or ``None`` while it has not."""


class ExitwhenFilter(Filter):
    """Asks the server to end, once its clients have gone, when an event occurs."""

    name = "exitwhen"
    process_safe = False  # an event would end one worker process, not the server
    params = (
        Param(
            "exit-when-file-created", "exit once FILE exists", repeat=True, metavar="FILE"
        ),
        Param(
            "exit-when-file-deleted", "exit once FILE is gone", repeat=True, metavar="FILE"
        ),
        Param(
            "exit-when-pipe-closed",
            "exit once the other end of the pipe on inherited descriptor FD is closed",
            parse_int,
            repeat=True,
            metavar="FD",
        ),
        Param(
            "exit-when-process-exits",
            "exit once process PID has exited",
            parse_pid,
            repeat=True,
            metavar="PID",
        ),
        Param(
            "exit-when-script",
            "exit once sh -c COMMAND exits with status 88",
            repeat=True,
            metavar="COMMAND",
        ),
        Param(
            "exit-when-poll",
            "seconds between checks while no client opens or closes an export",
            parse_seconds,
            metavar="SECONDS",
            default="60",
        ),
    )

    def __init__(
        self,
        exit_when_file_created: list[str] | None = None,
        exit_when_file_deleted: list[str] | None = None,
        exit_when_pipe_closed: list[int] | None = None,
        exit_when_process_exits: list[int] | None = None,
        exit_when_script: list[str] | None = None,
        exit_when_poll: float = 60.0,
    ):
        self.created = [os.path.abspath(p) for p in exit_when_file_created or []]
        self.deleted = [os.path.abspath(p) for p in exit_when_file_deleted or []]
        self.pipes = exit_when_pipe_closed or []
        self.pids = exit_when_process_exits or []
        self.scripts = exit_when_script or []
        self.poll = exit_when_poll
        self.checks: list[Check] = []
        self.occurred: str | None = None
        """What happened, once an event has occurred."""
        self.lifetime: Lifetime | None = None
        self._stat_fds: list[int] = []
        self._checking = trio.Lock()

    def get_ready(self) -> None:
        for fd in self.pipes:
            try:
                os.fstat(fd)
            except OSError:
                raise ConfigError(
                    f"exitwhen: exit-when-pipe-closed={fd}: descriptor {fd} is not open"
                ) from None
        for pid in self.pids:
            try:
                self._stat_fds.append(os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                raise ConfigError(
                    f"exitwhen: exit-when-process-exits={pid}: no such process ({e.strerror})"
                ) from None
        self.checks = (
            [self._created(p) for p in self.created]
            + [self._deleted(p) for p in self.deleted]
            + [self._pipe_closed(fd) for fd in self.pipes]
            + [self._exited(pid, fd) for pid, fd in zip(self.pids, self._stat_fds, strict=True)]
            + [self._script(s) for s in self.scripts]
        )

    def unload(self) -> None:
        for fd in self._stat_fds:
            os.close(fd)
        self._stat_fds.clear()

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        self.lifetime = lifetime
        if self.checks:
            await self.check()
            if self.occurred is None:
                lifetime.nursery.start_soon(self._poll)

    async def _poll(self) -> None:
        while self.occurred is None:
            await trio.sleep(self.poll)
            await self.check()

    async def check(self) -> None:
        """Check every event, unless one has occurred; on the first that has, ask the
        server to end once its clients have gone."""
        async with self._checking:
            for check in self.checks:
                if self.occurred is not None:
                    return
                what = await check()
                if what is not None:
                    self.occurred = what
                    log.info("exitwhen: %s", what)
                    if self.lifetime is not None:
                        self.lifetime.request_shutdown()

    # --- the events ----------------------------------------------------------------------

    @staticmethod
    def _created(path: str) -> Check:
        async def check() -> str | None:
            return f"{path} was created" if os.access(path, os.R_OK) else None

        return check

    @staticmethod
    def _deleted(path: str) -> Check:
        async def check() -> str | None:
            try:
                os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                return f"{path} was deleted"
            except OSError as e:
                log.error("exitwhen: exit-when-file-deleted: %s: %s", path, e.strerror)
            return None

        return check

    @staticmethod
    def _pipe_closed(fd: int) -> Check:
        async def check() -> str | None:
            poller = select.poll()
            poller.register(fd, 0)  # no events asked: hang-ups and bad descriptors still come
            for _, revents in poller.poll(0):
                if revents & select.POLLNVAL:
                    return f"descriptor {fd} was closed (exit-when-pipe-closed)"
                if revents & select.POLLHUP:
                    return f"the pipe on descriptor {fd} was closed"
            return None

        return check

    @staticmethod
    def _exited(pid: int, stat_fd: int) -> Check:
        async def check() -> str | None:
            try:
                os.pread(stat_fd, 1, 0)
            except ProcessLookupError:  # ESRCH: the process behind the /proc entry is gone
                return f"process {pid} has exited"
            except OSError as e:
                log.error("exitwhen: exit-when-process-exits=%d: %s", pid, e.strerror)
            return None

        return check

    @staticmethod
    def _script(command: str) -> Check:
        async def check() -> str | None:
            try:
                done = await trio.run_process(["/bin/sh", "-c", command], check=False)
            except OSError as e:
                log.error("exitwhen: exit-when-script: %s", e)
                return None
            if done.returncode == EVENT_STATUS:
                return f"the script {command!r} detected the event"
            if done.returncode != 0:
                log.error(
                    "exitwhen: exit-when-script %r exited with status %d", command, done.returncode
                )
            return None

        return check

    # --- clients -------------------------------------------------------------------------

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        if self.checks:
            await self.check()
        if self.occurred is not None:
            raise NBDError(
                errno.ESHUTDOWN, f"exitwhen: the server is exiting ({self.occurred})"
            )
        return await below.open(readonly, export_name, is_tls), None

    async def close(self, next: Next, h: Any) -> None:
        if self.checks:
            await self.check()


FILTER = ExitwhenFilter
