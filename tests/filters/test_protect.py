"""The protect filter: ranges parsed as nbdkit parses them, changes of protected bytes
refused with EPERM (and not written), writes of what is there allowed; side by side
with nbdkit's protect filter."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.filters.parity import TRY, libnbd
from tests.filters.recording import recorded
from tests.support import nbdkit_process, random_file, trionbd_exit, trionbd_process
from trionbd.chain import NBDError
from trionbd.filters.protect import END, ProtectFilter, Range, merge, parse_offset, parse_range
from trionbd.plugins.memory import MemoryPlugin

MiB = 1 << 20


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("512", 512), ("0x1bd", 0x1BD), ("0X10", 16), ("010", 8), (" 7 ", 7)],
)
def test_offsets(text: str, value: int) -> None:
    assert parse_offset(text) == value


@pytest.mark.parametrize("text", ["", "1k", "0x", "09", "-1", "1_000", str(END + 1), "x"])
def test_bad_offsets(text: str) -> None:
    with pytest.raises(ValueError, match="offset"):
        parse_offset(text)


def test_ranges() -> None:
    assert parse_range("0-0x1bd") == (Range(0, 0x1BD),)
    assert parse_range("-99") == (Range(0, 99),)
    assert parse_range("100-") == (Range(100, END),)
    assert parse_range("~100-199") == (Range(0, 99), Range(200, END))
    assert parse_range("~0-199") == (Range(200, END),)
    assert parse_range("~0-") == ()
    with pytest.raises(ValueError, match="missing"):
        parse_range("100")
    with pytest.raises(ValueError, match="ends before"):
        parse_range("200-100")
    assert merge([Range(10, 20), Range(0, 5), Range(6, 8), Range(15, 30)]) == [
        Range(0, 8),
        Range(10, 30),
    ]


async def test_changes_of_protected_bytes_are_refused() -> None:
    plugin = MemoryPlugin(MiB)
    chain, rec = recorded(
        plugin, ProtectFilter([parse_range("1000-1999"), parse_range("5000-5099")])
    )
    ctx = await chain.top.open(False, "")
    try:
        old = b"o" * 3000
        await ctx.below.pwrite(old, 0)  # type: ignore[union-attr]
        rec.calls.clear()
        await ctx.pwrite(b"n" * 1000, 0)  # unprotected: never read
        assert rec.commands() == ["pwrite"]
        rec.calls.clear()
        with pytest.raises(NBDError) as caught:
            await ctx.pwrite(b"n" * 1001, 0)  # touches byte 1000
        assert caught.value.errno == errno.EPERM
        assert rec.commands() == ["pread"]  # checked, not written
        await ctx.pwrite(b"n" * 1000 + old[1000:2500], 0)  # protected bytes unchanged
        assert await ctx.pread(3000, 0) == b"n" * 1000 + old[1000:]
        for call in (ctx.zero, ctx.trim):
            with pytest.raises(NBDError, match="protected bytes 1000-1999"):
                await call(10, 1995)
        await ctx.zero(100, 5000)  # protected but already zero
        await ctx.trim(6000, 4500)
        await ctx.pwrite(b"x" * 10, 2995)  # between the ranges
    finally:
        await ctx.close()


def test_bad_ranges_exit_with_status_2() -> None:
    for bad in ("protect=5", "protect=9-1", "protect=1k-2k"):
        result = trionbd_exit("--filter=protect", "memory", "1M", bad)
        assert result.returncode == 2, result.stderr
        assert bad in result.stderr


SCRIPT = (
    TRY
    + """
attempt("unprotected write", h.pwrite, b"u" * 512, 0)
head = h.pread(4096, 0)
attempt("same bytes", h.pwrite, head, 0)
attempt("change at 0x1bd", h.pwrite, b"c", 0x1bd)
attempt("change at 0x1be", h.pwrite, b"c", 0x1be)
attempt("zero boot code", h.zero, 512, 0)
attempt("trim partition table", h.trim, 64, 0x1be)
attempt("write inside", h.pwrite, b"p" * 65536, 1048576)
attempt("write across the end", h.pwrite, b"p" * 65536, 1048576 + 65536 - 512)
attempt("zero far", h.zero, 4096, 3 * 1048576)
print(h.pread(4096, 0)[:512] == head[:512], len(h.pread(4096, 0)))
"""
)


@pytest.mark.parametrize(
    "ranges",
    [
        ("protect=0-0x1bd",),
        ("protect=~1048576-1114111",),
        ("protect=0-0777", "protect=0x100-0x1ff", "protect=3145728-"),
        ("protect=-",),
    ],
)
def test_side_by_side_with_nbdkit(ranges: tuple[str, ...], tmp_path: Path) -> None:
    """The same answers, and the file ends up the same under each server."""
    path = tmp_path / "disk.img"
    data = random_file(path, 4 * MiB)
    results = []
    for start in (trionbd_process, nbdkit_process):
        path.write_bytes(data)
        with start("--filter=protect", "file", str(path), *ranges) as server:
            out = libnbd(server.uri, SCRIPT)
        results.append((out, path.read_bytes()))
    assert results[0] == results[1]
