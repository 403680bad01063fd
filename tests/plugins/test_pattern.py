"""The pattern plugin: every 8-byte word holds its own offset, big-endian."""

from __future__ import annotations

import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.server.nbdclient import connect
from tests.support import run, serving, trionbd_process
from trionbd.chain.params import MAX_SIZE
from trionbd.plugins.pattern import PatternPlugin, pattern_bytes
from trionbd.protocol import Cmd, TransmissionFlag

MiB = 1 << 20
TF = TransmissionFlag


def reference(count: int, offset: int) -> bytes:
    """The pattern computed the slow, obvious way."""
    first = offset // 8 * 8
    words = b"".join(struct.pack(">Q", w) for w in range(first, offset + count + 8, 8))
    return words[offset - first : offset - first + count]


@given(st.integers(0, MAX_SIZE - 1), st.integers(0, 5000))
@settings(max_examples=300, deadline=None)
def test_pattern_bytes_match_the_definition(offset: int, count: int) -> None:
    count = min(count, MAX_SIZE - offset)
    assert pattern_bytes(count, offset) == reference(count, offset)


def test_pattern_examples() -> None:
    assert pattern_bytes(16, 0) == bytes(8) + b"\0\0\0\0\0\0\0\x08"
    assert pattern_bytes(3, 13) == b"\0\0\x08"
    # The last 8 bytes of the largest disk straddle the words 2^63-16 and 2^63-8.
    assert pattern_bytes(8, MAX_SIZE - 8) == b"\xf0" + b"\x7f" + b"\xff" * 6


async def test_served_read_only_with_the_pattern() -> None:
    async with serving(PatternPlugin(MAX_SIZE)) as server:
        c = await connect(server)
        await c.go()
        assert c.flags == TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_DF | TF.CAN_MULTI_CONN
        for offset, count in [(0, 4096), (3, 1000), (MAX_SIZE - 4097, 4097), (1 << 62, 9)]:
            assert await c.read(offset, count) == reference(count, offset)
        assert await c.error(Cmd.WRITE, 0, 1, data=b"x") != 0


def test_same_bytes_as_nbdkit_pattern(tmp_path: Path) -> None:
    size = 2 * MiB + 24
    with trionbd_process("pattern", str(size)) as server:
        run(["nbdcopy", server.uri, str(tmp_path / "ours.img")])
    run(["nbdkit", "-U", "-", "pattern", f"size={size}", "--run",
         f"nbdcopy $uri {tmp_path / 'nbdkit.img'}"])  # fmt: skip
    ours = (tmp_path / "ours.img").read_bytes()
    assert ours == (tmp_path / "nbdkit.img").read_bytes()
    assert ours == reference(size, 0)
