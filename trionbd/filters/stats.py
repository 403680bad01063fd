"""stats: count requests, bytes and time per export and command; write a report.

Measures every request that passes through: how many of each command succeeded, how
many bytes they covered, how long they took (a total and a latency histogram), and
how many failed. The report goes to ``statsfile`` when the server exits and whenever
the operator asks for one (``kill -USR1 PID``); without ``statsappend`` each report
replaces the previous one, with it reports accumulate. Counters run from start-up
and are never reset.

Report format (the command lines are nbdkit's stats filter format)::

    trionbd stats, final report at 2026-01-01 10:00:00 UTC
    total: 4 ops, 12.500000 s, 1.00 MiB, 81.92 KiB/s
    read: 2 ops, 0.000120 s, 768.00 KiB, 6.10 GiB/s op, 61.44 KiB/s total
    write: 1 ops, 0.000050 s, 256.00 KiB, 4.88 GiB/s op, 20.48 KiB/s total
    flush: 1 ops, 0.000010 s, 0 bytes, 0 bytes/s op, 0 bytes/s total
    errors: 1 (zero 1)

    export "": 4 ops, 1.00 MiB
      read: 2 ops, 0.000120 s, 768.00 KiB, 6.10 GiB/s op, 61.44 KiB/s total
        latency 32-63 us: 1 (50.0%)
        latency 64-127 us: 1 (50.0%)
      write: 1 ops, 0.000050 s, 256.00 KiB, 4.88 GiB/s op, 20.48 KiB/s total
        latency 32-63 us: 1 (100.0%)
      flush: 1 ops, 0.000010 s, 0 bytes, 0 bytes/s op, 0 bytes/s total
        latency 8-15 us: 1 (100.0%)
      errors: 1 (zero 1)

The first line says when the report was written and whether it is the ``final``
one (at exit) or an ``interim`` one (on request). ``total`` gives the operations of
all commands, the seconds since start-up, the bytes of read, write, trim and zero,
and those bytes per second since start-up. Each command line gives its successful
operations, the seconds spent in them (summed; concurrent requests overlap), the
bytes they covered (for extents and cache: the range asked about), that size per
second of operation time (``op``) and per second since start-up (``total``), or
``(n/a)`` for a zero time. Commands are read, write, trim, zero, extents, cache and
flush, in that order; a command with no successful operation is left out. ``errors``
(only when some request failed) counts failed requests by command; failures are not
in the other numbers. Sizes are in bytes, KiB, MiB or GiB (powers of 1024, two
decimals). Then comes one section per export that clients opened, its name in double
quotes (JSON escaping), with the same lines for that export and, below each command,
its latency histogram: one line per non-empty power-of-two bucket of whole
microseconds (``<1 us``, ``1-1 us``, ``2-3 us``, ``4-7 us``, ...), with the count
and its share of the command's operations. A blank line ends each report.

nbdkit's ``statsthreshold=`` (request size and alignment histograms) is not supported.

Example:
  trionbd --filter=stats memory 1G statsfile=/tmp/stats.txt
  kill -USR1 $(cat trionbd.pid)    # write an interim report
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ..chain import Extent, Filter, Layer, Next, Param, StartupError, parse_bool

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Sequence

    from ..nursery import Lifetime

log = logging.getLogger(__name__)

COMMANDS = ("read", "write", "trim", "zero", "extents", "cache", "flush")
"""Commands in report order."""
DATA_COMMANDS = frozenset({"read", "write", "trim", "zero"})
"""Commands whose bytes count in the ``total`` line."""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def human_size(n: float) -> str:
    """``n`` bytes the way nbdkit's stats filter writes sizes."""
    if n < KiB:
        return f"{int(n)} bytes"
    if n < MiB:
        return f"{n / KiB:.2f} KiB"
    if n < GiB:
        return f"{n / MiB:.2f} MiB"
    return f"{n / GiB:.2f} GiB"


def human_rate(nbytes: int, seconds: float) -> str:
    return human_size(int(nbytes / seconds)) if seconds > 0 else "(n/a)"


def latency_bucket(seconds: float) -> int:
    """0 for under 1 us; k for [2^(k-1), 2^k) whole microseconds."""
    return int(seconds * 1_000_000).bit_length()


