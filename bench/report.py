"""Tables from a results JSON (what bench/run.py writes): medians, ratios, RESULTS.md.

Everything here reads only the JSON, so RESULTS.md can be regenerated from a saved run.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from servers import SAMPLE_DIR_PARENT, SAMPLE_DIR_PREFIX, SERVERS

NOT_RUN = "—"
NA = "n/a"

Results = dict[str, Any]

ANALYSIS = Path(__file__).with_name("ANALYSIS.md")
"""Written by hand: where the time goes and what was tried (RESULTS.md includes it)."""


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f}"
    if unit == "MiB":
        return f"{value:.1f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else ""


def _samples(results: Results, workload: str, row: str, server: str) -> list[dict[str, Any]]:
    return [
        s
        for s in results["samples"]
        if s["workload"] == workload and s["row"] == row and s["server"] == server
    ]


def _median_of(samples: list[dict[str, Any]], metric: str) -> float | None:
    values = [
        s["metrics"][metric] for s in samples if s["error"] is None and metric in s["metrics"]
    ]
    return statistics.median(values) if values else None


def median(results: Results, workload: str, row: str, server: str, metric: str) -> float | None:
    """Median of a metric over the samples without error; None if there are none."""
    return _median_of(_samples(results, workload, row, server), metric)


def _cell(
    results: Results, wl: dict[str, Any], row: dict[str, Any], server: str, metric: str
) -> tuple[str, float | None]:
    state = row["cells"][server]
    if state != "run":
        return state, None
    samples = _samples(results, wl["name"], row["label"], server)
    if not samples:
        return NOT_RUN, None
    value = _median_of(samples, metric)
    failed = sum(s["error"] is not None for s in samples)
    if value is None:
        return "error", None
    unit = next(m["unit"] for m in wl["metrics"] if m["key"] == metric)
    text = _fmt(value, unit)
    return (f"{text} ({failed} failed)" if failed else text), value


def _row_title(wl: dict[str, Any], label: str) -> str:
    return f"{wl['title']} — {label}" if label else wl["title"]


def columns(results: Results) -> list[str]:
    """The servers of the table, in order: trionbd, a baseline trionbd if the run had
    one (``trionbd@COMMIT``), nbdkit, qemu-nbd."""
    return list(results.get("columns") or SERVERS)


def table(results: Results) -> list[str]:
    """The table of medians and ratios, as Markdown lines."""
    arrows = {True: "↑", False: "↓"}
    servers = columns(results)
    others = [s for s in servers if s != "trionbd"]
    blank = " |" * (len(servers) + len(others) - 1)
    lines = [
        "| Workload | Metric | "
        + " | ".join(servers)
        + " | "
        + " | ".join(f"trionbd/{s}" for s in others)
        + " |",
        "|---|---|" + "---:|" * (len(servers) + len(others)),
    ]
    for wl in results["workloads"]:
        reasons = {row["skipped"] for row in wl["rows"]}
        if None not in reasons and len(reasons) == 1:
            lines.append(f"| {wl['title']} | | skipped: {reasons.pop()} |{blank}")
            continue
        done: dict[tuple[str, str, str], float | None] = {}
        for row in wl["rows"]:
            title = _row_title(wl, row["label"])
            if row["skipped"]:
                lines.append(f"| {title} | | skipped: {row['skipped']} |{blank}")
                continue
            for metric in wl["metrics"]:
                cells: dict[str, str] = {}
                for server in servers:
                    cells[server], done[row["label"], server, metric["key"]] = _cell(
                        results, wl, row, server, metric["key"]
                    )
                mine = done[row["label"], "trionbd", metric["key"]]
                ratios = [_ratio(mine, done[row["label"], s, metric["key"]]) for s in others]
                name = f"{metric['label']} {arrows[metric['higher_is_better']]}"
                lines.append(
                    f"| {title} | {name} | "
                    + " | ".join(cells[s] for s in servers)
                    + " | "
                    + " | ".join(ratios)
                    + " |"
                )
        if wl["ratio"]:
            num, den = wl["ratio"]
            for metric in wl["metrics"]:
                key = metric["key"]
                cells = {}
                for server in servers:
                    a, b = done.get((num, server, key)), done.get((den, server, key))
                    cells[server] = _ratio(a, b)
                if not any(cells.values()):
                    continue
                lines.append(
                    f"| {_row_title(wl, f'{num} ÷ {den} (same server)')} | "
                    f"{metric['label']} ratio | "
                    + " | ".join(cells[s] for s in servers)
                    + " |"
                    + " |" * len(others)
                )
    return lines


def _wl(results: Results, name: str) -> dict[str, Any] | None:
    return next((w for w in results["workloads"] if w["name"] == name), None)


def _rows(results: Results, name: str, prefix: str = "") -> list[str]:
    wl = _wl(results, name)
    return [r["label"] for r in wl["rows"] if r["label"].startswith(prefix)] if wl else []


def _metrics(results: Results, name: str) -> list[dict[str, Any]]:
    wl = _wl(results, name)
    return list(wl["metrics"]) if wl else []


def _at_least(value: float | None, bound: float, unit: str = "×") -> tuple[str, str]:
    if value is None:
        return "not measured", "—"
    return f"{value:.2f}{unit}", "yes" if value >= bound else "**no**"


def _at_most(value: float | None, bound: float, unit: str) -> tuple[str, str]:
    if value is None:
        return "not measured", "—"
    return f"{value:.2f} {unit}", "yes" if value < bound else "**no**"


def targets(results: Results) -> list[str]:
    """Issue 20's targets, each with the value this run measured and whether it is met.
    A ratio is always "how trionbd does": for ↓ metrics (seconds, MiB of RSS) it is the
    other server's value divided by trionbd's, so above 1 means trionbd is better."""
    lines = ["| Target | Measured | Met |", "|---|---:|:---:|"]

    def add(text: str, result: tuple[str, str]) -> None:
        lines.append(f"| {text} | {result[0]} | {result[1]} |")

    def speed(name: str, row: str, other: str, metric: dict[str, Any]) -> float | None:
        mine = median(results, name, row, "trionbd", metric["key"])
        theirs = median(results, name, row, other, metric["key"])
        if not mine or not theirs:
            return None
        return mine / theirs if metric["higher_is_better"] else theirs / mine

    # The rows issue 20 names (the compressed and zip rows are issue 18's, reported in
    # the table; start-up and memory have absolute bounds below).
    rows = ("randread-4k", "seqread-256k", "randwrite-4k", "nbdcopy", "nbdcopy-multiconn",
            "qemu10-convert", "tar-randread-4k", "tar-nbdcopy", "ext2-randread-4k",
            "ext2-nbdcopy", "connections")  # fmt: skip
    against = {"nbdkit": rows, "qemu-nbd": ("connections", "nbdcopy", "nbdcopy-multiconn")}
    for other, names in against.items():
        for wl in results["workloads"]:
            if wl["name"] not in names:
                continue
            for row in wl["rows"]:
                if row["cells"].get(other) != "run" or row["cells"].get("trionbd") != "run":
                    continue
                for metric in wl["metrics"]:
                    what = f"{_row_title(wl, row['label'])}, {metric['label']}"
                    add(
                        f"≥ 1.0× {other}: {what}",
                        _at_least(speed(wl["name"], row["label"], other, metric), 1.0),
                    )
    for row in _rows(results, "startup-list", "tar of"):
        add(
            f"< 0.5 s: nbdinfo --list of the {row}",
            _at_most(median(results, "startup-list", row, "trionbd", "list_s"), 0.5, "s"),
        )
    add(
        "< 100 ms: start-up to the first greeting (plain file)",
        _at_most(median(results, "startup-list", "plain file", "trionbd", "ready_s"), 0.1, "s"),
    )
    memory = (("rss_idle_mib", 30), ("rss_clients_mib", 60), ("pss_idle_mib", 30),
              ("pss_clients_mib", 60))  # fmt: skip
    for key, bound in memory:
        for metric in [m for m in _metrics(results, "memory") if m["key"] == key]:
            add(
                f"< {bound} MiB: {metric['label']} (all processes summed)",
                _at_most(median(results, "memory", "", "trionbd", key), bound, "MiB"),
            )
    return lines


def _placeholders(cmd: str, data_path: str) -> str:
    sample_dir = re.escape(f"{SAMPLE_DIR_PARENT}/{SAMPLE_DIR_PREFIX}") + r"[^/ ']+"
    return re.sub(sample_dir, "$DIR", cmd).replace(data_path, "$DATA")


def errors(results: Results) -> list[str]:
    """Failed samples, and servers that did not exit cleanly when stopped."""
    lines = []
    for s in results["samples"]:
        where = f"- {s['workload']} / {s['row'] or '-'} / {s['server']} / rep {s['rep']}: "
        if s["error"] is not None:
            lines.append(where + s["error"].replace("\n", " "))
        elif s["server_exit"] != 0:
            lines.append(where + f"{s['server']} exited with status {s['server_exit']} on SIGTERM")
    return lines


def markdown(results: Results) -> str:
    """The whole RESULTS.md."""
    m, v, st = results["machine"], results["versions"], results["settings"]
    out = [
        "# trionbd benchmark results",
        "",
        f"Generated by `bench/run.py --markdown` from the JSON of the run started "
        f"{results['started']} (took {results['duration_s'] / 60:.1f} min). "
        "How to read it: bench/README.md.",
        "",
        "Run with:",
        "",
        "```sh",
        results["command"],
        "```",
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in m.items()),
        "",
        "## Versions",
        "",
        *(f"- {key}: {value}" for key, value in v.items()),
        "",
        "## Method",
        "",
        f"- {st['reps']} repetition(s) of every sample, interleaved "
        f"({', '.join(columns(results))}, trionbd, ...); the table shows medians.",
        *(f"- {name}: `{' '.join(cmd)}`" for name, cmd in results.get("trionbds", {}).items()),
        f"- {st['server_lifetime']}",
        f"- Data in {st['data_fs']} ({st['data_dir']}), wholly in the page cache in 4 KiB "
        "pages; dirty pages are written back before each sample.",
        "- Load average (1, 5, 15 min) at the start: "
        + ", ".join(f"{x:.2f}" for x in results["load_average_start"])
        + "; at the end: "
        + ", ".join(f"{x:.2f}" for x in results["load_average_end"])
        + " (other work on the machine adds noise; interleaving spreads it over all servers).",
        f"- fio: {st['fio_runtime']:g} s per sample after {st['fio_ramp']:g} s ramp-up, "
        "one job, `ioengine=nbd`; numbers from `--output-format=json`.",
        "- Ratios are trionbd ÷ other server: above 1 is better for ↑ metrics, "
        "below 1 is better for ↓ metrics.",
        "",
        "## Results",
        "",
        *table(results),
        "",
        "## Targets (issue 20)",
        "",
        "Each target against this run's medians. A ratio says how trionbd does: for ↓ "
        "metrics (seconds, MiB) it is the other server's value ÷ trionbd's, so 1.0 or "
        "more is as good or better. Where a target is not met, the next section says "
        "where the time goes and what was tried.",
        "",
        *targets(results),
        "",
    ]
    if ANALYSIS.exists():
        out += [ANALYSIS.read_text().rstrip(), ""]
    errs = errors(results)
    if errs:
        out += ["## Errors", "", *errs, ""]
    out += [
        "## Commands",
        "",
        "Each distinct server and client command, with `$DIR` for the sample's private "
        "directory (it holds the socket) and `$DATA` for the run's data directory; the "
        "JSON has every sample's exact command.",
        "",
    ]
    seen: set[str] = set()
    for s in results["samples"]:
        for cmd in (s["server_command"], s["client_command"]):
            short = _placeholders(cmd, st["data_path"]) if cmd else None
            if short and short not in seen:
                seen.add(short)
                out.append(f"- `{short}`")
    out += [
        "",
        "## All samples",
        "",
        "| # | Workload | Row | Server | Rep | Values |",
        "|---:|---|---|---|---:|---|",
    ]
    for s in results["samples"]:
        values = (
            s["error"].splitlines()[0]
            if s["error"]
            else ", ".join(f"{k}={v:.6g}" for k, v in s["metrics"].items())
        )
        out.append(
            f"| {s['seq']} | {s['workload']} | {s['row'] or '-'} | {s['server']} | "
            f"{s['rep']} | {values} |"
        )
    return "\n".join(out) + "\n"
