"""rate: limit bandwidth, for the whole server and per connection.

``rate=BITSPERSEC`` limits all connections together, ``connection-rate=BITSPERSEC``
each connection on its own; give either or both (with neither, nothing is limited).
Rates are bits per second, with k/M/G suffixes for kilobits, megabits, ... (powers of
1024, as in nbdkit): ``rate=10M``. Reads and writes are limited separately: the server
may send 10M to clients and receive 10M from them at the same time. Only the data of
reads and writes counts; zeroing, trimming and block status are small messages on the
wire and pass freely. Protocol overhead is not counted.

Each limit is a token bucket: it fills at the rate, up to ``burstiness`` seconds' worth
(default 2; ``burst-seconds`` is another name for it); a request takes its size in bits
from it, and when the bucket holds fewer, the request waits (a Trio sleep) until the
missing bits have come in; requests arriving meanwhile wait their turn after it. So
after a quiet moment a client may go faster for up to ``burstiness`` seconds' worth of
data, and on average no faster than the rate.
A request waits for the global bucket first, then for its connection's. A request much
larger than a second's worth waits in one long sleep.

``rate-file=PATH`` and ``connection-rate-file=PATH`` change the rates while the server
runs: write a new rate (such as ``5M``) into PATH, preferably atomically (write another
file and rename it over PATH). The file is looked at on every request; a change counts
from the next request. While PATH does not exist the rate given on the command line (or
none) applies; once it was read, deleting the file keeps the last rate read. A file
whose first line is not a rate is ignored, with a warning.

Examples:
  trionbd --filter=rate memory 64M rate=1M
  trionbd --filter=rate memory 64M connection-rate=50K rate=1M
  trionbd --filter=rate file disk.img rate=100M rate-file=/run/disk.rate
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import trio

from ..chain import ConfigError, Filter, Layer, Next, Param, parse_seconds, parse_size

log = logging.getLogger(__name__)


def parse_rate(text: str) -> int:
    value = parse_size(text)
    if value == 0:
        raise ValueError("a rate cannot be 0 (leave it out for no limit)")
    return value


class Bucket:
    """A token bucket of bits: filled at ``rate`` per second up to ``burst`` seconds'
    worth, full at the start (its first use). ``rate`` 0 means no limit."""

    def __init__(self, rate: int, burst: float):
        self.burst = burst
        self.rate = rate
        self.capacity = rate * burst
        self.level = self.capacity
        self.last: float | None = None

    def set_rate(self, rate: int, now: float) -> None:
        """From ``now`` on, fill at ``rate`` (until then, at the old one)."""
        self.take(0, now)
        self.rate = rate
        self.capacity = rate * self.burst
        self.level = min(self.level, self.capacity)

    def take(self, bits: float, now: float) -> float:
        """Take ``bits`` tokens at time ``now``; return how many seconds the caller must
        wait for those the bucket did not hold. The bucket is then in debt by that many:
        callers that come meanwhile wait for theirs after, in turn."""
        if self.rate == 0:
            return 0.0
        elapsed = 0.0 if self.last is None else max(0.0, now - self.last)
        self.last = now
        self.level = min(self.capacity, self.level + elapsed * self.rate) - bits
        return 0.0 if self.level >= 0 else -self.level / self.rate

    async def wait(self, bits: float) -> None:
        """Take ``bits`` tokens, sleeping as long as that takes."""
        await trio.sleep(self.take(bits, trio.current_time()))


@dataclass
class RateFile:
    """A file holding a rate, read again when it changes."""

    path: str
    seen: tuple[int, int, int] | None = None
    """``(inode, size, mtime)`` of the version last read."""
    rate: int | None = None
    """The rate it last held (``None``: never read)."""

    def current(self, default: int) -> int:
        """The rate in force: the file's, or ``default`` if it was never read."""
        try:
            st = os.stat(self.path)
        except OSError:
            return default if self.rate is None else self.rate
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        if version != self.seen:
            self.seen = version
            try:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    line = f.readline().strip()
                self.rate = parse_size(line)
            except (OSError, ValueError) as e:
                log.warning("rate: ignoring %s: %s", self.path, e)
        return default if self.rate is None else self.rate


class Buckets:
    """A pair of buckets, for reads and for writes, and the rate file that sets them."""

    def __init__(self, rate: int, burst: float, file: RateFile | None):
        self.rate = rate
        self.file = file
        self.read = Bucket(rate, burst)
        self.write = Bucket(rate, burst)

    async def wait(self, bucket: Bucket, nbytes: int) -> None:
        """Sleep until ``bucket`` (``read`` or ``write``) gave ``nbytes`` bytes' worth."""
        if self.file is not None:
            rate = self.file.current(self.rate)
            if rate != bucket.rate:
                bucket.set_rate(rate, trio.current_time())
        await bucket.wait(nbytes * 8)


class RateFilter(Filter):
    """Limits the bits per second of reads and writes, globally and per connection."""

    name = "rate"
    nonblocking = False  # requests sleep: the server must give each its own task
    params = (
        Param(
            "rate",
            "limit all connections together to this many bits per second",
            parse_rate,
            metavar="BITSPERSEC",
        ),
        Param(
            "connection-rate",
            "limit each connection to this many bits per second",
            parse_rate,
            metavar="BITSPERSEC",
        ),
        Param(
            "rate-file",
            "change the total rate while serving by writing it into this file",
            metavar="PATH",
        ),
        Param(
            "connection-rate-file",
            "change the per-connection rate while serving by writing it into this file",
            metavar="PATH",
        ),
        Param(
            "burstiness",
            "seconds' worth of data that may pass at once after a pause",
            parse_seconds,
            default="2",
        ),
        Param(
            "burst-seconds",
            "another name for burstiness (give one)",
            parse_seconds,
        ),
    )

    def __init__(
        self,
        rate: int = 0,
        connection_rate: int = 0,
        rate_file: str | None = None,
        connection_rate_file: str | None = None,
        burstiness: float | None = None,
        burst_seconds: float | None = None,
    ):
        if burstiness is not None and burst_seconds is not None:
            raise ConfigError("rate: give burstiness= or burst-seconds=, not both")
        burstiness = burstiness or burst_seconds or 2.0
        self.rate = rate
        self.connection_rate = connection_rate
        self.rate_file = RateFile(os.path.abspath(rate_file)) if rate_file else None
        self.connection_rate_file = (
            RateFile(os.path.abspath(connection_rate_file)) if connection_rate_file else None
        )
        self.burst = burstiness
        self.total = Buckets(rate, burstiness, self.rate_file)
        """The buckets of all connections together."""
        # rate= (or rate-file=) is one bucket for the connections of this process;
        # connection-rate= alone limits each connection wherever it is served.
        self.process_safe = not rate and rate_file is None

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Buckets]:
        next = await below.open(readonly, export_name, is_tls)
        return next, Buckets(self.connection_rate, self.burst, self.connection_rate_file)

    async def pread(self, next: Next, h: Buckets, count: int, offset: int, flags: int) -> bytes:
        total = self.total
        await total.wait(total.read, count)
        await h.wait(h.read, count)
        return await next.pread(count, offset, flags)

    async def pwrite(self, next: Next, h: Buckets, buf: bytes, offset: int, flags: int) -> None:
        total = self.total
        await total.wait(total.write, len(buf))
        await h.wait(h.write, len(buf))
        await next.pwrite(buf, offset, flags)


FILTER = RateFilter
