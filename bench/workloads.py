"""What is measured: the workloads, their rows (what each server serves) and measurements.

A workload has rows (e.g. "tar member" and "plain copy of the member") and metrics (e.g.
IOPS). Each sample serves one row's target with one freshly started server and measures
it with the same client command for every server.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fixtures import MEMBER_NAME, Fixtures
from servers import (
    SERVERS,
    SYSTEM_PYTHON,
    BenchError,
    Kind,
    Running,
    Target,
    command,
    memory_of,
    qemu10,
    run_client,
)

MiB = 1 << 20
GiB = 1 << 30
"""Debian's Python: the one with ``import nbd`` (python3-libnbd)."""
DRIVER = str(Path(__file__).resolve().parent / "nbd_driver.py")
CLIENT_SLACK = 60.0
"""Seconds a client may take beyond its planned run time before it counts as hung."""


@dataclass(frozen=True)
class Settings:
    """Sizes, durations and repetitions of one run (``--quick`` picks the small set)."""

    reps: int
    file_size: int
    member_size: int
    fio_runtime: float
    fio_ramp: float
    conn_seconds: float
    clients: int
    tar_members: int
    ext4_files: int
    settle: float
    """Seconds to let a server settle before reading its memory use."""
    start_timeout: float = 30.0
    """Seconds a server may take to greet a client (plain files)."""
    list_timeout: float = 900.0
    """Seconds for start-up or a listing of the many-member tar / many-file ext4 image."""


