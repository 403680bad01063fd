"""Worker processes: one server's clients spread over several processes (``--workers``).

::

    supervisor: get_ready, listening sockets, pidfile, --run, signals, reports
    ├── worker 1: trio.run(serve) with its own lifetime (after_fork .. cleanup)
    ├── worker 2: the same, on the same listening sockets
    └── ...

One event loop runs the Python of all its clients on one core. When every layer of the
chain is process-safe (``process_safe``: nothing clients change or count lives only in
one process), the command line forks workers after ``get_ready`` and after the sockets
listen; each runs its own event loop, lifetime and :class:`~.server.Server` on the same
sockets, so the clients of a server use every core. The supervisor serves nobody: it
starts the workers, is the process of the pidfile, runs the ``--run`` command, takes
the signals and writes the reports; ``unload`` runs in it once, at the end.

Which worker takes a client: every worker waits on the shared sockets and the kernel
wakes them all when a client connects. Left alone, whichever is scheduled first takes
it: of 100 bursts of four clients on two workers, 53 split 2/2, 39 split 3/1 and 8 went
to one worker. :class:`Balance` keeps each worker's number of clients in shared memory
(with it, 100 of 100 bursts split 2/2); a worker with
more clients than another leaves a waiting client to the less busy one for up to
:data:`DEFER` seconds before it takes the client itself (the less busy one normally
takes it within microseconds; it may be stuck, or dead). ``--max-connections``
counts the clients of all workers together, under a lock (exact, whatever the timing).

Start-up: the supervisor is ready (pidfile, printed URI, the background parent's exit,
``--run``) once every worker serves; a worker that cannot start stops the server with
its message (exit status 1). Signals go to the supervisor: the first SIGINT, SIGTERM or
SIGQUIT sends every worker SIGTERM (each drains its clients gracefully), a second one
sends another (each cuts its grace period short); SIGUSR1 asks every worker to run its
layers' ``report`` and send its counters (``worker_share`` of each layer and the
server's :meth:`~.server.Server.stats`), which the supervisor sums: each layer's
``report_workers`` gets them (the stats filter writes its report there), and the
server's counters are logged (info). Each worker sends its counters once more when it
exits; the final ``report_workers`` follows the last worker's exit.

A worker that dies while serving (a crash, the OOM killer) loses its own clients only:
the supervisor logs how it ended and starts a new one after :data:`RESTART_FIRST`
seconds, doubling the delay (up to :data:`RESTART_MAX`) while workers keep dying
within :data:`STABLE` seconds of their start. Workers get SIGTERM when the supervisor
dies (``PR_SET_PDEATHSIG``), and leave the terminal's process group, so that ^C reaches
the supervisor only (which then stops each worker once). Log lines of a worker start
with ``worker N:``.

The supervisor runs no event loop (Trio cannot fork from inside one): it waits on a
selector for signals (a wakeup pipe), its workers' control sockets and their exits
(pidfds), and the ``--run`` command.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import logging
import mmap
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

from ..chain import Chain
from ..chain.errors import StartupError
from . import daemon
from .config import ServerConfig
from .listeners import as_listener
from .server import ExportStats, Server, log_stats, serve, sum_stats

log = logging.getLogger("trionbd.server")

VACANT = 1 << 62
"""The client count of a worker that does not serve (starting, or gone): never the
least busy, and not counted against ``--max-connections``."""
DEFER = 0.05
"""Seconds a worker with more clients than another leaves a waiting client to the less
busy one, before it takes the client itself (the other may be stuck, or gone)."""
DEFER_STEP = 0.001
"""Seconds between its looks at whether the client is still waiting."""
RESTART_FIRST = 0.1
"""Seconds before a worker that died is replaced."""
RESTART_MAX = 30.0
"""The longest delay before a replacement, however often workers die."""
STABLE = 30.0
"""A worker that served this many seconds before dying resets the delay."""
REPORT_TIMEOUT = 10.0
"""Seconds the supervisor waits for the workers' counters on SIGUSR1."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
SIGNALS = (*STOP_SIGNALS, signal.SIGUSR1)
"""What the supervisor handles (SIGHUP is ignored, as in one process)."""

_HEADER = struct.Struct("!I")

Share = tuple[dict[str, ExportStats], list[object]]
"""What a worker has counted: the server's stats and each layer's ``worker_share``."""


