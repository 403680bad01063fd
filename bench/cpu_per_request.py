"""Server CPU time per request under fio: where the benchmark's ratios come from.

    .venv/bin/python bench/cpu_per_request.py [--server trionbd|nbdkit] [--runs N]
        [--trionbd PATH] [--fio "FIO OPTIONS"] -- PLUGIN [ARGS ...]

Starts the server on a private Unix socket (``SERVER -f -U SOCK PLUGIN ARGS``), drives
it with fio's nbd engine, and prints the server's CPU time (user + system, and each;
of all its processes: trionbd's supervisor and workers) divided by the requests fio
completed, with the IOPS. Throughput depends on the
machine's other load; CPU per request much less, so this is the number to compare when
changing the hot path (on a busy virtual machine, take several runs).
The default fio job is 200 000 random 4 KiB reads at queue depth 32 over the first GiB.

    .venv/bin/python bench/cpu_per_request.py -- file /tmp/data.img
    .venv/bin/python bench/cpu_per_request.py -- file /tmp/a.tar --filter=tar tar-entry=m
    .venv/bin/python bench/cpu_per_request.py --server nbdkit -- file /tmp/data.img
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time

from servers import DEFAULT_TRIONBD, cpu_seconds, running

START_TIMEOUT = 30.0
DEFAULT_FIO = "--rw=randread --bs=4k --iodepth=32 --size=1G --number_ios=200000"


def one_run(
    server: str, args: list[str], fio: list[str], trionbd: str
) -> tuple[float, float, float]:
    """(server user and system CPU microseconds per request, IOPS) of one fio run on a
    fresh server."""
    program = trionbd if server == "trionbd" else server
    with running(server, lambda sock: [program, "-f", "-U", sock, *args], START_TIMEOUT) as srv:
        time.sleep(0.5)  # let the first connection's work settle before counting
        before = cpu_seconds(srv.proc.pid)
        result = subprocess.run(
            ["fio", "--name=cpu", "--ioengine=nbd", f"--uri={srv.uri}",
             "--output-format=json", *fio],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        after = cpu_seconds(srv.proc.pid)
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    user, system = (1e6 * (b - a) / ios for a, b in zip(before, after, strict=True))
    return user, system, job["read"]["iops"] + job["write"]["iops"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="trionbd", help="trionbd (default) or nbdkit")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trionbd", default=DEFAULT_TRIONBD, help="the trionbd program")
    parser.add_argument("--fio", default=DEFAULT_FIO, help=f"fio options ({DEFAULT_FIO})")
    parser.add_argument("args", nargs="+", help="the plugin, its parameters and filters")
    opts = parser.parse_args()
    for _ in range(opts.runs):
        user, system, iops = one_run(opts.server, opts.args, shlex.split(opts.fio), opts.trionbd)
        print(
            f"{user + system:6.2f} us server CPU per request ({user:.2f} user, "
            f"{system:.2f} system), {iops:9,.0f} IOPS",
            flush=True,
        )


if __name__ == "__main__":
    main()