FULL = Settings(
    reps=3,
    file_size=1 * GiB,
    member_size=256 * MiB,
    fio_runtime=10.0,
    fio_ramp=1.0,
    conn_seconds=5.0,
    clients=200,
    tar_members=10_000,
    ext4_files=100_000,
    settle=1.0,
)
QUICK = Settings(
    reps=1,
    file_size=64 * MiB,
    member_size=16 * MiB,
    fio_runtime=0.5,
    fio_ramp=0.2,
    conn_seconds=0.5,
    clients=200,
    tar_members=1000,
    ext4_files=1000,
    settle=0.2,
    list_timeout=60.0,
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


@dataclass(frozen=True)
class Measured:
    metrics: dict[str, float]
    client: list[str]
    """The client command that produced the numbers."""


Measure = Callable[[Running, Target, Settings], Measured]


@dataclass(frozen=True)
class Row:
    """One thing every server serves. ``targets`` is called only if the row runs (it
    builds the data); servers in ``na`` cannot serve it, the others without a target are
    not run for it. ``requires`` names a trionbd filter the row needs."""

    label: str
    targets: Callable[[], dict[str, Target]]
    na: tuple[str, ...] = ()
    requires: str | None = None


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    description: str
    metrics: tuple[Metric, ...]
    rows: tuple[Row, ...]
    measure: Measure
    ratio: tuple[str, str] | None = None
    """Two row labels: the table adds a row of their ratio per server."""


IOPS = Metric("iops", "IOPS", "IOPS", True)
MIB_S = Metric("mib_s", "MiB/s", "MiB/s", True)


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def fio(rw: str, bs: str, iodepth: int) -> Measure:
    """fio with libnbd (``ioengine=nbd``), one job, time based; numbers from its JSON."""

    def measure(server: Running, target: Target, s: Settings) -> Measured:
        out = server.workdir / "fio.json"
        cmd = [
            "fio",
            "--name=bench",
            "--ioengine=nbd",
            f"--uri={server.uri}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={iodepth}",
            "--numjobs=1",
            "--time_based",
            f"--runtime={_ms(s.fio_runtime)}",
            f"--ramp_time={_ms(s.fio_ramp)}",
            "--output-format=json",
            f"--output={out}",
        ]
        run_client(cmd, s.fio_runtime + s.fio_ramp + CLIENT_SLACK)
        job = json.loads(out.read_text())["jobs"][0]
        if job["error"]:
            raise BenchError(f"fio reported error {job['error']} against {server.name}")
        side = job["write" if "write" in rw else "read"]
        if not side["io_bytes"]:
            raise BenchError(f"fio did no I/O against {server.name}")
        clat = side["clat_ns"]["percentile"]
        return Measured(
            {
                "iops": side["iops"],
                "mib_s": side["bw_bytes"] / MiB,
                "lat_mean_us": side["lat_ns"]["mean"] / 1000,
                "clat_p50_us": clat["50.000000"] / 1000,
                "clat_p99_us": clat["99.000000"] / 1000,
                "io_bytes": side["io_bytes"],
                "runtime_ms": side["runtime"],
            },
            cmd,
        )

    return measure


def nbdcopy(connections: int) -> Measure:
    """Copy the whole export to ``null:`` with nbdcopy; wall-clock time of the copy."""

    def measure(server: Running, target: Target, s: Settings) -> Measured:
        # Checks the size and opens the export once before the clock starts, so lazy
        # set-up in a server (say, scanning an archive) is not part of the copy.
        info = json.loads(run_client(["nbdinfo", "--json", server.uri], s.list_timeout))
        size = info["exports"][0]["export-size"]
        if size != target.size:
            raise BenchError(f"{server.name} serves {size} bytes, expected {target.size}")
        cmd = ["nbdcopy", f"--connections={connections}", server.uri, "null:"]
        start = time.monotonic()
        run_client(cmd, 600.0)
        seconds = time.monotonic() - start
        metrics = {"mib_s": target.size / MiB / seconds, "seconds": seconds}
        if connections > 1:
            metrics["multi_conn"] = float(info["exports"][0]["can_multi_conn"])
        return Measured(metrics, cmd)

    return measure


def qemu10_convert(server: Running, target: Target, s: Settings) -> Measured:
    """Copy the whole export with qemu 10's ``qemu-img convert`` into a null target (the
    counterpart of nbdcopy to ``null:``); wall-clock time of the copy. Whether extended
    headers were negotiated comes from qemu's trace of the option replies (1 or 0)."""
    info = json.loads(run_client(["nbdinfo", "--json", server.uri], CLIENT_SLACK))
    size = info["exports"][0]["export-size"]
    if size != target.size:
        raise BenchError(f"{server.name} serves {size} bytes, expected {target.size}")
    trace = server.workdir / "qemu-trace"
    cmd = [
        qemu10("qemu-img"),
        "--trace",
        f"enable=nbd_receive_option_reply,file={trace}",
        "convert",
        "-n",
        "-f",
        "raw",
        "--target-image-opts",
        server.uri,
        f"driver=null-co,size={target.size}",
    ]
    start = time.monotonic()
    run_client(cmd, 600.0)
    seconds = time.monotonic() - start
    acked = "option reply 11 (extended headers), type 1 (ack)" in trace.read_text()
    return Measured(
        {
            "mib_s": target.size / MiB / seconds,
            "seconds": seconds,
            "extended_headers": float(acked),
        },
        cmd,
    )


def connections(server: Running, target: Target, s: Settings) -> Measured:
    """Connect, handshake, read 4 KiB, disconnect, in a loop (nbd_driver.py)."""
    cmd = [SYSTEM_PYTHON, DRIVER, "connect-loop", server.uri, str(s.conn_seconds)]
    result = json.loads(run_client(cmd, s.conn_seconds + CLIENT_SLACK))
    return Measured(
        {
            "conn_s": result["connections"] / result["seconds"],
            "connections": result["connections"],
        },
        cmd,
    )


def first_byte(server: Running, target: Target, s: Settings) -> Measured:
    """Seconds from starting the server until a client has read its first 4 KiB: until
    the server greets a client, then a connection, the export's opening and one read
    (``nbd_driver.py first-read``): whatever a server does at start-up or at the first
    open (reading a whole gzip file) is in it."""
    cmd = [SYSTEM_PYTHON, DRIVER, "first-read", server.uri, "4096"]
    result = json.loads(run_client(cmd, s.list_timeout))
    return Measured(
        {
            "first_byte_s": server.ready_s + result["seconds"],
            "ready_s": server.ready_s,
            "first_read_s": result["seconds"],
        },
        cmd,
    )


def opened_first(measure: Measure) -> Measure:
    """``measure`` after ``nbdinfo`` has checked the export's size and a client has read
    its first 4 KiB, so that set-up on the first open or read (nbdkit's gzip filter
    decompresses the whole file into a temporary file then; trionbd's zip filter makes a
    deflated member's checkpoints at its first read) is not measured."""

    def measured(server: Running, target: Target, s: Settings) -> Measured:
        info = json.loads(run_client(["nbdinfo", "--json", server.uri], s.list_timeout))
        size = info["exports"][0]["export-size"]
        if size != target.size:
            raise BenchError(f"{server.name} serves {size} bytes, expected {target.size}")
        run_client([SYSTEM_PYTHON, DRIVER, "first-read", server.uri, "4096"], s.list_timeout)
        return measure(server, target, s)

    return measured


def _normal(name: str) -> str:
    return name.lstrip("/")


def listing(server: Running, target: Target, s: Settings) -> Measured:
    """Start-up (until the server greets a client) plus ``nbdinfo --list``; checks the names."""
    cmd = ["nbdinfo", "--list", "--json", server.uri]
    start = time.monotonic()
    out = run_client(cmd, s.list_timeout)
    list_s = time.monotonic() - start
    names = {_normal(e["export-name"]) for e in json.loads(out)["exports"]}
    missing = sorted({_normal(name) for name in target.exports} - names)
    if missing:
        raise BenchError(
            f"{server.name}: nbdinfo --list lacks {len(missing)} of {len(target.exports)} "
            f"expected exports, e.g. {missing[:3]}"
        )
    return Measured(
        {
            "total_s": server.ready_s + list_s,
            "ready_s": server.ready_s,
            "list_s": list_s,
            "exports": len(names),
        },
        cmd,
    )


def memory(server: Running, target: Target, s: Settings) -> Measured:
    """RSS and PSS of the idle server (all its processes), then with ``clients``
    connections that finished the handshake (held open by one nbd_driver.py process)."""
    time.sleep(s.settle)
    idle = memory_of(server.proc.pid)
    cmd = [SYSTEM_PYTHON, DRIVER, "hold", server.uri, str(s.clients)]
    driver = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert driver.stdin is not None and driver.stdout is not None
    try:
        ready, _, _ = select.select([driver.stdout], [], [], 120.0)
        line = driver.stdout.readline() if ready else b""
        if not line:
            driver.kill()
            err = driver.communicate()[1].decode(errors="replace").strip()
            raise BenchError(
                f"{s.clients} clients could not connect to {server.name} within 120 s: {err}"
            )
        held = json.loads(line)
        time.sleep(s.settle)
        server.check_alive()
        busy = memory_of(server.proc.pid)
        driver.stdin.write(b"done\n")
        driver.stdin.close()
        driver.wait(60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    return Measured(
        {
            "rss_idle_mib": idle["rss_mib"],
            "rss_clients_mib": busy["rss_mib"],
            "pss_idle_mib": idle["pss_mib"],
            "pss_clients_mib": busy["pss_mib"],
            "threads_idle": idle["threads"],
            "threads_clients": busy["threads"],
            "processes": idle["processes"],
            "connect_all_s": held["connect_s"],
        },
        cmd,
    )


FILTER_SERVERS = ("trionbd", "nbdkit")


def workloads(fx: Fixtures, s: Settings) -> list[Workload]:
    """Every workload, in the order they run. Rows build their data only when run."""

    def plain() -> dict[str, Target]:
        return dict.fromkeys(SERVERS, Target("file", fx.file, size=s.file_size))

    def plain_qemu10() -> dict[str, Target]:
        t = Target("file", fx.file, size=s.file_size, qemu_nbd=qemu10("qemu-nbd"))
        return dict.fromkeys(SERVERS, t)

    def member_plain() -> dict[str, Target]:
        return {n: Target("file", fx.member, size=s.member_size) for n in FILTER_SERVERS}

    def tar_member() -> dict[str, Target]:
        t = Target("tar", fx.archive, MEMBER_NAME, size=s.member_size)
        return dict.fromkeys(FILTER_SERVERS, t)

    def ext2_member() -> dict[str, Target]:
        t = Target("ext2", fx.image, "/" + MEMBER_NAME, size=s.member_size)
        return dict.fromkeys(FILTER_SERVERS, t)

    def compressed(
        kind: Kind, path: Callable[[], Path], *params: str
    ) -> Callable[[], dict[str, Target]]:
        def targets() -> dict[str, Target]:
            t = Target(kind, path(), size=s.file_size, params=params)
            return {n: t for n in FILTER_SERVERS if command(n, t, "/s", "t") is not None}

        return targets

    def gz_with_index() -> dict[str, Target]:
        index = fx.image_gz_index
        return compressed("gzip", lambda: fx.image_gz, f"index={index}")()

    def uncompressed() -> dict[str, Target]:
        return {n: Target("file", fx.compressible, size=s.file_size) for n in FILTER_SERVERS}

    def targz_member() -> dict[str, Target]:
        t = Target("targz", fx.archive_tgz, MEMBER_NAME, size=s.member_size)
        return dict.fromkeys(FILTER_SERVERS, t)

    def zip_member() -> dict[str, Target]:
        return {"trionbd": Target("zip", fx.archive_zip, MEMBER_NAME, size=s.member_size)}

    def compressible_member() -> dict[str, Target]:
        t = Target("file", fx.compressible_member, size=s.member_size)
        return dict.fromkeys(FILTER_SERVERS, t)

    def many_dir() -> dict[str, Target]:
        path, names = fx.many_dir
        return dict.fromkeys(FILTER_SERVERS, Target("dir", path, exports=tuple(names)))

    def many_tar() -> dict[str, Target]:
        path, names = fx.many_tar
        t = Target("tar", path, None, exports=tuple(names))
        return {"trionbd": t}

    def many_ext4() -> dict[str, Target]:
        path, names = fx.many_ext4
        t = Target("ext2", path, None, exports=tuple(names))
        return {"trionbd": t}

    size = _size(s.file_size)
    msize = _size(s.member_size)
    file_row = Row("", plain)
    randread = fio("randread", "4k", 32)
    copy1 = nbdcopy(1)

    def member_rows(kind: str, member: Callable[[], dict[str, Target]]) -> tuple[Row, ...]:
        what = "tar member" if kind == "tar" else "file in ext4 image"
        return (
            Row(what, member, na=("qemu-nbd",), requires=kind),
            Row("plain copy", member_plain, requires=kind),
        )

    only_trionbd = ("nbdkit", "qemu-nbd")
    gz_row = Row("gzip (pigz -6)", compressed("gzip", lambda: fx.image_gz), ("qemu-nbd",), "gzip")
    xz_row = Row("xz -T0 -3", compressed("xz", lambda: fx.image_xz), ("qemu-nbd",), "xz")
    zst_rows = (
        Row("seekable zstd, 1 MiB frames", compressed("zstd", lambda: fx.image_zst),
            only_trionbd, "zstd"),
        Row("plain zstd -3 (unpacked at start-up)",
            compressed("zstd", lambda: fx.image_zst_plain), only_trionbd, "zstd"),
    )  # fmt: skip
    tar_ratio = ("tar member", "plain copy")
    ext2_ratio = ("file in ext4 image", "plain copy")
    return [
        Workload(
            "randread-4k",
            f"4k random read, iodepth 32 (fio, {size} file)",
            "Per-request cost: small reads, many in flight on one connection.",
            (IOPS,),
            (file_row,),
            randread,
        ),
        Workload(
            "seqread-256k",
            f"256 KiB sequential read, iodepth 8 (fio, {size} file)",
            "Bulk throughput of large reads on one connection.",
            (MIB_S,),
            (file_row,),
            fio("read", "256k", 8),
        ),
        Workload(
            "randwrite-4k",
            f"4k random write, iodepth 32 (fio, {size} file)",
            "Per-request cost of small writes (no flush).",
            (IOPS,),
            (file_row,),
            fio("randwrite", "4k", 32),
        ),
        Workload(
            "nbdcopy",
            f"nbdcopy {size} to null:, 1 connection",
            "Whole-export sequential copy with nbdcopy's default requests (64 x 256 KiB).",
            (MIB_S,),
            (file_row,),
            copy1,
        ),
        Workload(
            "nbdcopy-multiconn",
            f"nbdcopy {size} to null:, 4 connections (multi-conn)",
            "The same copy over 4 connections, if the server advertises multi-conn.",
            (MIB_S,),
            (file_row,),
            nbdcopy(4),
        ),
        Workload(
            "qemu10-convert",
            f"qemu-img 10 convert {size} to null, extended headers (qemu-nbd 10)",
            "The nbdcopy copy done by qemu 10's block layer, which asks for extended "
            "headers (nbdkit refuses them; qemu-nbd is qemu 10's here).",
            (MIB_S,),
            (Row("", plain_qemu10),),
            qemu10_convert,
        ),
        Workload(
            "tar-randread-4k",
            f"tar filter: 4k random read, iodepth 32 ({msize} member)",
            "The tar filter's per-request cost on top of the file plugin.",
            (IOPS,),
            member_rows("tar", tar_member),
            randread,
            ratio=tar_ratio,
        ),
        Workload(
            "tar-nbdcopy",
            f"tar filter: nbdcopy to null:, 1 connection ({msize} member)",
            "The tar filter's throughput on top of the file plugin.",
            (MIB_S,),
            member_rows("tar", tar_member),
            copy1,
            ratio=tar_ratio,
        ),
        Workload(
            "ext2-randread-4k",
            f"ext2 filter: 4k random read, iodepth 32 ({msize} file)",
            "The ext2 filter's per-request cost (block mapping) on top of the file plugin.",
            (IOPS,),
            member_rows("ext2", ext2_member),
            randread,
            ratio=ext2_ratio,
        ),
        Workload(
            "ext2-nbdcopy",
            f"ext2 filter: nbdcopy to null:, 1 connection ({msize} file)",
            "The ext2 filter's throughput on top of the file plugin.",
            (MIB_S,),
            member_rows("ext2", ext2_member),
            copy1,
            ratio=ext2_ratio,
        ),
        Workload(
            "compressed-first-byte",
            f"compressed {size} image: start to the first 4 KiB read",
            "Seconds from starting the server until a client has read the first 4 KiB of the "
            "decompressed image: start-up, connection, opening the export (nbdkit's gzip "
            "filter decompresses the whole file then; trionbd's reads a gzip file at "
            "start-up to index it) and the read.",
            (
                Metric("first_byte_s", "start to first byte, s", "s", False),
                Metric("ready_s", "start-up alone, s", "s", False),
            ),
            (
                gz_row,
                Row("gzip, second start with index=", gz_with_index, only_trionbd, "gzip"),
                xz_row,
                *zst_rows,
            ),
            first_byte,
        ),
        Workload(
            "compressed-nbdcopy",
            f"compressed {size} image: nbdcopy to null:, 1 connection",
            "Throughput of a whole decompressed image once the export is open (set-up on "
            "first open is not counted).",
            (MIB_S,),
            (gz_row, xz_row, *zst_rows, Row("uncompressed copy", uncompressed, ("qemu-nbd",))),
            copy1,
        ),
        Workload(
            "targz-randread-4k",
            f"tar over gzip: 4k random read, iodepth 32 ({msize} member of a .tar.gz)",
            "Random reads inside a compressed archive's member (trionbd: one checkpoint "
            "interval inflated per miss; nbdkit: the whole .tar.gz decompressed to a "
            "temporary file on first open, which is not counted).",
            (IOPS,),
            (
                Row(".tar.gz member", targz_member, ("qemu-nbd",), "gzip"),
                Row("plain copy", compressible_member, ("qemu-nbd",), "gzip"),
            ),
            opened_first(randread),
        ),
        Workload(
            "zip-randread-4k",
            f"zip filter: 4k random read, iodepth 32 ({msize} deflated member)",
            "Random reads inside a deflated zip member, after its first read made its "
            "checkpoints (nbdkit has no zip filter).",
            (IOPS,),
            (
                Row("deflated zip member", zip_member, only_trionbd, "zip"),
                Row("plain copy", compressible_member, ("qemu-nbd",), "zip"),
            ),
            opened_first(randread),
        ),
        Workload(
            "connections",
            "connections per second (connect, handshake, 4 KiB read, disconnect)",
            f"One libnbd client in a loop for {s.conn_seconds:g} s (bench/nbd_driver.py).",
            (Metric("conn_s", "conn/s", "conn/s", True),),
            (file_row,),
            connections,
        ),
        Workload(
            "startup-list",
            "start-up: until the server greets a client + nbdinfo --list",
            "Time from starting the server until it greets a client (sends NBDMAGIC), plus "
            "`nbdinfo --list --json` (which also opens every listed export); every expected "
            "name must be listed.",
            (
                Metric("ready_s", "start-up alone, s", "s", False),
                Metric("total_s", "start-up + list, s", "s", False),
                Metric("list_s", "nbdinfo --list alone, s", "s", False),
            ),
            (
                Row("plain file", plain),
                Row(
                    f"directory of {s.tar_members:,} files (file dir=), every file listed",
                    many_dir,
                    na=("qemu-nbd",),
                ),
                Row(
                    f"tar of {s.tar_members:,} members, every member listed",
                    many_tar,
                    na=("nbdkit", "qemu-nbd"),
                    requires="tar",
                ),
                Row(
                    f"ext4 image of {s.ext4_files:,} files, every file listed",
                    many_ext4,
                    na=("nbdkit", "qemu-nbd"),
                    requires="ext2",
                ),
            ),
            listing,
        ),
        Workload(
            "memory",
            f"memory: server RSS idle and with {s.clients} connected clients",
            f"VmRSS and PSS of the server's processes (summed) after start-up, then with "
            f"{s.clients} connections that finished the handshake (one libnbd process holds "
            "them).",
            (
                Metric("rss_idle_mib", "RSS idle, MiB", "MiB", False),
                Metric("rss_clients_mib", f"RSS, {s.clients} clients, MiB", "MiB", False),
                Metric("pss_idle_mib", "PSS idle, MiB", "MiB", False),
                Metric("pss_clients_mib", f"PSS, {s.clients} clients, MiB", "MiB", False),
            ),
            (file_row,),
            memory,
        ),
    ]


def _size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB} MiB"