def bucket_label(k: int) -> str:
    return "<1 us" if k == 0 else f"{1 << (k - 1)}-{(1 << k) - 1} us"


@dataclass
class CommandStats:
    """What one command did on one export."""

    ops: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: int = 0
    latency: Counter[int] = field(default_factory=Counter)

    def __iadd__(self, other: CommandStats) -> CommandStats:
        self.ops += other.ops
        self.bytes += other.bytes
        self.seconds += other.seconds
        self.errors += other.errors
        self.latency += other.latency
        return self


ExportStats = dict[str, CommandStats]


def _new_export() -> ExportStats:
    return {cmd: CommandStats() for cmd in COMMANDS}


def _command_line(cmd: str, st: CommandStats, elapsed: float) -> str:
    return (
        f"{cmd}: {st.ops} ops, {st.seconds:.6f} s, {human_size(st.bytes)}, "
        f"{human_rate(st.bytes, st.seconds)}/s op, {human_rate(st.bytes, elapsed)}/s total"
    )


def _errors_line(stats: ExportStats) -> str | None:
    failed = [(cmd, stats[cmd].errors) for cmd in COMMANDS if stats[cmd].errors]
    if not failed:
        return None
    total = sum(n for _, n in failed)
    return f"errors: {total} ({', '.join(f'{cmd} {n}' for cmd, n in failed)})"


def render(
    exports: dict[str, ExportStats], elapsed: float, when: datetime.datetime, final: bool
) -> str:
    """The text of one report (see the module documentation)."""
    totals = _new_export()
    for stats in exports.values():
        for cmd in COMMANDS:
            totals[cmd] += stats[cmd]
    ops = sum(st.ops for st in totals.values())
    nbytes = sum(totals[cmd].bytes for cmd in DATA_COMMANDS)
    kind = "final" if final else "interim"
    lines = [
        f"trionbd stats, {kind} report at {when:%Y-%m-%d %H:%M:%S} UTC",
        f"total: {ops} ops, {elapsed:.6f} s, {human_size(nbytes)}, {human_rate(nbytes, elapsed)}/s",
    ]
    lines += [_command_line(c, totals[c], elapsed) for c in COMMANDS if totals[c].ops]
    if (errors := _errors_line(totals)) is not None:
        lines.append(errors)
    for name in sorted(exports):
        stats = exports[name]
        ops = sum(st.ops for st in stats.values())
        nbytes = sum(stats[cmd].bytes for cmd in DATA_COMMANDS)
        lines += ["", f"export {json.dumps(name)}: {ops} ops, {human_size(nbytes)}"]
        for cmd in COMMANDS:
            st = stats[cmd]
            if not st.ops:
                continue
            lines.append("  " + _command_line(cmd, st, elapsed))
            for k in sorted(st.latency):
                n = st.latency[k]
                lines.append(f"    latency {bucket_label(k)}: {n} ({100 * n / st.ops:.1f}%)")
        if (errors := _errors_line(stats)) is not None:
            lines.append("  " + errors)
    return "\n".join(lines) + "\n\n"


