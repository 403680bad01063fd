"""The process around a server: what the ``trionbd`` command does besides serving.

Forking into the background once listening, the pidfile, systemd socket activation,
``--exit-with-parent``, ``-u``/``-g`` (the user and group it runs as), ``-s`` (a
client on stdin/stdout), the environment of a ``--run`` command, and logging to
syslog. Nothing here installs a signal handler; only the command does that.
"""

from __future__ import annotations

import ctypes
import grp
import logging
import os
import pwd
import signal
import socket
import stat
import sys
import syslog
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import trio

from ..chain.errors import ConfigError, StartupError
from ..net.address import Address
from .tls import TLSMode

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("trionbd")

LISTEN_FDS_START = 3
"""The first descriptor systemd passes (``SD_LISTEN_FDS_START``)."""
PR_SET_PDEATHSIG = 1
"""``prctl`` option: the signal this process gets when its parent dies (Linux)."""
READY = b"ready"
"""What the background child writes to the waiting parent once it serves."""


# --- socket activation ---------------------------------------------------------------------------


def activation_sockets() -> list[socket.socket] | None:
    """The listening sockets systemd (or libnbd's ``[ CMD ]``) passed, or ``None``.

    Socket activation is on when ``LISTEN_PID`` names this process and ``LISTEN_FDS``
    counts the descriptors, which start at 3. The variables are removed from the
    environment so that children do not take the sockets for theirs.
    """
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if pid is None or count is None:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid():
        log.warning("LISTEN_PID=%s is not this process (%d): ignored", pid, os.getpid())
        return None
    if not count.isdigit() or int(count) < 1:
        raise StartupError(f"socket activation: LISTEN_FDS={count!r} is not a positive number")
    socks = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise StartupError(f"socket activation: descriptor {fd} is not a socket: {e}") from None
        sock.set_inheritable(False)
        socks.append(sock)
    return socks


# --- background ----------------------------------------------------------------------------------


