"""The log filter: nbdkit's log format, line for line, with real clients."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import SYSTEM_PYTHON, libnbd_python, run, trionbd_process
from trionbd.chain import NBDError
from trionbd.filters.log import error_name, shell_quote
from trionbd.protocol.constants import CmdFlag

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}) (.*)$")

# One client doing every kind of request at known places; the zero at 0x10000 runs while
# the error filter's trigger file exists and fails with ENOSPC.
SEQUENCE = """
import nbd, os, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
inject = sys.argv[2]
h.pread(512, 0)
h.pwrite(b"x" * 4096, 4096)
h.pwrite(b"y" * 512, 0x10200, nbd.CMD_FLAG_FUA)
h.trim(4096, 8192, nbd.CMD_FLAG_FUA)
open(inject, "w").close()
try:
    h.zero(4096, 0x10000)
    raise SystemExit("the injected error did not arrive")
except nbd.Error as e:
    assert e.errnum == 28, e
os.unlink(inject)
h.zero(4096, 0x10000, nbd.CMD_FLAG_NO_HOLE)
h.zero(8192, 0x20000, nbd.CMD_FLAG_FUA)
h.flush()
h.cache(4096, 0)
seen = []
h.block_status(0x40000, 0, lambda ctx, off, ents, err: seen.extend(ents))
h.shutdown()
print(" ".join(map(str, seen)))
"""

# What the log shows for SEQUENCE on a 1 MiB file whose only data is 64 KiB at 0x30000.
EXPECTED_REQUESTS = [
    "connection=1 Read id=1 offset=0x0 count=0x200 ...",
    "connection=1 ...Read id=1 return=0",
    "connection=1 Write id=2 offset=0x1000 count=0x1000 fua=0 ...",
    "connection=1 ...Write id=2 return=0",
    "connection=1 Write id=3 offset=0x10200 count=0x200 fua=1 ...",
    "connection=1 ...Write id=3 return=0",
    "connection=1 Trim id=4 offset=0x2000 count=0x1000 fua=1 ...",
    "connection=1 ...Trim id=4 return=0",
    "connection=1 Zero id=5 offset=0x10000 count=0x1000 trim=1 fua=0 fast=0 ...",
    "connection=1 ...Zero id=5 return=-1 error=ENOSPC",
    "connection=1 Zero id=6 offset=0x10000 count=0x1000 trim=0 fua=0 fast=0 ...",
    "connection=1 ...Zero id=6 return=0",
    "connection=1 Zero id=7 offset=0x20000 count=0x2000 trim=1 fua=1 fast=0 ...",
    "connection=1 ...Zero id=7 return=0",
    "connection=1 Flush id=8 ...",
    "connection=1 ...Flush id=8 return=0",
    "connection=1 Cache id=9 offset=0x0 count=0x1000 ...",
    "connection=1 ...Cache id=9 return=0",
    "connection=1 Extents id=10 offset=0x0 count=0x40000 req_one=0 ...",
]
CONNECT_FIELDS = (
    "connection export tls size minsize prefsize maxsize write flush rotational trim zero fua "
    "extents cache fast_zero"
).split()


def events(path: Path) -> list[str]:
    """The log's lines without their timestamps (each must have one)."""
    out = []
    for line in path.read_text().splitlines():
        m = STAMP.match(line)
        assert m, f"line without a timestamp: {line!r}"
        out.append(m.group(2))
    return out


