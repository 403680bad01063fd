"""Tables from a results JSON (what bench/run.py writes): medians, ratios, RESULTS.md.

Everything here reads only the JSON, so RESULTS.md can be regenerated from a saved run.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from servers import SAMPLE_DIR_PARENT, SAMPLE_DIR_PREFIX

SERVERS = ("trionbd", "nbdkit", "qemu-nbd")
RATIOS = ("nbdkit", "qemu-nbd")
NOT_RUN = "—"
NA = "n/a"

Results = dict[str, Any]


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


def median(results: Results, workload: str, row: str, server: str, metric: str) -> float | None:
    """Median of a metric over the samples without error; None if there are none."""
    values = [
        s["metrics"][metric]
        for s in _samples(results, workload, row, server)
        if s["error"] is None and metric in s["metrics"]
    ]
    return statistics.median(values) if values else None


def _cell(
    results: Results, wl: dict[str, Any], row: dict[str, Any], server: str, metric: str
) -> tuple[str, float | None]:
    state = row["cells"][server]
    if state != "run":
        return state, None
    samples = _samples(results, wl["name"], row["label"], server)
    if not samples:
        return NOT_RUN, None
    value = median(results, wl["name"], row["label"], server, metric)
    failed = sum(s["error"] is not None for s in samples)
    if value is None:
        return "error", None
    unit = next(m["unit"] for m in wl["metrics"] if m["key"] == metric)
    text = _fmt(value, unit)
    return (f"{text} ({failed} failed)" if failed else text), value


def _row_title(wl: dict[str, Any], label: str) -> str:
    return f"{wl['title']} — {label}" if label else wl["title"]


def table(results: Results) -> list[str]:
    """The table of medians and ratios, as Markdown lines."""
    arrows = {True: "↑", False: "↓"}
    lines = [
        "| Workload | Metric | "
        + " | ".join(SERVERS)
        + " | "
        + " | ".join(f"trionbd/{s}" for s in RATIOS)
        + " |",
        "|---|---|" + "---:|" * (len(SERVERS) + len(RATIOS)),
    ]
    for wl in results["workloads"]:
        reasons = {row["skipped"] for row in wl["rows"]}
        if None not in reasons and len(reasons) == 1:
            lines.append(f"| {wl['title']} | | skipped: {reasons.pop()} | | | | |")
            continue
        done: dict[tuple[str, str, str], float | None] = {}
        for row in wl["rows"]:
            title = _row_title(wl, row["label"])
            if row["skipped"]:
                lines.append(f"| {title} | | skipped: {row['skipped']} | | | | |")
                continue
            for metric in wl["metrics"]:
                cells: dict[str, str] = {}
                for server in SERVERS:
                    cells[server], done[row["label"], server, metric["key"]] = _cell(
                        results, wl, row, server, metric["key"]
                    )
                mine = done[row["label"], "trionbd", metric["key"]]
                ratios = [_ratio(mine, done[row["label"], s, metric["key"]]) for s in RATIOS]
                name = f"{metric['label']} {arrows[metric['higher_is_better']]}"
                lines.append(
                    f"| {title} | {name} | "
                    + " | ".join(cells[s] for s in SERVERS)
                    + " | "
                    + " | ".join(ratios)
                    + " |"
                )
        if wl["ratio"]:
            num, den = wl["ratio"]
            for metric in wl["metrics"]:
                key = metric["key"]
                cells = {}
                for server in SERVERS:
                    a, b = done.get((num, server, key)), done.get((den, server, key))
                    cells[server] = _ratio(a, b)
                if not any(cells.values()):
                    continue
                lines.append(
                    f"| {_row_title(wl, f'{num} ÷ {den} (same server)')} | "
                    f"{metric['label']} ratio | " + " | ".join(cells[s] for s in SERVERS) + " | | |"
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
        "(trionbd, nbdkit, qemu-nbd, trionbd, ...); the table shows medians.",
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
    ]
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
