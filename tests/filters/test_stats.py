"""The stats filter: exact counts and bytes per export and command, reports on SIGUSR1
and at exit, appending, errors, and latency histograms (in-process, virtual time)."""

from __future__ import annotations

import datetime
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.support import SYSTEM_PYTHON, run, trionbd_process
from trionbd.chain import Chain
from trionbd.filters.delay import DelayFilter
from trionbd.filters.stats import StatsFilter, bucket_label, human_size, latency_bucket, render
from trionbd.nursery import open_lifetime
from trionbd.plugins.memory import MemoryPlugin

COMMAND = re.compile(r"^(\w+): (\d+) ops, (\d+\.\d{6}) s, ([^,]+), ([^,]+)/s op, ([^,]+)/s total$")
TOTAL = re.compile(r"^total: (\d+) ops, (\d+\.\d{6}) s, ([^,]+), ([^,]+)/s$")
HEADER = re.compile(
    r"^trionbd stats, (final|interim) report at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$"
)


@dataclass
class Section:
    """The command lines of the totals or of one export: command -> (ops, size)."""

    commands: dict[str, tuple[int, str]] = field(default_factory=dict)
    latency: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: str | None = None
    title: str = ""


@dataclass
class Report:
    kind: str
    total: tuple[int, str]
    totals: Section
    exports: dict[str, Section]


def parse(text: str) -> list[Report]:
    """Every report in a stats file, checking each line against the documented format."""
    assert text.endswith("\n\n"), text
    reports: list[Report] = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = HEADER.match(line)
        if m:
            t = TOTAL.match(lines[i + 1])
            assert t, lines[i + 1]
            reports.append(Report(m.group(1), (int(t.group(1)), t.group(3)), Section(), {}))
            section = reports[-1].totals
            continue
        if not line or TOTAL.match(line):
            continue
        report = reports[-1]
        if line.startswith("export "):
            name, _, summary = line[len("export ") :].rpartition(": ")
            section = report.exports[name] = Section(title=summary)
            continue
        body = line.strip()
        if body.startswith("errors: "):
            section.errors = body[len("errors: ") :]
        elif body.startswith("latency "):
            label, _, count = body[len("latency ") :].rpartition(": ")
            cmd = list(section.commands)[-1]
            section.latency.setdefault(cmd, {})[label] = int(count.split()[0])
        else:
            c = COMMAND.match(body)
            assert c, line
            section.commands[c.group(1)] = (int(c.group(2)), c.group(4))
    return reports


def wait_for(path: Path, text: str, count: int = 1) -> str:
    """The file's content once ``text`` occurs ``count`` times in complete reports."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        content = path.read_text()
        if content.count(text) >= count and content.endswith("\n\n"):
            return content
        time.sleep(0.05)
    raise AssertionError(f"{path} never got {count} x {text!r}:\n{path.read_text()}")


def client(uri: str, body: str) -> None:
    script = "import nbd, sys\nh = nbd.NBD()\nh.add_meta_context('base:allocation')\n"
    script += "h.connect_uri(sys.argv[1])\n" + body + "\nh.shutdown()\n"
    run([SYSTEM_PYTHON, "-c", script, uri])


EVERY_COMMAND = """
for i in range(3):
    h.pread(4096, 4096 * i)
for i in range(2):
    h.pwrite(b"w" * 8192, 8192 * i)