@functools.cache
def available() -> bool:
    """Whether this system can run worker processes: Linux with pidfds (5.3 and later)
    and memfds. Asked of the kernel, not only of Python: an older kernel, or valgrind,
    answers ENOSYS."""
    try:
        os.close(os.pidfd_open(os.getpid()))
        os.close(os.memfd_create("trionbd-probe", os.MFD_CLOEXEC))
    except (AttributeError, OSError):
        return False
    return True


def default_count() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0))


# --- which worker takes a client -------------------------------------------------------------


class Balance:
    """The number of clients of each worker, in memory shared by the supervisor and the
    workers (made before forking). Each worker writes only its own slot; the lock (a
    POSIX record lock, which the kernel drops when its holder dies) is taken only to
    admit a client under ``--max-connections``."""

    def __init__(self, count: int):
        self._fd = os.memfd_create("trionbd-workers", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, 8 * count)
        self._map = mmap.mmap(self._fd, 8 * count)
        self.loads = memoryview(self._map).cast("q")
        for i in range(count):
            self.loads[i] = VACANT
        self.me = -1
        """This worker's slot (``index - 1``); -1 in the supervisor."""

    def serving(self, index: int) -> None:
        """In worker ``index``: take clients from now on."""
        self.me = index - 1
        self.loads[self.me] = 0

    def vacate(self, index: int) -> None:
        """In the supervisor: worker ``index`` has gone (its clients with it)."""
        self.loads[index - 1] = VACANT

    def _busier(self) -> bool:
        mine = self.loads[self.me]
        return any(n < mine for n in self.loads)

    async def accept(self, listener: trio.SocketListener) -> trio.SocketStream:
        """The next client of ``listener`` this worker should take (see the module doc)."""
        sock = listener.socket
        while True:
            await trio.lowlevel.wait_readable(sock)
            deadline = trio.current_time() + DEFER
            while self._busier() and trio.current_time() < deadline:
                await trio.sleep(DEFER_STEP)
                if not select.select([sock], [], [], 0)[0]:
                    break  # a less busy worker took it: wait for the next client
            else:
                return await listener.accept()

    def admit(self, limit: int | None) -> bool:
        """Count a client just accepted, unless ``limit`` clients are served already by
        all workers together (then False: the caller refuses it)."""
        if limit is None:
            self.loads[self.me] += 1
            return True
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            if sum(n for n in self.loads if n != VACANT) >= limit:
                return False
            self.loads[self.me] += 1
            return True
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def release(self) -> None:
        """A client admitted by :meth:`admit` has gone."""
        self.loads[self.me] -= 1


@dataclass(frozen=True)
class Slot:
    """What a worker process knows of itself (``serve(worker=...)``)."""

    index: int
    """From 1; log lines and ``Lifetime.worker`` carry it."""
    balance: Balance


# --- the control socket between the supervisor and a worker --------------------------------------


def _frame(message: object) -> bytes:
    data = pickle.dumps(message)
    return _HEADER.pack(len(data)) + data


def _unframe(buffer: bytearray) -> list[Any]:
    """The complete messages at the start of ``buffer``, removed from it."""
    out = []
    while len(buffer) >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer)
        end = _HEADER.size + size
        if len(buffer) < end:
            break
        out.append(pickle.loads(buffer[_HEADER.size : end]))
        del buffer[:end]
    return out


# --- a worker ------------------------------------------------------------------------------------


def _share(server: Server) -> Share:
    return server.stats(), server.chain.worker_shares()


async def _answer(control: trio.SocketStream, server: Server, scope: trio.CancelScope) -> None:
    """Answer the supervisor's report requests; when it has gone, shut down."""
    buffer = bytearray()
    with contextlib.suppress(trio.BrokenResourceError):
        while data := await control.receive_some():
            buffer += data
            for _, ident in _unframe(buffer):  # ("report", ident)
                await server.chain.report()
                await control.send_all(_frame(("share", ident, _share(server))))
    log.warning("the supervising process has gone: shutting down")
    server.shutdown()
    scope.cancel()


