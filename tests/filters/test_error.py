"""The error filter: real clients receive the injected errors, per command, switched by
a trigger file at run time; rates parse like nbdkit's; a seed makes rates repeatable."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import SYSTEM_PYTHON, random_file, run, trionbd_process
from trionbd.chain import Chain, ConfigError, NBDError
from trionbd.filters.error import ErrorFilter, parse_error, parse_rate
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import CmdFlag


def test_nbdcopy_reports_the_error_until_the_trigger_file_goes(tmp_path: Path) -> None:
    data = random_file(tmp_path / "disk.img", 2 * 1024 * 1024 + 4096)
    inject = tmp_path / "inject"
    inject.touch()
    copy = tmp_path / "copy.img"
    args = ["--filter=error", "file", str(tmp_path / "disk.img"), "error-pread-rate=100%"]
    with trionbd_process(*args, f"error-file={inject}") as s:
        failed = subprocess.run(
            ["nbdcopy", s.uri, str(copy)], capture_output=True, text=True, timeout=120
        )
        assert failed.returncode != 0
        assert "Input/output error" in failed.stderr, failed.stderr
        inject.unlink()
        run(["nbdcopy", s.uri, str(copy)])
        assert copy.read_bytes() == data
        assert "error: injecting EIO error into pread" in s.stderr


def test_nbdcopy_writing_gets_the_chosen_error(tmp_path: Path) -> None:
    random_file(tmp_path / "src.img", 1024 * 1024)
    with trionbd_process(
        "--filter=error", "memory", "1M", "error=ENOSPC", "error-pwrite-rate=1"
    ) as s:
        failed = subprocess.run(
            ["nbdcopy", str(tmp_path / "src.img"), s.uri],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert failed.returncode != 0
    assert "No space left on device" in failed.stderr, failed.stderr


# Each command once; prints the errno name each one got ("ok" for success).
EVERY_COMMAND = """
import errno, nbd, os, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
calls = [
    ("pread", lambda: h.pread(512, 0)),
    ("pwrite", lambda: h.pwrite(b"x" * 512, 0)),
    ("trim", lambda: h.trim(512, 0)),
    ("zero", lambda: h.zero(512, 0)),
    ("extents", lambda: h.block_status(512, 0, lambda *a: 0)),
    ("flush", lambda: h.flush()),
]
for name, call in calls:
    try:
        call()
        print(name, "ok")
    except nbd.Error as e:
        print(name, errno.errorcode[e.errnum])
h.shutdown()
"""


def every_command(uri: str) -> dict[str, str]:
    out = run([SYSTEM_PYTHON, "-c", EVERY_COMMAND, uri])
    return dict(line.split() for line in out.splitlines())


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ((), dict.fromkeys(["pread", "pwrite", "trim", "zero", "extents", "flush"], "ok")),
        (
            ("error-rate=1",),
            dict.fromkeys(["pread", "pwrite", "trim", "zero", "extents", "flush"], "EIO"),
        ),
        (
            ("error=EPERM", "error-rate=1", "error-zero=ENOSPC", "error-flush-rate=0"),
            {
                "pread": "EPERM",
                "pwrite": "EPERM",
                "trim": "EPERM",
                "zero": "ENOSPC",
                "extents": "EPERM",
                "flush": "ok",
            },
        ),
        (
            ("error-trim-rate=100%", "error-extents-rate=1", "error-extents=ENOMEM"),
            {
                "pread": "ok",
                "pwrite": "ok",
                "trim": "EIO",
                "zero": "ok",
                "extents": "ENOMEM",
                "flush": "ok",
            },
        ),
        (
            ("error-flush-rate=1", "error-flush=ESHUTDOWN", "error-pread-rate=1"),
            {
                "pread": "EIO",
                "pwrite": "ok",
                "trim": "ok",
                "zero": "ok",
                "extents": "ok",
                "flush": "ESHUTDOWN",
            },
        ),
    ],
)
def test_per_command_settings(params: tuple[str, ...], expected: dict[str, str]) -> None:
    with trionbd_process("--filter=error", "memory", "1M", *params) as s:
        assert every_command(s.uri) == expected


def test_per_command_trigger_files_switch_at_run_time(tmp_path: Path) -> None:
    reads, writes = tmp_path / "reads", tmp_path / "writes"
    script = f"""
