"""The readonly filter: a read-only export (offered as nbdkit -r offers one), or writes
refused with EPERM while a file exists. nbdkit 1.32 has no readonly filter, so its -r
is the reference for the first mode."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.filters.parity import TRY, libnbd
from tests.plugins.test_nbd import caps
from tests.support import nbdkit_process, random_file, read_export, trionbd_process
from trionbd.chain import Chain, NBDError
from trionbd.filters.readonly import ReadonlyFilter
from trionbd.plugins.memory import MemoryPlugin

MiB = 1 << 20


async def test_without_a_file_the_export_is_read_only() -> None:
    chain = Chain(MemoryPlugin(MiB), [ReadonlyFilter()])
    ctx = await chain.top.open(False, "")
    try:
        assert ctx.below is not None and ctx.below.readonly  # opened below as -r would
        assert not await ctx.can_write()
        with pytest.raises(NBDError) as caught:
            await ctx.pwrite(b"x", 0)
        assert caught.value.errno == errno.EROFS
    finally:
        await ctx.close()


async def test_with_a_file_writes_fail_while_it_exists(tmp_path: Path) -> None:
    switch = tmp_path / "ro"
    chain = Chain(MemoryPlugin(MiB), [ReadonlyFilter(readonly_file=str(switch))])
    ctx = await chain.top.open(False, "")
    try:
        assert await ctx.can_write()
        await ctx.pwrite(b"a" * 512, 0)
        switch.touch()
        for call, args in (
            (ctx.pwrite, (b"b" * 512, 0)),
            (ctx.trim, (512, 0)),
            (ctx.zero, (512, 0)),
        ):
            with pytest.raises(NBDError, match="refused while") as caught:
                await call(*args)
            assert caught.value.errno == errno.EPERM
        await ctx.flush()
        assert await ctx.pread(512, 0) == b"a" * 512
        switch.unlink()
        await ctx.pwrite(b"c" * 512, 0)
        assert await ctx.pread(512, 0) == b"c" * 512
    finally:
        await ctx.close()


def test_offers_what_nbdkit_minus_r_offers(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = random_file(path, MiB)
    with trionbd_process("--filter=readonly", "file", str(path)) as ours:
        got = caps(ours.uri)
        assert read_export(ours.uri, tmp_path) == data
    with nbdkit_process("-r", "file", str(path)) as theirs:
        expected = caps(theirs.uri)
    del got["block_size"], expected["block_size"]  # nbdkit's file plugin advertises none
    assert got == expected
    assert got["is_read_only"] is True


def test_switching_at_run_time_with_a_real_client(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = bytearray(random_file(path, MiB))
    switch = tmp_path / "ro"
    script = (
        TRY
        + f"""
import os
attempt("before", h.pwrite, b"1" * 4096, 0)
open({str(switch)!r}, "w").close()
attempt("write", h.pwrite, b"2" * 4096, 4096)
attempt("zero", h.zero, 4096, 8192)
attempt("trim", h.trim, 4096, 8192)
print(h.pread(4096, 4096) == {bytes(data[4096:8192])!r})
os.unlink({str(switch)!r})
attempt("after", h.pwrite, b"3" * 4096, 12288)
h.flush()
"""
    )
    with trionbd_process("--filter=readonly", "file", str(path), f"readonly-file={switch}") as s:
        out = libnbd(s.uri, script)
    assert out.splitlines() == [
        "before ok",
        "write errno EPERM",
        "zero errno EPERM",
        "trim errno EPERM",
        "True",
        "after ok",
    ]
    data[0:4096] = b"1" * 4096
    data[12288:16384] = b"3" * 4096
    assert path.read_bytes() == data
