"""The null plugin: reads zeroes, throws writes away, reports one big hole."""

from __future__ import annotations

from pathlib import Path

from tests.server.nbdclient import connect
from tests.support import random_file, run, serving, trionbd_process
from trionbd.plugins.null import NullPlugin
from trionbd.protocol import Cmd, CmdFlag, HoleChunk, TransmissionFlag
from trionbd.protocol.constants import State

MiB = 1 << 20
TF = TransmissionFlag


async def test_writes_vanish_and_reads_are_holes() -> None:
    async with serving(NullPlugin(MiB)) as server:
        c = await connect(server)
        await c.go(meta=True)
        assert c.size == MiB
        assert c.flags == (
            TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES
            | TF.SEND_DF | TF.CAN_MULTI_CONN | TF.SEND_FAST_ZERO
        )  # fmt: skip
        await c.write(0, b"gone" * 1024, CmdFlag.FUA)
        for command, flags in [
            (Cmd.TRIM, 0),
            (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
            (Cmd.FLUSH, 0),
        ]:
            assert await c.error(command, 0, 0 if command == Cmd.FLUSH else 4096, flags) == 0
        events = await c.request(Cmd.READ, 0, 4096)
        assert events == [HoleChunk(events[0].cookie, 0, 4096, True)]  # type: ignore[union-attr]
        assert await c.read(0, 4096, CmdFlag.DF) == bytes(4096)
        [status] = await c.request(Cmd.BLOCK_STATUS, 4096, MiB - 4096)
        assert status.extents == ((MiB - 4096, State.HOLE | State.ZERO),)  # type: ignore[union-attr]


async def test_default_size_is_zero() -> None:
    async with serving(NullPlugin()) as server:
        c = await connect(server)
        await c.go()
        assert c.size == 0
        assert await c.error(Cmd.READ, 0, 1) != 0


def test_as_a_sink_and_a_source_for_real_clients(tmp_path: Path) -> None:
    random_file(tmp_path / "src.img", 3 * MiB)
    with trionbd_process("null", "4M") as server:
        assert run(["nbdinfo", "--size", server.uri]).strip() == str(4 * MiB)
        run(["nbdcopy", str(tmp_path / "src.img"), server.uri])
        run(["nbdcopy", server.uri, str(tmp_path / "zeroes.img")])
        run(["qemu-io", "-f", "raw", "-c", "read -P 0 0 4M", server.uri])
    assert (tmp_path / "zeroes.img").read_bytes() == bytes(4 * MiB)
    with trionbd_process("null") as server:
        assert run(["nbdinfo", "--size", server.uri]).strip() == "0"