async def _serve_worker(
    slot: Slot,
    chain: Chain,
    config: ServerConfig,
    sockets: Sequence[socket.socket],
    control: socket.socket,
    served: list[Server],
    detach: bool | None,
) -> None:
    """A worker's event loop: serve until SIGTERM (or the supervisor's end). ``detach``
    is ``keep_stderr`` when the caller's stdio must be let go once serving."""
    # Reports come over the control socket; a stray SIGUSR1 or SIGHUP is ignored.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctl = trio.SocketStream(trio.socket.from_stdlib_socket(control))
    listeners = [as_listener(sock) for sock in sockets]
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as watching:
            async with trio.open_nursery() as serving:
                server: Server = await serving.start(
                    functools.partial(serve, chain, listeners, config, worker=slot)
                )
                served.append(server)
                slot.balance.serving(slot.index)
                await ctl.send_all(_frame(("ready",)))
                if detach is not None:
                    daemon.detach_stdio(keep_stderr=detach)
                watching.start_soon(daemon.watch_signals, signals, server, serving.cancel_scope)
                watching.start_soon(_answer, ctl, server, serving.cancel_scope)
            watching.cancel_scope.cancel()


def _tag_log_records(index: int) -> None:
    """Start every log line of this process with ``worker N:``."""
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.msg = f"worker {index}: {record.msg}"
        return record

    logging.setLogRecordFactory(factory)


def _worker(
    slot: Slot,
    chain: Chain,
    config: ServerConfig,
    sockets: Sequence[socket.socket],
    control: socket.socket,
    detach: bool | None,
) -> NoReturn:
    """The body of a forked worker process; ends it with status 0 after a clean
    shutdown, 1 (and the messages sent to the supervisor) when serving failed."""
    messages: list[str] = []
    served: list[Server] = []
    try:
        os.setpgid(0, 0)  # out of the terminal's process group: ^C reaches the supervisor
        _tag_log_records(slot.index)
        daemon.exit_with_parent()  # SIGTERM when the supervisor dies
        trio.run(_serve_worker, slot, chain, config, sockets, control, served, detach)
    except* StartupError as group:
        messages += [str(e) for e in daemon.leaves(group)]
    except* (KeyboardInterrupt, SystemExit) as group:
        messages += [daemon.stopped_by(e) for e in daemon.leaves(group)]
    except* BaseException as group:
        for error in daemon.leaves(group):
            log.critical("internal error", exc_info=error)
        messages.append("internal error (see the log)")
    share = _share(served[0]) if served else None
    try:
        control.setblocking(True)
        control.sendall(_frame(("exit", share, messages)))
    except OSError:
        pass  # the supervisor has gone
    logging.shutdown()
    os._exit(1 if messages else 0)


# --- the supervisor ------------------------------------------------------------------------------


@dataclass(eq=False)
class _Process:
    """A worker process as the supervisor sees it."""

    index: int
    pid: int
    pidfd: int
    control: socket.socket
    started: float
    buffer: bytearray = field(default_factory=bytearray)
    listening: bool = True
    """Its control socket is still registered (until the worker closes its end)."""
    ready: bool = False
    share: Share | None = None
    """What it counted, as of its last answer (or its exit)."""
    messages: list[str] = field(default_factory=list)
    """Why it stopped, as it said when exiting."""
    terminated: bool = False
    """Sent SIGTERM by the supervisor's shutdown."""