h.trim(4096, 65536)
h.zero(65536, 131072)
h.flush()
h.flush()
h.block_status(65536, 0, lambda *args: 0)
h.cache(4096, 0)
"""


def test_counts_and_bytes_per_command_on_sigusr1_and_at_exit(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    stats = tmp_path / "stats.txt"
    with trionbd_process("--filter=stats", "file", str(disk), f"statsfile={stats}") as s:
        client(s.uri, EVERY_COMMAND)
        s.proc.send_signal(signal.SIGUSR1)
        (interim,) = parse(wait_for(stats, "interim report"))
        client(s.uri, "h.pread(4096, 0)")
        assert run(["nbdinfo", "--size", s.uri]).strip() == str(1 << 20)  # still serving
    (final,) = parse(stats.read_text())  # rewritten: only the final report is left

    assert interim.kind == "interim"
    expected = {
        "read": (3, "12.00 KiB"),
        "write": (2, "16.00 KiB"),
        "trim": (1, "4.00 KiB"),
        "zero": (1, "64.00 KiB"),
        "extents": (1, "64.00 KiB"),
        "cache": (1, "4.00 KiB"),
        "flush": (2, "0 bytes"),
    }
    assert interim.totals.commands == expected
    assert list(interim.totals.commands) == list(expected)  # documented order
    assert interim.total == (11, "96.00 KiB")  # bytes of read, write, trim and zero
    assert interim.totals.errors is None
    assert list(interim.exports) == ['""']
    assert interim.exports['""'].commands == expected
    assert interim.exports['""'].title == "11 ops, 96.00 KiB"
    for cmd, (ops, _) in expected.items():
        assert sum(interim.exports['""'].latency[cmd].values()) == ops

    assert final.kind == "final"
    assert final.totals.commands == {**expected, "read": (4, "16.00 KiB")}
    assert final.total == (12, "100.00 KiB")


def test_each_export_has_its_own_section(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "a.img").write_bytes(bytes(65536))
    (exports / "b c.img").write_bytes(bytes(65536))
    stats = tmp_path / "stats.txt"
    with trionbd_process("--filter=stats", "file", f"dir={exports}", f"statsfile={stats}") as s:
        client(s.uri_for("a.img"), "h.pread(4096, 0)\nh.pread(4096, 4096)")
        client(s.uri_for("b c.img"), "h.pwrite(b'x' * 512, 0)")
    (report,) = parse(stats.read_text())
    assert report.total == (3, "8.50 KiB")
    assert report.totals.commands == {"read": (2, "8.00 KiB"), "write": (1, "512 bytes")}
    assert list(report.exports) == ['"a.img"', '"b c.img"']
    a, b = report.exports['"a.img"'], report.exports['"b c.img"']
    assert (a.title, a.commands) == ("2 ops, 8.00 KiB", {"read": (2, "8.00 KiB")})
    assert (b.title, b.commands) == ("1 ops, 512 bytes", {"write": (1, "512 bytes")})


def test_statsappend_keeps_every_report(tmp_path: Path) -> None:
    stats = tmp_path / "stats.txt"
    stats.write_text("")
    args = ("--filter=stats", "memory", "1M", f"statsfile={stats}", "statsappend=true")
    with trionbd_process(*args) as s:
        client(s.uri, "h.pread(512, 0)")
        s.proc.send_signal(signal.SIGUSR1)
        wait_for(stats, "interim report")
        client(s.uri, "h.pread(512, 0)")
        s.proc.send_signal(signal.SIGUSR1)
        wait_for(stats, "interim report", 2)
    reports = parse(stats.read_text())
    assert [r.kind for r in reports] == ["interim", "interim", "final"]
    assert [r.totals.commands["read"] for r in reports] == [
        (1, "512 bytes"),
        (2, "1.00 KiB"),
        (2, "1.00 KiB"),
    ]


def test_failed_requests_are_counted_apart(tmp_path: Path) -> None:
    stats = tmp_path / "stats.txt"
    inject = tmp_path / "inject"
    inject.touch()
    args = ["--filter=stats", "--filter=error", "memory", "1M", f"statsfile={stats}"]
    args += ["error-pread-rate=1", f"error-pread-file={inject}"]
    body = f"""
import os
try:
    h.pread(512, 0)
    raise SystemExit("no error")
except nbd.Error:
    pass