class Readiness:
    """Tells the parent that waits in :func:`fork_into_background` how start-up went."""

    def __init__(self, fd: int | None = None):
        self._fd = fd

    @property
    def pending(self) -> bool:
        """In the background, not yet ready: the caller's stdio is still ours."""
        return self._fd is not None

    def ready(self, keep_stderr: bool) -> None:
        """Serving: detach from the terminal's stdin/stdout (and stderr unless kept),
        then let the parent exit 0. Does nothing in the foreground."""
        if self._fd is None:
            return
        detach_stdio(keep_stderr)
        os.write(self._fd, READY)
        os.close(self._fd)
        self._fd = None

    def disown(self) -> None:
        """In a worker process forked before the supervisor was ready: leave telling
        the parent to the supervisor (the parent waits until every copy of the pipe has
        closed)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def detach_stdio(keep_stderr: bool) -> None:
    """Point stdin and stdout (and stderr unless kept) at /dev/null, so that the caller
    of a server gone to the background gets its terminal and pipes back."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if keep_stderr else (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def fork_into_background() -> Readiness:
    """Fork; the parent waits until the child serves (exit 0) or fails (the child's
    status, after the child has printed why on the still shared stderr).

    Call it after the sockets listen and before Trio starts. The child starts a new
    session and moves to ``/`` (paths given on the command line are absolute by then).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        os.chdir("/")
        return Readiness(write_end)
    os.close(write_end)
    message = b""
    while chunk := os.read(read_end, 64):
        message += chunk
    if message == READY:
        status = 0
    else:
        _, wait_status = os.waitpid(pid, 0)
        status = exit_status(os.waitstatus_to_exitcode(wait_status)) or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# --- pidfile, parent death -----------------------------------------------------------------------


def write_pidfile(path: str) -> None:
    """Write this process's id to ``path`` atomically (readers never see it half-written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_quietly(path: str) -> None:
    """Remove a file, or an empty directory; ignore what is already gone."""
    try:
        if os.path.isdir(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except OSError:
        pass


def exit_with_parent_supported() -> bool:
    return sys.platform.startswith("linux")


def exit_with_parent() -> None:
    """Get SIGTERM (a graceful shutdown) when the parent process exits (Linux prctl)."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise StartupError(f"--exit-with-parent: prctl failed: {os.strerror(code)}")
    if os.getppid() != parent:
        raise StartupError("--exit-with-parent: the parent process has already exited")


# --- -u, -g: who the server runs as ------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Whom ``-u``/``-g`` make the server once it listens."""

    uid: int | None
    """``None``: the user stays (``-g`` alone)."""
    gid: int
    groups: tuple[int, ...]
    """Supplementary groups: ``-g``'s group alone, or ``-u``'s user's groups."""


def identity(user: str | None, group: str | None) -> Identity | None:
    """What ``-u USER`` and ``-g GROUP`` (names or numeric ids) name, or ``None`` without
    them. Without ``-g`` the group is the user's primary group and the supplementary
    groups are the user's. Raises ``ConfigError`` for names that do not exist, a uid
    without a password entry and no ``-g``, or a process that is not root."""
    if user is None and group is None:
        return None
    if os.geteuid() != 0:
        raise ConfigError(
            f"-u/-g: changing user or group needs root (this process runs as uid {os.geteuid()})"
        )
    uid = gid = None
    groups: tuple[int, ...] = ()
    if user is not None:
        account = _entry(user, pwd.getpwnam, pwd.getpwuid, "-u", "user")
        if isinstance(account, int):
            uid = account
        else:
            uid, gid = account.pw_uid, account.pw_gid
            groups = tuple(os.getgrouplist(account.pw_name, account.pw_gid))
    if group is not None:
        found = _entry(group, grp.getgrnam, grp.getgrgid, "-g", "group")
        gid = found if isinstance(found, int) else found.gr_gid
        groups = (gid,)
    if gid is None:
        raise ConfigError(f"-u {user}: no such user in the password database: give a group (-g)")
    return Identity(uid, gid, groups)


def _entry(
    text: str, by_name: Callable[[str], Any], by_id: Callable[[int], Any], flag: str, what: str
) -> Any:
    """The database entry named ``text``; for a number, its entry if there is one, else
    the number."""
    try:
        return by_name(text)
    except KeyError:
        pass
    if not text.isdigit():
        raise ConfigError(f"{flag} {text}: no such {what} (give a name or a numeric id)")
    try:
        return by_id(int(text))
    except KeyError:
        return int(text)


def become(who: Identity) -> None:
    """Take on ``who``'s groups, group and user, for good (root cannot be had back)."""
    try:
        os.setgroups(list(who.groups))
        os.setgid(who.gid)
        if who.uid is not None:
            os.setuid(who.uid)
    except OSError as e:
        raise StartupError(f"-u/-g: cannot change user or group: {e.strerror}") from e
    log.debug("now running as uid %d, gid %d, groups %s", os.getuid(), os.getgid(), who.groups)


# --- -s: a client on stdin/stdout ----------------------------------------------------------------


def take_stdio() -> tuple[int, int]:
    """Take stdin and stdout for the protocol (``-s``): returns copies of them and points
    descriptors 0 and 1 at /dev/null, so that no stray print can corrupt the stream."""
    fds = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return fds


def stdio_stream(fd_in: int, fd_out: int) -> trio.abc.Stream:
    """A Trio stream over the descriptors :func:`take_stdio` returned. One socket on
    both (inetd, libnbd's ``connect_command``) becomes a ``SocketStream``; anything
    else (two pipes) a ``StapledStream``. The stream owns the descriptors."""
    st_in, st_out = os.fstat(fd_in), os.fstat(fd_out)
    same = (st_in.st_dev, st_in.st_ino) == (st_out.st_dev, st_out.st_ino)
    if stat.S_ISSOCK(st_in.st_mode) and same:
        os.close(fd_out)
        return trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd_in)))
    return trio.StapledStream(trio.lowlevel.FdStream(fd_out), trio.lowlevel.FdStream(fd_in))