def _how_it_ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"was killed by signal {sig} ({signal.Signals(sig).name})"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """Starts ``count`` workers serving ``chain`` on ``sockets`` and watches over them
    until they have all stopped (see the module doc). ``readiness`` is the background
    parent's (its stdio is let go by every worker too); ``keep_stderr`` as for
    :meth:`~.daemon.Readiness.ready`."""

    def __init__(
        self,
        chain: Chain,
        config: ServerConfig,
        sockets: Sequence[socket.socket],
        count: int,
        readiness: daemon.Readiness,
        keep_stderr: bool,
    ):
        self.chain = chain
        self.config = config
        self.sockets = list(sockets)
        self.count = count
        self.readiness = readiness
        self.keep_stderr = keep_stderr
        self.balance = Balance(count)
        self.workers: dict[int, _Process] = {}
        """The live worker of each slot (1..count)."""
        self.past: list[Share] = []
        """The last counters of every worker that has exited."""
        self.failures: list[str] = []
        """Why the server could not start (or stopped with an error)."""
        self.stopping = False
        self.status = 0
        """The ``--run`` command's exit status."""
        self._selector = selectors.DefaultSelector()
        self._wakeup_r, self._wakeup_w = os.pipe()
        self._timers: list[tuple[float, Callable[[], None]]] = []
        self._delays = dict.fromkeys(range(1, count + 1), RESTART_FIRST)
        self._restarts: set[int] = set()
        """Slots whose worker died and will be started again after a delay."""
        self._stop_signals = 0
        self._report: tuple[int, set[_Process], float] | None = None
        """The report under way: its number, the workers yet to answer, its deadline."""
        self._reports = 0
        self._command: subprocess.Popen[bytes] | None = None
        self._command_pidfd = -1

    # --- the loop --------------------------------------------------------------------------

    def run(
        self, on_ready: Callable[[], None], command: tuple[str, dict[str, str]] | None
    ) -> tuple[int, list[str]]:
        """Serve until stopped; returns the exit status (``--run``'s) and the messages of
        a failure. ``on_ready`` runs once every worker serves, then ``command`` (``sh -c``
        with that environment) starts; when it exits the server stops."""
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, self._on_signals)
        old_wakeup = signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        old_handlers = {sig: signal.signal(sig, _record_signal) for sig in SIGNALS}
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            gc.freeze()  # what exists now stays shared with the workers, page for page
            for index in range(1, self.count + 1):
                self._spawn(index)
            log.info("serving from %d worker processes", self.count)
            while not self.stopping and not all(w.ready for w in self.workers.values()):
                self._step()
            if not self.stopping:
                on_ready()
                if command is not None:
                    self._start_command(*command)
            while (
                self.workers or self._command is not None or (self._restarts and not self.stopping)
            ):
                self._step()
            self.chain.report_workers([layers for _, layers in self.past], final=True)
        finally:
            for worker in list(self.workers.values()):  # only if something above failed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
                os.waitpid(worker.pid, 0)
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self._selector.close()
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
        failures = list(dict.fromkeys(self.failures))
        return (1 if failures else self.status), failures

    def _step(self) -> None:
        """Wait for the next event (or timer) and handle it."""
        now = time.monotonic()
        timeout = min((due for due, _ in self._timers), default=now + 3600) - now
        for key, _ in self._selector.select(max(timeout, 0)):
            key.data()
        now = time.monotonic()
        due = [t for t in self._timers if t[0] <= now]
        self._timers = [t for t in self._timers if t[0] > now]
        for _, action in due:
            action()

    def _at(self, delay: float, action: Callable[[], None]) -> None:
        self._timers.append((time.monotonic() + delay, action))

    # --- workers ---------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        parent_end, child_end = socket.socketpair()
        detach = self.keep_stderr if self.readiness.pending else None
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    parent_end.close()
                    self._become_worker()
                    slot = Slot(index, self.balance)
                    _worker(slot, self.chain, self.config, self.sockets, child_end, detach)
                finally:
                    os._exit(1)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        child_end.close()
        parent_end.setblocking(False)
        worker = _Process(index, pid, os.pidfd_open(pid), parent_end, time.monotonic())
        self.workers[index] = worker
        self._selector.register(parent_end, selectors.EVENT_READ, lambda: self._on_control(worker))
        self._selector.register(worker.pidfd, selectors.EVENT_READ, lambda: self._on_exit(worker))
        log.debug("worker %d started (pid %d)", index, pid)

    def _become_worker(self) -> None:
        """In a new worker, before anything else: drop the supervisor's signal handling
        and descriptors (signals are still blocked)."""
        signal.set_wakeup_fd(-1)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        for fd in (self._wakeup_r, self._wakeup_w, self._command_pidfd):
            if fd >= 0:
                os.close(fd)
        for other in self.workers.values():
            other.control.close()
            os.close(other.pidfd)
        self._selector.close()
        self.readiness.disown()

    def _on_control(self, worker: _Process) -> None:
        while worker.listening:
            try:
                data = worker.control.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:  # it is exiting: its pidfd tells when it has
                self._selector.unregister(worker.control)
                worker.listening = False
                break
            worker.buffer += data
        for message in _unframe(worker.buffer):
            kind = message[0]
            if kind == "ready":
                worker.ready = True
                log.debug("worker %d (pid %d) serves", worker.index, worker.pid)
            elif kind == "share":
                _, ident, worker.share = message
                self._answered(worker, ident)
            elif kind == "exit":
                _, share, worker.messages = message
                worker.share = share or worker.share

    def _on_exit(self, worker: _Process) -> None:
        _, status = os.waitpid(worker.pid, 0)
        self._on_control(worker)  # its last words, if still unread
        if worker.listening:
            self._selector.unregister(worker.control)
        self._selector.unregister(worker.pidfd)
        worker.control.close()
        os.close(worker.pidfd)
        del self.workers[worker.index]
        self.balance.vacate(worker.index)
        if worker.share is not None:
            self.past.append(worker.share)
        if self._report is not None:
            self._answered(worker, self._report[0])
        ended = _how_it_ended(status)
        why = "; ".join(worker.messages)
        if not worker.ready and not self.stopping:
            self.failures += worker.messages or [f"worker {worker.index} {ended} while starting"]
            self._stop()
        elif self.stopping:
            self.failures += worker.messages
            log.debug("worker %d (pid %d) %s", worker.index, worker.pid, ended)
        else:
            delay = self._delays[worker.index]
            served = time.monotonic() - worker.started
            if served >= STABLE:
                delay = RESTART_FIRST
            self._delays[worker.index] = min(2 * delay, RESTART_MAX)
            log.error(
                "worker %d (pid %d) %s%s; starting another in %gs",
                worker.index, worker.pid, ended, f" ({why})" if why else "", delay,
            )  # fmt: skip
            self._restarts.add(worker.index)
            self._at(delay, lambda: self._restart(worker.index))

    def _restart(self, index: int) -> None:
        self._restarts.discard(index)
        if not self.stopping:
            self._spawn(index)

    # --- signals, stopping -----------------------------------------------------------------

    def _on_signals(self) -> None:
        try:
            received = os.read(self._wakeup_r, 64)
        except BlockingIOError:
            return
        for signum in received:
            if signum == signal.SIGUSR1:
                self._ask_for_report()
                continue
            if signum not in STOP_SIGNALS:
                continue
            self._stop_signals += 1
            log.info("%s received", signal.Signals(signum).name)
            if self._stop_signals > 1:  # cut every worker's grace period short
                for worker in self.workers.values():
                    worker.terminated = False
            self._stop()

    def _stop(self) -> None:
        """Stop every worker (each drains its clients) and the ``--run`` command."""
        if not self.stopping:
            self.stopping = True
            for sock in self.sockets:  # no worker will start again: stop listening
                sock.close()
        for worker in self.workers.values():
            if not worker.terminated:
                worker.terminated = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        if self._command is not None and self._command.poll() is None:
            self._command.terminate()
            self._at(daemon.KILL_AFTER, self._kill_command)

    # --- --run -----------------------------------------------------------------------------

    def _start_command(self, command: str, env: dict[str, str]) -> None:
        proc = subprocess.Popen(["/bin/sh", "-c", command], env=env)
        self._command = proc
        self._command_pidfd = os.pidfd_open(proc.pid)
        self._selector.register(self._command_pidfd, selectors.EVENT_READ, self._on_command_exit)

    def _on_command_exit(self) -> None:
        assert self._command is not None
        returncode = self._command.wait()
        self._selector.unregister(self._command_pidfd)
        os.close(self._command_pidfd)
        self._command, self._command_pidfd = None, -1
        if returncode < 0:
            log.warning("--run: the command was killed by signal %d", -returncode)
        self.status = daemon.exit_status(returncode)
        self._stop()

    def _kill_command(self) -> None:
        if self._command is not None and self._command.poll() is None:
            self._command.kill()

    # --- reports ---------------------------------------------------------------------------

    def _ask_for_report(self) -> None:
        if self._report is not None:
            return  # one at a time: this signal is answered by the report under way
        self._reports += 1
        waiting = set()
        for worker in self.workers.values():
            if worker.ready:
                try:
                    worker.control.send(_frame(("report", self._reports)))
                except OSError:
                    continue
                waiting.add(worker)
        deadline = time.monotonic() + REPORT_TIMEOUT
        self._report = (self._reports, waiting, deadline)
        ident = self._reports
        self._at(REPORT_TIMEOUT, lambda: self._report_due(ident))
        if not waiting:
            self._write_report()

    def _answered(self, worker: _Process, ident: int) -> None:
        if self._report is None or self._report[0] != ident:
            return
        waiting = self._report[1]
        waiting.discard(worker)
        if not waiting:
            self._write_report()

    def _report_due(self, ident: int) -> None:
        if self._report is not None and self._report[0] == ident:
            late = ", ".join(str(w.index) for w in self._report[1])
            log.warning("report: worker %s did not answer within %gs", late, REPORT_TIMEOUT)
            self._write_report()

    def _write_report(self) -> None:
        self._report = None
        shares = self.past + [w.share for w in self.workers.values() if w.share is not None]
        self.chain.report_workers([layers for _, layers in shares], final=False)
        log_stats(sum_stats(stats for stats, _ in shares))


def _record_signal(signum: int, frame: object) -> None:
    """The supervisor's handler: the wakeup pipe already carries the signal's number."""
