"""The benchmark harness (bench/): command lines, the report, and real short runs.

No timing is asserted here: only that the harness runs the servers it says it runs,
records what it measured, fails clearly, and leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import PYTHON, ROOT, qemu10

sys.path.insert(0, str(ROOT / "bench"))

import report
from servers import SAMPLE_DIR_PARENT, SAMPLE_DIR_PREFIX, Target, command

RUN = str(ROOT / "bench" / "run.py")


def test_commands_of_the_three_servers() -> None:
    plain = Target("file", Path("/d/f.img"))
    assert command("trionbd", plain, "/s", "tnbd") == ["tnbd", "-f", "-U", "/s", "file", "/d/f.img"]
    assert command("nbdkit", plain, "/s", "tnbd") == [
        "nbdkit",
        "-f",
        "-U",
        "/s",
        "file",
        "/d/f.img",
    ]
    assert command("qemu-nbd", plain, "/s", "tnbd") == [
        "qemu-nbd", "-k", "/s", "-f", "raw", "-t", "--cache=writeback", "--aio=threads",
        "--shared=1024", "/d/f.img",
    ]  # fmt: skip


def test_filter_commands_and_what_cannot_be_served() -> None:
    tar = Target("tar", Path("/a.tar"), "x/y")
    ext2 = Target("ext2", Path("/i.ext4"), "/x/y")
    assert command("trionbd", tar, "/s", "t") == [
        "t", "-f", "-U", "/s", "file", "/a.tar", "--filter=tar", "tar-entry=x/y",
    ]  # fmt: skip
    assert command("nbdkit", ext2, "/s", "t") == [
        "nbdkit", "-f", "-U", "/s", "--filter=ext2", "file", "/i.ext4", "ext2file=/x/y",
    ]  # fmt: skip
    assert command("trionbd", Target("ext2", Path("/i.ext4")), "/s", "t") == [
        "t", "-f", "-U", "/s", "file", "/i.ext4", "--filter=ext2",
    ]  # fmt: skip
    many = Target("dir", Path("/d"))
    assert command("trionbd", many, "/s", "t") == [
        "t", "-f", "-U", "/s", "file", "dir=/d",
    ]  # fmt: skip
    assert command("nbdkit", many, "/s", "t") == [
        "nbdkit", "-f", "-U", "/s", "file", "dir=/d",
    ]  # fmt: skip
    assert command("qemu-nbd", many, "/s", "t") is None
    assert command("qemu-nbd", tar, "/s", "t") is None
    assert command("nbdkit", Target("tar", Path("/a.tar")), "/s", "t") is None


def test_commands_of_the_compressed_rows() -> None:
    gz = Target("gzip", Path("/i.gz"))
    assert command("trionbd", gz, "/s", "t") == [
        "t",
        "-f",
        "-U",
        "/s",
        "file",
        "/i.gz",
        "--filter=gzip",
    ]
    assert command("nbdkit", gz, "/s", "t") == [
        "nbdkit", "-f", "-U", "/s", "--filter=gzip", "file", "/i.gz",
    ]  # fmt: skip
    indexed = Target("gzip", Path("/i.gz"), params=("index=/x",))
    assert command("trionbd", indexed, "/s", "t")[-1] == "index=/x"
    assert command("nbdkit", indexed, "/s", "t") is None  # nbdkit keeps no index
    assert command("nbdkit", Target("zstd", Path("/i.zst")), "/s", "t") is None
    targz = Target("targz", Path("/a.tar.gz"), "d/m.img")
    assert command("nbdkit", targz, "/s", "t") == [
        "nbdkit", "-f", "-U", "/s", "--filter=tar", "--filter=gzip", "file", "/a.tar.gz",
        "tar-entry=d/m.img",
    ]  # fmt: skip
    assert command("trionbd", Target("zip", Path("/a.zip"), "m"), "/s", "t") == [
        "t", "-f", "-U", "/s", "file", "/a.zip", "--filter=zip", "zip-entry=m",
    ]  # fmt: skip
    assert command("nbdkit", Target("zip", Path("/a.zip"), "m"), "/s", "t") is None


def _sample(row: str, server: str, rep: int, value: float | None) -> dict[str, Any]:
    return {
        "seq": 0,
        "workload": "w",
        "row": row,
        "server": server,
        "rep": rep,
        "server_command": "x",
        "client_command": "y",
        "metrics": {} if value is None else {"iops": value},
        "server_exit": 0,
        "error": "boom" if value is None else None,
    }


def _results(samples: list[dict[str, Any]]) -> dict[str, Any]:
    run = dict.fromkeys(report.SERVERS, "run")
    return {
        "workloads": [
            {
                "name": "w",
                "title": "T",
                "metrics": [{"key": "iops", "label": "IOPS", "unit": "IOPS",
                             "higher_is_better": True}],
                "rows": [
                    {"label": "member", "skipped": None,
                     "cells": {**run, "qemu-nbd": "n/a"}},
                    {"label": "plain", "skipped": None, "cells": {**run, "qemu-nbd": "—"}},
                    {"label": "other", "skipped": "trionbd ext2 filter not available",
                     "cells": dict.fromkeys(report.SERVERS, "")},
                ],
                "ratio": ["member", "plain"],
            }
        ],
        "samples": samples,
    }  # fmt: skip


def test_table_shows_medians_ratios_and_what_did_not_run() -> None:
    samples = [
        _sample("member", "trionbd", 1, 100.0),
        _sample("member", "trionbd", 2, 300.0),
        _sample("member", "trionbd", 3, 200.0),
        _sample("member", "nbdkit", 1, 400.0),
        _sample("member", "nbdkit", 2, None),
        _sample("plain", "trionbd", 1, 250.0),
        _sample("plain", "nbdkit", 1, 800.0),
    ]
    lines = report.table(_results(samples))
    assert lines[2] == "| T — member | IOPS ↑ | 200 | 400 (1 failed) | n/a | 0.50 |  |"
    assert lines[3] == "| T — plain | IOPS ↑ | 250 | 800 | — | 0.31 |  |"
    assert lines[4] == "| T — other | | skipped: trionbd ext2 filter not available | | | | |"
    assert lines[5] == "| T — member ÷ plain (same server) | IOPS ratio | 0.80 | 0.50 |  | | |"
    assert report.errors(_results(samples)) == ["- w / member / nbdkit / rep 2: boom"]


def test_all_samples_failed_shows_error_and_no_ratio() -> None:
    lines = report.table(_results([_sample("plain", "trionbd", 1, None)]))
    assert lines[3] == "| T — plain | IOPS ↑ | error | — | — |  |  |"


def _leftovers(samples: list[dict[str, Any]]) -> list[str]:
    """Sample directories of these samples, and processes using them, that still exist."""
    pattern = re.escape(f"{SAMPLE_DIR_PARENT}/{SAMPLE_DIR_PREFIX}") + r"[^/ ']+"
    dirs = {m for s in samples for m in re.findall(pattern, s["server_command"] or "")}
    assert len(dirs) == len(samples)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    procs = [line for line in ps.splitlines() if any(d in line for d in dirs)]
    return [d for d in dirs if Path(d).exists()] + procs


@pytest.mark.slow
def test_quick_run_of_three_servers_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = subprocess.run(
        [PYTHON, RUN, "--quick", "--only", "connections", "memory", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    samples = data["samples"]
    assert [(s["workload"], s["server"]) for s in samples] == [
        (w, s) for w in ("connections", "memory") for s in report.SERVERS
    ]
    for s in samples:
        assert s["error"] is None and s["server_exit"] == 0, s
        assert f"-U {SAMPLE_DIR_PARENT}/{SAMPLE_DIR_PREFIX}" in s["server_command"] or (
            s["server_command"].startswith(f"qemu-nbd -k {SAMPLE_DIR_PARENT}/")
        )
        assert s["metrics"]
    memory = [s["metrics"] for s in samples if s["workload"] == "memory"]
    assert all(m["rss_clients_mib"] > 0 and m["rss_idle_mib"] > 0 for m in memory)
    assert all(s["metrics"]["connections"] > 0 for s in samples if s["workload"] == "connections")
    assert data["versions"]["nbdkit"].startswith("nbdkit ")
    assert "| connections per second" in result.stdout
    md = subprocess.run(
        [PYTHON, RUN, "--markdown", str(out)], capture_output=True, text=True, check=True
    ).stdout
    assert "## Machine" in md and "| memory: server RSS" in md
    assert not _leftovers(samples)


def test_qemu10_convert_row_runs_with_extended_headers_where_served(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = subprocess.run(
        [PYTHON, RUN, "--quick", "--only", "qemu10-convert", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = {s["server"]: s for s in json.loads(out.read_text())["samples"]}
    assert sorted(samples) == sorted(report.SERVERS)
    for name, sample in samples.items():
        assert sample["error"] is None and sample["metrics"]["mib_s"] > 0, sample
        assert sample["client_command"].startswith(qemu10("qemu-img") + " ")
        # trionbd and qemu-nbd 10 speak extended headers; nbdkit 1.32 refuses them.
        assert sample["metrics"]["extended_headers"] == (name != "nbdkit")
    assert samples["qemu-nbd"]["server_command"].startswith(qemu10("qemu-nbd") + " -k ")
    assert not _leftovers(list(samples.values()))


@pytest.mark.slow
def test_a_server_that_fails_or_hangs_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    hang = tmp_path / "hang"
    hang.write_text(
        '#!/bin/sh\ncase "$*" in *--help*) exit 1;; *--version*) echo hang; exit 0;; esac\n'
        "exec sleep 1000\n"
    )
    hang.chmod(0o755)
    for program, message in [
        ("/bin/false", "exited with status 1"),
        (hang, "did not greet a client"),
    ]:
        out = tmp_path / "r.json"
        result = subprocess.run(
            [PYTHON, RUN, "--quick", "--only", "memory", "--servers", "trionbd", "--trionbd",
             str(program), "--json", str(out)],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        samples = json.loads(out.read_text())["samples"]
        (sample,) = samples
        assert message in sample["error"], sample
        assert "| error |" in result.stdout
        assert not _leftovers(samples)