# --- --run ---------------------------------------------------------------------------------------

KILL_AFTER = 5.0
"""Seconds a ``--run`` command has between SIGTERM and SIGKILL when trionbd stops first."""


def run_environment(
    address: Address,
    exportname: str,
    tls: TLSMode,
    certificates: str | None = None,
    psk: str | None = None,
) -> dict[str, str]:
    """The environment of a ``--run`` command: ours plus nbdkit's variables ``uri`` and
    ``nbd`` (the same URI), ``exportname``, ``port`` and ``unixsocket`` (one of them
    empty), ``tls`` (1 for on, 2 for require; unset when off), and with TLS on
    ``tls_certificates`` and ``tls_psk`` (the files given; ``$uri`` then names the
    certificate directory, as newer nbdkit releases do)."""
    env = dict(os.environ)
    uri = address.uri(exportname, tls=tls is TLSMode.REQUIRE)
    if tls is not TLSMode.OFF and certificates and psk is None:
        uri += ("&" if "?" in uri else "?") + "tls-certificates=" + quote(certificates)
    env.update(
        uri=uri,
        nbd=uri,
        exportname=exportname,
        port="" if address.port is None else str(address.port),
        unixsocket=address.unix_path or "",
    )
    for name in ("tls", "tls_certificates", "tls_psk"):
        env.pop(name, None)
    if tls is not TLSMode.OFF:
        env["tls"] = "2" if tls is TLSMode.REQUIRE else "1"
        if psk is not None:
            env["tls_psk"] = psk
        elif certificates:
            env["tls_certificates"] = certificates
    return env


def exit_status(returncode: int) -> int:
    """A shell's view of a child's status: 128+N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


# --- signals and how serving ended ---------------------------------------------------------------


async def watch_signals(
    signals: AsyncIterator[int], server: Server, scope: trio.CancelScope
) -> None:
    """SIGUSR1: every layer reports, and the server's counters are logged (info).
    First SIGINT/SIGTERM/SIGQUIT: graceful shutdown, then ``scope`` is cancelled.
    Second: cut the grace period short."""
    count = 0
    async for signum in signals:
        if signum == signal.SIGUSR1:
            await server.report()
            continue
        count += 1
        log.info("%s received", signal.Signals(signum).name)
        server.shutdown(0 if count > 1 else None)
        scope.cancel()


def stopped_by(error: BaseException) -> str:
    """One line for a ``KeyboardInterrupt`` or ``SystemExit`` raised while serving
    (plugin code may raise them; the signals themselves are handled): what was raised
    where. It still stops the server, as it would a library server."""
    what = repr(error) if error.args else type(error).__name__
    frames = traceback.extract_tb(error.__traceback__)
    where = f" in {frames[-1].name} ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{what} raised{where} stopped the server"


def leaves(error: BaseException) -> list[BaseException]:
    """The non-group exceptions inside a (possibly nested) exception group."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in leaves(e)]
    return [error]


# --- logging -------------------------------------------------------------------------------------


class SyslogHandler(logging.Handler):
    """Log records to the system log (``--log=syslog``) through the C library, which
    drops them quietly when no syslog daemon listens."""

    _PRIORITY = {
        logging.DEBUG: syslog.LOG_DEBUG,
        logging.INFO: syslog.LOG_INFO,
        logging.WARNING: syslog.LOG_WARNING,
        logging.ERROR: syslog.LOG_ERR,
        logging.CRITICAL: syslog.LOG_CRIT,
    }

    def __init__(self, ident: str = "trionbd"):
        super().__init__()
        syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_DAEMON)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            priority = self._PRIORITY.get(record.levelno, syslog.LOG_ERR)
            syslog.syslog(priority, self.format(record))
        except Exception:
            self.handleError(record)