import errno, nbd, os, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
def attempt():
    out = []
    for call in (lambda: h.pread(512, 0), lambda: h.pwrite(b"x" * 512, 0)):
        try:
            call()
            out.append("ok")
        except nbd.Error as e:
            out.append(errno.errorcode[e.errnum])
    print(" ".join(out))
attempt()
open({str(reads)!r}, "w").close()
attempt()
open({str(writes)!r}, "w").close()
attempt()
os.unlink({str(reads)!r})
attempt()
h.shutdown()
"""
    args = ["--filter=error", "memory", "1M", "error-rate=1", "error-pwrite=EINVAL"]
    args += [f"error-pread-file={reads}", f"error-pwrite-file={writes}"]
    with trionbd_process(*args) as s:
        out = run([SYSTEM_PYTHON, "-c", script, s.uri])
    assert out.splitlines() == ["ok ok", "EIO ok", "EIO EINVAL", "ok EINVAL"]


def test_bad_parameters_exit_with_status_2(tmp_path: Path) -> None:
    for param, message in [
        ("error=EBADF", "unknown error name 'EBADF'"),
        ("error-rate=101%", "out of range"),
        ("error-zero-rate=1.5", "out of range"),
        ("error-rate=often", "is not a rate"),
    ]:
        cmd = [sys.executable, "-m", "trionbd", "-f", "-U", str(tmp_path / "sock")]
        result = subprocess.run(
            [*cmd, "--filter=error", "memory", "1M", param],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and param in result.stderr


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("0", 0.0),
        ("1", 1.0),
        ("0.25", 0.25),
        (".5", 0.5),
        ("1e-1", 0.1),
        ("10%", 0.1),
        ("100%", 1.0),
        ("0%", 0.0),
        ("12.5%", 0.125),
    ],
)
def test_parse_rate(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["", "-0.1", "1.01", "101%", "10%%", "%", "abc", "0.5x"])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


def test_error_names() -> None:
    assert parse_error("ENOSPC") == errno.ENOSPC
    assert parse_error("ENOTSUP") == errno.ENOTSUP
    with pytest.raises(ValueError, match="unknown error name 'eio'"):
        parse_error("eio")


def fails(f: ErrorFilter, n: int) -> list[bool]:
    out = []
    for _ in range(n):
        try:
            f.inject("pread")
            out.append(False)
        except NBDError:
            out.append(True)
    return out


def test_a_seed_makes_a_rate_repeatable() -> None:
    one = fails(ErrorFilter.from_params([("error-rate", "30%"), ("error-seed", "7")]), 2000)
    again = fails(ErrorFilter.from_params([("error-rate", "30%"), ("error-seed", "7")]), 2000)
    other = fails(ErrorFilter.from_params([("error-rate", "30%"), ("error-seed", "8")]), 2000)
    assert one == again
    assert one != other
    assert 500 < sum(one) < 700  # about 30% of 2000


def test_rates_0_and_1_are_certain() -> None:
    assert not any(fails(ErrorFilter(error_rate=0.0), 1000))
    assert all(fails(ErrorFilter(error_rate=1.0), 1000))


async def test_injected_error_reaches_the_caller_with_its_errno() -> None:
    chain = Chain(MemoryPlugin(size=1 << 20), [ErrorFilter(error=errno.ENOTSUP, error_rate=1)])
    ctx = await chain.top.open(False, "", False)
    try:
        with pytest.raises(NBDError) as caught:
            await ctx.zero(512, 0, CmdFlag.FAST_ZERO)
        assert caught.value.errno == errno.ENOTSUP
        assert "injecting ENOTSUP error into zero" in caught.value.message
    finally:
        await ctx.close()


def test_unknown_parameters_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown parameter 'error-bogus'"):
        ErrorFilter.from_params([("error-bogus", "1")])
