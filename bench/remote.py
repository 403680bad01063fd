"""Benchmarks of the remote plugins, side by side in one run (issue 17's rows):

* ``http-nbdcopy``: nbdcopy of an image served over HTTP by nginx on loopback, through
  ``trionbd http URL`` and ``nbdkit curl URL`` (MiB/s);
* ``http-randread-4k``: fio 4k random reads, iodepth 32, over the same (IOPS);
* ``http-tar-member``: fio 4k random reads and nbdcopy of a tar member over http, and of
  the same member from the file plugin (``trionbd file ARCHIVE --filter=tar``);
* ``s3-list``: ``nbdinfo --list`` of a bucket prefix (moto's S3 server) holding 100
  archives of 100 members each (``--quick``: 10 of 10), through
  ``trionbd s3 prefix= --filter=tar`` (seconds).

Same method as bench/run.py: a fresh server per sample (servers.running), samples
interleaved between servers, medians of ``--reps``. nginx and moto are started once per
run (tests/remote/servers.py) and stopped at the end.

    .venv/bin/python bench/remote.py [--quick] [--reps N] [--only NAME ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from servers import DEFAULT_TRIONBD, BenchError, Running, run_client, running

from tests.remote.servers import S3_ENV, moto_server, nginx

MiB = 1 << 20
START_TIMEOUT = 60.0
Command = Callable[[str], list[str]]


def fio_randread(server: Running, runtime: float) -> float:
    out = server.workdir / "fio.json"
    cmd = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randread",
        "--bs=4k", "--iodepth=32", "--numjobs=1", "--time_based", f"--runtime={runtime}s",
        "--ramp_time=1s", "--output-format=json", f"--output={out}",
    ]  # fmt: skip
    run_client(cmd, runtime + 120)
    job = json.loads(out.read_text())["jobs"][0]
    if job["error"] or not job["read"]["io_bytes"]:
        raise BenchError(f"fio failed against {server.name}: error {job['error']}")
    return float(job["read"]["iops"])


def nbdcopy_mib_s(server: Running, uri: str | None = None) -> float:
    uri = uri or server.uri
    size = json.loads(run_client(["nbdinfo", "--json", uri], 60))["exports"][0]["export-size"]
    start = time.monotonic()
    run_client(["nbdcopy", uri, "null:"], 1200)
    return size / MiB / (time.monotonic() - start)


def tar_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def sample(
    results: dict[str, list[float]],
    label: str,
    cmd_for: Command,
    measure: Callable[[Running], float],
    env: dict[str, str] | None = None,
) -> None:
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        with running(label, cmd_for, START_TIMEOUT) as server:
            results.setdefault(label, []).append(measure(server))
    except BenchError as e:
        print(f"  {label}: error: {e}", file=sys.stderr)
        results.setdefault(label, [])
    finally:
        os.environ.clear()
        os.environ.update(old)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="64 MiB, 2 s fio runs, 10 archives, 1 rep"
    )
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--trionbd", default=DEFAULT_TRIONBD)
    args = parser.parse_args(argv)
    size = 64 * MiB if args.quick else 1024 * MiB
    member_size = 16 * MiB if args.quick else 256 * MiB
    runtime = 2.0 if args.quick else 10.0
    archives = 10 if args.quick else 100  # of as many members each
    reps = args.reps or (1 if args.quick else 3)
    only = set(args.only) if args.only else None
    trionbd = args.trionbd
    results: dict[str, dict[str, list[float]]] = {}

    def wanted(name: str) -> bool:
        return only is None or name in only

    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tnbd-remote-")))
        rng = random.Random(17)
        with open(root / "disk.img", "wb") as f:
            for _ in range(size // (4 * MiB)):
                f.write(rng.randbytes(4 * MiB))
        archive = tar_of(
            {
                "small": b"x" * 1000,
                "data/member.img": b"".join(
                    rng.randbytes(4 * MiB) for _ in range(member_size // (4 * MiB))
                ),
            }
        )
        (root / "archive.tar").write_bytes(archive)
        web = stack.enter_context(nginx(root))
        url = web.url("disk.img")
        tar_url = web.url("archive.tar")
        member = "tar-entry=data/member.img"

        archive_path = str(root / "archive.tar")
        http_rows: dict[str, Command] = {
            "trionbd http": lambda sock: [trionbd, "-f", "-U", sock, "http", url],
            "nbdkit curl": lambda sock: ["nbdkit", "-f", "-U", sock, "curl", url],
        }
        tar_rows: dict[str, Command] = {
            "member over http": lambda sock: [
                *(trionbd, "-f", "-U", sock, "http", tar_url, "--filter=tar", member)
            ],
            "member from file": lambda sock: [
                *(trionbd, "-f", "-U", sock, "file", archive_path, "--filter=tar", member)
            ],
        }

        def randread(server: Running) -> float:
            return fio_randread(server, runtime)

        plan = [
            ("http-nbdcopy", http_rows, nbdcopy_mib_s),
            ("http-randread-4k", http_rows, randread),
            ("http-tar-member randread-4k", tar_rows, randread),
            ("http-tar-member nbdcopy", tar_rows, nbdcopy_mib_s),
        ]
        for rep in range(reps):
            print(f"rep {rep + 1}/{reps}", file=sys.stderr)
            for workload, rows, measure in plan:
                if wanted(workload.split()[0]):
                    for label, cmd_for in rows.items():
                        sample(results.setdefault(workload, {}), label, cmd_for, measure)

        if wanted("s3-list"):
            moto = stack.enter_context(moto_server())
            client = moto.client()
            client.create_bucket(Bucket="backups")
            for a in range(archives):
                members = {
                    f"f{m:03d}.bin": rng.randbytes(rng.randrange(100, 5000))
                    for m in range(archives)
                }
                client.put_object(Bucket="backups", Key=f"2026/a{a:03d}.tar", Body=tar_of(members))
            s3_args = ["s3", "bucket=backups", "prefix=2026/", f"endpoint-url={moto.endpoint}"]

            def s3_cmd(sock: str) -> list[str]:
                return [trionbd, "-f", "-U", sock, *s3_args, "--filter=tar"]

            def listing(server: Running) -> float:
                start = time.monotonic()
                out = run_client(["nbdinfo", "--list", "--json", server.uri], 3600)
                seconds = time.monotonic() - start
                count = len(json.loads(out)["exports"])
                if count != archives * archives:
                    raise BenchError(f"listed {count} exports, expected {archives**2}")
                return seconds

            for _ in range(reps):
                sample(
                    results.setdefault("s3-list seconds", {}),
                    "trionbd s3 --filter=tar",
                    s3_cmd,
                    listing,
                    S3_ENV,
                )

    for workload, rows in results.items():
        print(f"\n{workload}")
        for label, values in rows.items():
            shown = f"{statistics.median(values):10.1f}" if values else "     error"
            print(f"  {label:28} {shown}   ({', '.join(f'{v:.1f}' for v in values)})")
        if workload in ("http-nbdcopy", "http-randread-4k") and all(rows.values()):
            ours, theirs = (statistics.median(v) for v in rows.values())
            print(f"  {'trionbd ÷ nbdkit':28} {ours / theirs:10.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(v for rows in results.values() for v in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