os.unlink({str(inject)!r})
h.pread(512, 0)
h.pread(512, 512)
"""
    with trionbd_process(*args) as s:
        client(s.uri, body)
    (report,) = parse(stats.read_text())
    assert report.totals.commands == {"read": (2, "1.00 KiB")}
    assert report.totals.errors == "1 (read 1)"
    assert report.exports['""'].errors == "1 (read 1)"


def test_no_clients_gives_an_empty_report(tmp_path: Path) -> None:
    stats = tmp_path / "stats.txt"
    with trionbd_process("--filter=stats", "memory", "1M", f"statsfile={stats}"):
        pass
    (report,) = parse(stats.read_text())
    assert report.total == (0, "0 bytes")
    assert report.totals.commands == {} and report.exports == {}


def test_an_unwritable_statsfile_stops_startup(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "stats.txt"
    cmd = [sys.executable, "-m", "trionbd", "-f", "-U", str(tmp_path / "sock")]
    cmd += ["--filter=stats", "memory", "1M", f"statsfile={path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"stats: cannot open statsfile {path}: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


async def test_times_and_latency_histogram_exactly(tmp_path: Path, autojump_clock: object) -> None:
    """Under virtual time a delay below the filter makes every duration exact."""
    stats = tmp_path / "stats.txt"
    stats_filter = StatsFilter(statsfile=str(stats))
    chain = Chain(
        MemoryPlugin(size=1 << 20),
        [stats_filter, DelayFilter(rdelay=0.003, wdelay=0.1, delay_flush=0.0000004)],
    )
    async with open_lifetime(chain):
        ctx = await chain.top.open(False, "", False)
        try:
            await trio.sleep(1)
            await ctx.pread(4096, 0)
            await ctx.pwrite(b"x" * 2048, 0)
            async with trio.open_nursery() as nursery:  # concurrent: their times overlap
                nursery.start_soon(ctx.pread, 4096, 4096)
                nursery.start_soon(ctx.pread, 4096, 8192)
            await ctx.flush()
        finally:
            await ctx.close()
    body = stats.read_text().split("\n", 1)[1]
    assert body == (
        "total: 5 ops, 1.106000 s, 14.00 KiB, 12.66 KiB/s\n"
        "read: 3 ops, 0.009000 s, 12.00 KiB, 1.30 MiB/s op, 10.85 KiB/s total\n"
        "write: 1 ops, 0.100000 s, 2.00 KiB, 20.00 KiB/s op, 1.81 KiB/s total\n"
        "flush: 1 ops, 0.000000 s, 0 bytes, 0 bytes/s op, 0 bytes/s total\n"
        "\n"
        'export "": 5 ops, 14.00 KiB\n'
        "  read: 3 ops, 0.009000 s, 12.00 KiB, 1.30 MiB/s op, 10.85 KiB/s total\n"
        "    latency 2048-4095 us: 3 (100.0%)\n"
        "  write: 1 ops, 0.100000 s, 2.00 KiB, 20.00 KiB/s op, 1.81 KiB/s total\n"
        "    latency 65536-131071 us: 1 (100.0%)\n"
        "  flush: 1 ops, 0.000000 s, 0 bytes, 0 bytes/s op, 0 bytes/s total\n"
        "    latency <1 us: 1 (100.0%)\n"
        "\n"
    )


def test_render_of_no_time_says_not_available() -> None:
    text = render({}, 0.0, datetime.datetime(2026, 1, 2, 3, 4, 5), final=False)
    assert text == (
        "trionbd stats, interim report at 2026-01-02 03:04:05 UTC\n"
        "total: 0 ops, 0.000000 s, 0 bytes, (n/a)/s\n\n"
    )


def test_sizes_and_buckets() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 1536, 1 << 20, 5 << 30)] == [
        "0 bytes",
        "1023 bytes",
        "1.00 KiB",
        "1.50 KiB",
        "1.00 MiB",
        "5.00 GiB",
    ]
    assert [latency_bucket(s) for s in (0, 0.0000009, 0.000001, 0.000003, 0.000004, 1.0)] == [
        0,
        0,
        1,
        2,
        3,
        20,
    ]
    assert [bucket_label(k) for k in (0, 1, 2, 3, 20)] == [
        "<1 us",
        "1-1 us",
        "2-3 us",
        "4-7 us",
        "524288-1048575 us",
    ]