class StatsFilter(Filter):
    """Counts requests, bytes and time per export and command."""

    name = "stats"
    process_safe = True  # each worker counts; the supervisor sums them (report_workers)
    params = (
        Param("statsfile", "where to write the report", required=True, metavar="PATH"),
        Param(
            "statsappend",
            "append each report instead of replacing the file",
            parse_bool,
            default="false",
        ),
    )

    def __init__(self, statsfile: str, statsappend: bool = False):
        self.path = os.path.abspath(statsfile)
        self.append = statsappend
        self.exports: dict[str, ExportStats] = {}
        """Export name -> command -> counters, for every export a client opened."""
        self.start: float | None = None
        """``trio.current_time()`` at start-up."""
        self.ready_at = time.monotonic()
        """When ``get_ready`` ran: the start for reports of several worker processes."""
        self.in_worker = False
        """One of several worker processes serves with this copy: the supervisor writes
        the reports, from every worker's counters (:meth:`report_workers`)."""
        self._writing = trio.Lock()
        """One report at a time (an interim one may still be writing at exit)."""

    # --- lifecycle -----------------------------------------------------------------------

    def get_ready(self) -> None:
        # Fail at start-up, not at exit, if the file cannot be written (and truncate it
        # now unless appending, as nbdkit does): once, before any worker process forks.
        try:
            self._write("")
        except OSError as e:
            raise StartupError(f"stats: cannot open statsfile {self.path}: {e.strerror}") from e
        self.ready_at = time.monotonic()

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        self.start = trio.current_time()
        self.in_worker = lifetime.worker is not None

    async def cleanup(self) -> None:
        if not self.in_worker:
            await self.write_report(final=True)

    async def report(self) -> None:
        if not self.in_worker:
            await self.write_report(final=False)

    def worker_share(self) -> object:
        return self.exports

    def report_workers(self, shares: Sequence[object], final: bool) -> None:
        """The report of every worker process's counters, summed (in the supervisor)."""
        exports: dict[str, ExportStats] = {}
        for share in shares:
            assert isinstance(share, dict)
            for name, stats in share.items():
                mine = exports.setdefault(name, _new_export())
                for cmd in COMMANDS:
                    mine[cmd] += stats[cmd]
        elapsed = time.monotonic() - self.ready_at
        text = render(exports, elapsed, datetime.datetime.now(datetime.UTC), final)
        try:
            self._write(text)
        except OSError as e:
            log.error("stats: cannot write statsfile %s: %s", self.path, e.strerror)

    async def write_report(self, final: bool) -> None:
        """Write (or append) a report of the counters as they are now."""
        if self.start is None:
            return  # start-up failed before this filter was ready: nothing was measured
        elapsed = trio.current_time() - self.start
        text = render(self.exports, elapsed, datetime.datetime.now(datetime.UTC), final)
        try:
            async with self._writing:
                await trio.to_thread.run_sync(self._write, text)
        except OSError as e:
            log.error("stats: cannot write statsfile %s: %s", self.path, e.strerror)

    def _write(self, text: str) -> None:
        with open(self.path, "a" if self.append else "w", encoding="utf-8") as f:
            f.write(text)

    # --- connections and requests ----------------------------------------------------------

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        next = await below.open(readonly, export_name, is_tls)
        stats = self.exports.get(export_name)
        if stats is None:  # not setdefault: its default would be built on every open
            stats = self.exports[export_name] = _new_export()
        return next, stats

    async def _timed(
        self,
        st: CommandStats,
        nbytes: int,
        call: Callable[..., Awaitable[Any]],
        *args: Any,
    ) -> Any:
        start = trio.current_time()
        try:
            result = await call(*args)
        except Exception:
            st.errors += 1
            raise
        seconds = trio.current_time() - start
        st.ops += 1
        st.bytes += nbytes
        st.seconds += seconds
        st.latency[latency_bucket(seconds)] += 1
        return result

    async def pread(self, next: Next, h: ExportStats, count: int, offset: int, flags: int) -> bytes:
        data: bytes = await self._timed(h["read"], count, next.pread, count, offset, flags)
        return data

    async def pwrite(self, next: Next, h: ExportStats, buf: bytes, offset: int, flags: int) -> None:
        await self._timed(h["write"], len(buf), next.pwrite, buf, offset, flags)

    async def flush(self, next: Next, h: ExportStats, flags: int) -> None:
        await self._timed(h["flush"], 0, next.flush, flags)

    async def trim(self, next: Next, h: ExportStats, count: int, offset: int, flags: int) -> None:
        await self._timed(h["trim"], count, next.trim, count, offset, flags)

    async def zero(self, next: Next, h: ExportStats, count: int, offset: int, flags: int) -> None:
        await self._timed(h["zero"], count, next.zero, count, offset, flags)

    async def extents(
        self, next: Next, h: ExportStats, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        extents: list[Extent] = await self._timed(
            h["extents"], count, next.extents, count, offset, flags
        )
        return extents

    async def cache(self, next: Next, h: ExportStats, count: int, offset: int, flags: int) -> None:
        await self._timed(h["cache"], count, next.cache, count, offset, flags)


FILTER = StatsFilter