def fields(line: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


def sparse_disk(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(1 << 20)
        f.seek(0x30000)
        f.write(b"z" * 0x10000)


def extents_reply(entries: list[int]) -> str:
    """The ``...Extents`` reply fields for block status entries (length, flags, ...)."""
    items, pos = [], 0
    for length, flags in zip(entries[::2], entries[1::2], strict=True):
        kind = ",".join(n for bit, n in ((1, "hole"), (2, "zero")) if flags & bit)
        items.append(f'0x{pos:x} 0x{length:x} "{kind}"')
        pos += length
    return f"extents=({' '.join(items)}) return=0"


def check_session(lines: list[str], block_status: str) -> None:
    """``lines`` (after Ready) are exactly SEQUENCE's connection."""
    connect, *requests, disconnect = lines
    assert connect.startswith("connection=1 Connect ")
    assert list(fields(connect)) == CONNECT_FIELDS
    c = fields(connect)
    assert (c["export"], c["tls"], c["size"], c["write"], c["extents"]) == (
        '""',
        "0",
        "0x100000",
        "1",
        "1",
    )
    entries = [int(n) for n in block_status.split()]
    expected = [*EXPECTED_REQUESTS, f"connection=1 ...Extents id=10 {extents_reply(entries)}"]
    assert requests == expected
    assert disconnect == "connection=1 Disconnect transactions=10"


def test_log_lines_match_nbdkit_line_for_line(tmp_path: Path) -> None:
    script = tmp_path / "sequence.py"
    script.write_text(SEQUENCE)
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    sparse_disk(ours)
    sparse_disk(theirs)
    inject = tmp_path / "inject"
    chain = ["--filter=log", "--filter=error"]
    errors = ["error=ENOSPC", "error-zero-rate=1", f"error-zero-file={inject}"]

    with trionbd_process(*chain, "file", str(ours), f"logfile={tmp_path}/ours.log", *errors) as s:
        our_status = run([SYSTEM_PYTHON, str(script), s.uri, str(inject)]).strip()
    run(
        [
            "nbdkit",
            "-U",
            "-",
            *chain,
            "file",
            str(theirs),
            f"logfile={tmp_path}/theirs.log",
            *errors,
            "--run",
            f'{SYSTEM_PYTHON} {script} "$uri" {inject}',
        ]
    )
    our_lines = events(tmp_path / "ours.log")
    # nbdkit also logs Fork and Preconnect, which trionbd has no equivalent for.
    their_lines = [
        line
        for line in events(tmp_path / "theirs.log")
        if line != "Fork" and "Preconnect" not in line
    ]
    assert our_lines[0] == "Ready thread_model=3" == their_lines[0]
    check_session(our_lines[1:], our_status)
    check_session(their_lines[1:], our_status)
    # Same capabilities as nbdkit's file plugin, except block size limits (nbdkit writes
    # 0 for "no constraints", trionbd the limits it advertises) and fast zero support.
    ours_c, theirs_c = fields(our_lines[1]), fields(their_lines[1])
    for key in ("minsize", "prefsize", "maxsize", "fast_zero"):
        del ours_c[key], theirs_c[key]
    assert ours_c == theirs_c


def test_concurrent_requests_get_one_call_and_one_reply_line_each(tmp_path: Path) -> None:
    """With a delay below the log, pipelined reads are in flight together, yet each id
    has exactly one call line and, after it, one reply line."""
    log = tmp_path / "log"
    with trionbd_process(
        "--filter=log", "--filter=delay", "memory", "1M", f"logfile={log}", "rdelay=50ms"
    ) as s:
        libnbd_python(
            f"""
import nbd
h = nbd.NBD()
h.connect_uri({s.uri!r})
bufs = [nbd.Buffer(512) for _ in range(32)]
cookies = [h.aio_pread(b, 512 * i) for i, b in enumerate(bufs)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
h.shutdown()
"""
        )
    lines = events(log)[2:-1]  # after Ready and Connect, before Disconnect
    calls = [i for i, line in enumerate(lines) if line.endswith(" ...")]
    assert len(lines) == 64 and len(calls) == 32
    first_reply = min(i for i in range(64) if i not in calls)
    assert first_reply >= 2, "the reads were not in flight together"
    position: dict[int, int] = {}
    offsets = set()
    for i, line in enumerate(lines):
        m = re.fullmatch(
            r"connection=1 Read id=(\d+) offset=0x([0-9a-f]+) count=0x200 \.\.\.", line
        )
        if m:
            # Requests served by tasks may start in any order (Trio does not promise
            # FIFO), so ids need not follow offsets; each read appears exactly once.
            offsets.add(int(m.group(2), 16))
            position[int(m.group(1))] = i
        else:
            m = re.fullmatch(r"connection=1 \.\.\.Read id=(\d+) return=0", line)
            assert m, line
            assert position.pop(int(m.group(1))) < i
    assert not position
    assert offsets == {512 * i for i in range(32)}
    assert events(log)[-1] == "connection=1 Disconnect transactions=32"


def test_connections_are_numbered_and_ids_restart(tmp_path: Path) -> None:
    log = tmp_path / "log"
    read_twice = "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
    read_twice += "h.pread(1, 0)\nh.pread(1, 1)\nh.shutdown()\n"
    with trionbd_process("--filter=log", "memory", "1M", f"logfile={log}") as s:
        run([SYSTEM_PYTHON, "-c", read_twice, s.uri])
        run([SYSTEM_PYTHON, "-c", read_twice, s.uri])
    ids = [(f["connection"], f.get("id")) for f in map(fields, events(log)[1:])]
    assert ids == [
        ("1", None),
        ("1", "1"),
        ("1", "1"),
        ("1", "2"),
        ("1", "2"),
        ("1", None),
        ("2", None),
        ("2", "1"),
        ("2", "1"),
        ("2", "2"),
        ("2", "2"),
        ("2", None),
    ]


def test_export_list_and_quoted_names(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "plain.img").write_bytes(bytes(1024))
    (exports / 'my "disk" $1.img').write_bytes(bytes(2048))
    log = tmp_path / "log"
    with trionbd_process("--filter=log", "file", f"dir={exports}", f"logfile={log}") as s:
        run(["nbdinfo", "--list", s.uri])
    lines = events(log)
    assert lines[1:3] == [
        "ListExports id=1 readonly=0 tls=0 ...",
        r'...ListExports id=1 exports=("my \"disk\" \$1.img" plain.img) return=0',
    ]
    connects = [line for line in lines if " Connect " in line]
    assert [fields(c)["size"] for c in connects] == ["0x800", "0x400"]
    assert r'export="my \"disk\" \$1.img" tls=0' in connects[0]
    assert "export=plain.img tls=0" in connects[1]


def test_logappend(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("2000-01-01 00:00:00.000000 from before\n")
    with trionbd_process("--filter=log", "memory", "1M", f"logfile={log}", "logappend=true") as s:
        run(["nbdinfo", "--size", s.uri])
    with trionbd_process("--filter=log", "memory", "1M", f"logfile={log}", "logappend=true") as s:
        run(["nbdinfo", "--size", s.uri])
    lines = events(log)
    assert lines[0] == "from before"
    assert lines.count("Ready thread_model=3") == 2
    assert len([line for line in lines if "Disconnect" in line]) == 2

    with trionbd_process("--filter=log", "memory", "1M", f"logfile={log}") as s:
        run(["nbdinfo", "--size", s.uri])
    lines = events(log)
    assert lines[0] == "Ready thread_model=3"
    assert len([line for line in lines if "Disconnect" in line]) == 1


def test_without_logfile_the_log_goes_to_stderr() -> None:
    with trionbd_process("--filter=log", "memory", "1M") as s:
        run(["nbdinfo", "--size", s.uri])
        deadline = time.monotonic() + 30
        while "Disconnect" not in s.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        stderr = s.stderr
    stamped = [STAMP.match(line) for line in stderr.splitlines()]
    lines = [m.group(2) for m in stamped if m]
    assert lines[0] == "Ready thread_model=3"
    assert lines[1].startswith("connection=1 Connect export=")
    assert lines[-1] == "connection=1 Disconnect transactions=0"


def test_a_full_disk_does_not_fail_requests() -> None:
    with trionbd_process("--filter=log", "memory", "1M", "logfile=/dev/full") as s:
        for _ in range(3):
            assert run(["nbdinfo", "--size", s.uri]).strip() == str(1 << 20)
        stderr = s.stderr
    message = "log: cannot write to /dev/full: No space left on device"
    assert stderr.count(message) == 1


def test_an_unwritable_logfile_stops_startup(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "log"
    cmd = [sys.executable, "-m", "trionbd", "-f", "-U", str(tmp_path / "sock")]
    cmd += ["--filter=log", "memory", "1M", f"logfile={path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"log: cannot open logfile {path}: No such file or directory" in result.stderr


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("disk.img", "disk.img"),
        ("a/b-c_d=e,f:g.1", "a/b-c_d=e,f:g.1"),
        ("", '""'),
        ("two words", '"two words"'),
        ('q"$`\\', r'"q\"\$\`\\"'),
        ("é", '"é"'),
        ("line\nbreak\x7f", r'"line\x0abreak\x7f"'),
    ],
)
def test_shell_quote(name: str, quoted: str) -> None:
    assert shell_quote(name) == quoted


def test_error_names_are_what_the_client_receives() -> None:
    assert error_name(NBDError(errno.EROFS, "ro"), 0) == "EPERM"
    assert error_name(NBDError(errno.EDQUOT, "quota"), 0) == "ENOSPC"
    assert error_name(NBDError(errno.ENOTSUP, "no"), 0) == "EINVAL"
    assert error_name(NBDError(errno.ENOTSUP, "no"), CmdFlag.FAST_ZERO) == "ENOTSUP"
    assert error_name(NBDError(errno.ENOENT, "gone"), 0) == "EINVAL"
    assert error_name(OSError(errno.EIO, "disk"), 0) == "EIO"
    assert error_name(ValueError("bug"), 0) == "EIO"
