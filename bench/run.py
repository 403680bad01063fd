"""Side-by-side benchmark of trionbd, nbdkit and qemu-nbd on the same data (bench/README.md).

    .venv/bin/python bench/run.py [--quick] [--reps N] [--only NAME ...]
                                  [--servers NAME ...] [--json OUT] [--data-dir DIR]
                                  [--trionbd-args ARGS] [--baseline-trionbd PATH
                                  [--baseline-args ARGS]]
    .venv/bin/python bench/run.py --markdown RESULTS_JSON > bench/RESULTS.md

Prints a table of medians and ratios; ``--json`` keeps everything (machine, versions,
exact commands, every sample). Exit status 1 if any sample failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import report
from fixtures import Fixtures, preread
from servers import (
    DEFAULT_TRIONBD,
    SERVERS,
    SYSTEM_PYTHON,
    BenchError,
    Target,
    command,
    running,
    source_commit,
    trionbd_has_filter,
    versions,
)
from workloads import FULL, QUICK, Row, Settings, Workload, workloads

ROOT = Path(__file__).resolve().parent.parent
DATA_PARENT = "/tmp"
"""Not tmpfs by default: on tmpfs lseek(SEEK_HOLE) walks every page of the file (25 ms
for 1 GiB), which nbdkit's file plugin does for each new connection and every server
does for block status; a disk file system answers from its extent tree. The data is
read into the page cache before each workload either way."""
CLIENTS = ("fio", "nbdcopy", "nbdinfo", "mke2fs", "nbdkit", "qemu-nbd", "pigz", "xz", "zstd", "zip")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small files, short runs (< 1 min)")
    p.add_argument("--reps", type=int, help="repetitions per server (default 3, quick 1)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these workloads")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--json", type=Path, metavar="OUT", help="write all results here")
    p.add_argument("--markdown", type=Path, metavar="JSON", help="print RESULTS.md from JSON")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(DATA_PARENT),
        help=f"where to build the data (default {DATA_PARENT})",
    )
    p.add_argument(
        "--trionbd",
        default=DEFAULT_TRIONBD,
        help="the trionbd command (default: next to this Python)",
    )
    p.add_argument(
        "--trionbd-args",
        default="",
        metavar="ARGS",
        help="options for every trionbd sample, e.g. '--workers=1'",
    )
    p.add_argument(
        "--baseline-trionbd",
        metavar="PATH",
        help="a second trionbd (another source tree's .venv/bin/trionbd), run in the same "
        "interleaved samples as its own column, trionbd@COMMIT",
    )
    p.add_argument(
        "--baseline-args", default="", metavar="ARGS", help="options for the baseline trionbd"
    )
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    """CPU, cores, RAM, kernel and where the data lives."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line),
        platform.processor(),
    )
    meminfo = Path("/proc/meminfo").read_text().split()
    mem_kib = int(meminfo[meminfo.index("MemTotal:") + 1])
    os_release = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    return {
        "cpu": model,
        "logical cpus": os.cpu_count(),
        "virtual machine": "hypervisor" in cpuinfo.split(),
        "ram": f"{mem_kib / (1 << 20):.1f} GiB",
        "kernel": platform.release(),
        "os": os_release.get("PRETTY_NAME", "?").strip('"'),
    }


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path``."""
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, *_ = line.split()
        inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best[0]):
            best = (mount, kind)
    return best[1]


def check_tools(*trionbds: str) -> None:
    missing = [tool for tool in CLIENTS if shutil.which(tool) is None]
    missing += [trionbd for trionbd in trionbds if not Path(trionbd).exists()]
    if missing:
        sys.exit(f"bench: missing programs: {', '.join(missing)}")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, check=False)
    if probe.returncode != 0:
        sys.exit(f"bench: {SYSTEM_PYTHON} cannot import nbd (install python3-libnbd)")


@dataclass(frozen=True)
class Trionbd:
    """A trionbd under test: its program and the options every sample gives it."""

    program: str
    args: tuple[str, ...] = ()


FILTERS = ("tar", "ext2", "gzip", "xz", "zstd", "zip")
"""trionbd filters some rows need (a row needing one that is missing is skipped)."""


class Runner:
    """Runs the samples of each workload, interleaving the servers, and keeps the results.

    ``trionbds`` maps the name of each trionbd column (``trionbd``, and a baseline's
    ``trionbd@COMMIT``) to what runs; they serve the rows' trionbd targets."""

    def __init__(
        self, settings: Settings, servers: list[str], trionbds: dict[str, Trionbd]
    ) -> None:
        self.settings = settings
        self.trionbds = trionbds
        self.servers = [name for name in trionbds if "trionbd" in servers] + [
            s for s in servers if s != "trionbd"
        ]
        """Every column run, in the order of the samples: trionbd first."""
        self.columns = [*trionbds, *(s for s in SERVERS if s != "trionbd")]
        self.samples: list[dict[str, Any]] = []
        self.filters = {
            name: {f: trionbd_has_filter(t.program, f) for f in FILTERS}
            for name, t in trionbds.items()
        }

    def skip_reason(self, row: Row) -> str | None:
        if row.requires is not None and not self.filters["trionbd"][row.requires]:
            return f"trionbd {row.requires} filter not available"
        return None

    def target(self, server: str, targets: dict[str, Target]) -> Target | None:
        """What ``server`` serves in a row (a baseline trionbd serves trionbd's target)."""
        return targets.get("trionbd" if server in self.trionbds else server)

    def cell_state(self, server: str, row: Row, targets: dict[str, Target]) -> str:
        """ "run", or why the server has no number in this row (n/a or not run)."""
        kind = "trionbd" if server in self.trionbds else server
        if kind == "trionbd" and row.requires and not self.filters[server][row.requires]:
            return report.NA  # a baseline without the filter
        if self.target(server, targets) and server in self.servers:
            return "run"
        return report.NA if kind in row.na else report.NOT_RUN

    def run(self, wl: Workload) -> dict[str, Any]:
        """Run every sample of a workload; return its description for the JSON."""
        rows = []
        active: list[tuple[Row, dict[str, Target], dict[str, str]]] = []
        for row in wl.rows:
            skipped = self.skip_reason(row)
            if skipped is None:
                log(f"{wl.name}: preparing data for {row.label or wl.name}")
                targets = row.targets()
                for path in {target.path for target in targets.values()}:
                    preread(path)
                cells = {s: self.cell_state(s, row, targets) for s in self.columns}
                active.append((row, targets, cells))
            else:
                log(f"{wl.name}: {row.label or wl.name}: skipped: {skipped}")
                cells = dict.fromkeys(self.columns, "")
            rows.append({"label": row.label, "skipped": skipped, "cells": cells})
        for rep in range(1, self.settings.reps + 1):
            for row, targets, cells in active:
                for server in self.servers:
                    target = self.target(server, targets)
                    if target is not None and cells[server] == "run":
                        self.sample(wl, row, server, target, rep)
        return {
            "name": wl.name,
            "title": wl.title,
            "description": wl.description,
            "metrics": [vars(m) for m in wl.metrics],
            "rows": rows,
            "ratio": wl.ratio,
        }

    def sample(self, wl: Workload, row: Row, server: str, target: Target, rep: int) -> None:
        s = self.settings
        record: dict[str, Any] = {
            "seq": len(self.samples) + 1,
            "workload": wl.name,
            "row": row.label,
            "server": server,
            "rep": rep,
            "server_command": None,
            "client_command": None,
            "metrics": {},
            "server_exit": None,
            "error": None,
        }
        self.samples.append(record)
        # Serving thousands of listed names, or a gzip file, start-up reads them all first.
        timeout = s.list_timeout if target.exports or target.slow_start else s.start_timeout

        trionbd = self.trionbds.get(server, self.trionbds["trionbd"])
        kind = "trionbd" if server in self.trionbds else server

        def cmd_for(sock: str) -> list[str]:
            cmd = command(kind, target, sock, trionbd.program, trionbd.args)
            assert cmd is not None, (server, target)
            record["server_command"] = shlex.join(cmd)
            return cmd

        # Write back dirty pages of earlier samples (random writes) before this one starts.
        os.sync()
        try:
            with running(server, cmd_for, timeout) as srv:
                try:
                    measured = wl.measure(srv, target, s)
                except BenchError:
                    srv.check_alive()  # if the server died, that is the error to report
                    raise
                record["client_command"] = shlex.join(measured.client)
                record["metrics"] = measured.metrics
            record["server_exit"] = srv.exit_status
            if srv.exit_status != 0:
                log(f"  warning: {server} exited with status {srv.exit_status} after SIGTERM")
        except BenchError as e:
            record["error"] = str(e)
        except Exception as e:  # a surprise in one sample must not lose the whole run
            record["error"] = f"{type(e).__name__}: {e}"
        where = f"[{record['seq']}] {wl.name} {row.label} {server} rep {rep}".replace("  ", " ")
        if record["error"]:
            log(f"{where}: ERROR: {record['error']}")
        else:
            log(f"{where}: " + ", ".join(f"{k}={v:.6g}" for k, v in record["metrics"].items()))


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"bench: stopped by {signal.Signals(signum).name}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.markdown:
        sys.stdout.write(report.markdown(json.loads(args.markdown.read_text())))
        return 0
    check_tools(*filter(None, (args.trionbd, args.baseline_trionbd)))
    # SIGTERM unwinds like ^C, so servers are stopped and the data is removed.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    try:
        return run(args, argv)
    except BenchError as e:
        log(f"bench: {e}")
        return 1


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the selected workloads; print the table; write the JSON if asked."""
    settings = QUICK if args.quick else FULL
    if args.reps is not None:
        if args.reps < 1:
            sys.exit("bench: --reps must be at least 1")
        settings = dataclasses.replace(settings, reps=args.reps)
    trionbds = {"trionbd": Trionbd(args.trionbd, tuple(shlex.split(args.trionbd_args)))}
    if args.baseline_trionbd:
        baseline = Trionbd(args.baseline_trionbd, tuple(shlex.split(args.baseline_args)))
        name = f"trionbd@{source_commit(baseline.program)}"
        if baseline.args:
            name += " " + " ".join(baseline.args)
        trionbds[name] = baseline
    parent = args.data_dir
    started = time.monotonic()
    results: dict[str, Any] = {
        "schema": 1,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", "bench/run.py", *argv]),
        "machine": machine(),
        "versions": versions(args.trionbd, ROOT),
        "trionbds": {name: [t.program, *t.args] for name, t in trionbds.items()},
        "settings": {
            "quick": args.quick,
            **vars(settings),
            "servers": args.servers,
            "server_lifetime": "Each sample starts a fresh server (same for every "
            "server) on a Unix socket in a private directory under /tmp and stops it after.",
            "data_dir": str(parent),
            "data_fs": fs_type(parent),
        },
        "load_average_start": os.getloadavg(),
        "workloads": [],
        "samples": [],
    }
    data_dir = Path(tempfile.mkdtemp(prefix="trionbd-bench-", dir=parent))
    results["settings"]["data_path"] = str(data_dir)
    try:
        fx = Fixtures(
            data_dir,
            settings.file_size,
            settings.member_size,
            settings.tar_members,
            settings.ext4_files,
            args.trionbd,
        )
        every = workloads(fx, settings)
        names = [wl.name for wl in every]
        unknown = sorted(set(args.only or []) - set(names))
        if unknown:
            log(f"bench: unknown workload(s) {', '.join(unknown)}; known: {', '.join(names)}")
            return 2
        runner = Runner(settings, args.servers, trionbds)
        results["columns"] = runner.columns
        results["samples"] = runner.samples
        for wl in every:
            if args.only is None or wl.name in args.only:
                results["workloads"].append(runner.run(wl))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    results["duration_s"] = time.monotonic() - started
    results["load_average_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        log(f"results written to {args.json}")
    print("\n".join(report.table(results)))
    errs = report.errors(results)
    if errs:
        print("\nErrors:\n" + "\n".join(errs))
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
