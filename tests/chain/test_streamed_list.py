"""Export lists streamed from an async iterable (``list_exports`` returning one, as the s3
plugin does with ListObjectsV2 pages): names reach the client while the plugin is still
producing them, filters that map or collect lists handle them, and a list that fails
half-way ends with an error reply on a connection that goes on."""

from __future__ import annotations

import errno
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from tests.chain.raw_client import RawClient
from tests.support import listing, trionbd_process
from trionbd.chain import Export, NBDError, Param, Plugin, parse_int
from trionbd.protocol.constants import REP_FLAG_ERROR, Opt, Rep

PLUGIN = "tests.chain.test_streamed_list:Streamed"


class Streamed(Plugin):
    """Lists ``count`` names one by one (a checkpoint between them). After ``pause``
    names it waits until the file ``gate`` exists; after ``fail`` names it raises."""

    name = "streamed"
    params = (
        Param("count", "names listed", parse_int, required=True),
        Param("pause", "names listed before waiting for the gate file", parse_int),
        Param("gate", "the file whose existence lets the list go on"),
        Param("fail", "names listed before the list fails", parse_int),
    )

    def __init__(self, count: int, pause: int = -1, gate: str = "", fail: int = -1) -> None:
        self.count, self.pause, self.gate, self.fail = count, pause, gate, fail

    async def list_exports(self, readonly: bool, is_tls: bool) -> AsyncIterator[Export]:
        return self._names()

    async def _names(self) -> AsyncIterator[Export]:
        for i in range(self.count):
            if i == self.pause:
                # The gate is made by another process: polling is the only way to know.
                while not await trio.Path(self.gate).exists():  # noqa: ASYNC110
                    await trio.sleep(0.01)
            if i == self.fail:
                raise NBDError(errno.EIO, "the listing broke down")
            await trio.lowlevel.checkpoint()
            yield Export(f"name-{i:05d}", f"number {i}")

    async def default_export(self, readonly: bool, is_tls: bool) -> str:
        return "name-00000"

    async def get_size(self, h: Any) -> int:
        return 512

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        return bytes(count)


def names(count: int) -> list[str]:
    return [f"name-{i:05d}" for i in range(count)]


def test_names_reach_the_client_before_the_list_is_complete(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with trionbd_process(PLUGIN, "count=3000", "pause=1500", f"gate={gate}") as server:
        with RawClient(server.socket) as client:
            client.send(client.proto.option(Opt.LIST))
            # The server sends 512 names a write: the first 1024 are due before the
            # plugin pauses, so they arrive while the list is unfinished.
            first = [client.event() for _ in range(1024)]
            assert all(r.reply == Rep.SERVER for r in first)  # type: ignore[union-attr]
            gate.touch()
            rest = [client.event() for _ in range(3000 - 1024 + 1)]
            assert rest[-1].reply == Rep.ACK  # type: ignore[union-attr]
            got = [
                r.payload[4 : 4 + struct.unpack_from(">I", r.payload)[0]].decode()  # type: ignore[union-attr]
                for r in first + rest[:-1]
            ]
            assert got == names(3000)
            assert client.info("name-02999").size == 512


def test_nbdinfo_lists_a_streamed_list_with_descriptions() -> None:
    with trionbd_process(PLUGIN, "count=2000") as server:
        exports = listing(server.uri)
    assert [e["export-name"] for e in exports] == names(2000)
    assert exports[1999]["description"] == "number 1999"


def test_filters_over_a_streamed_list(tmp_path: Path) -> None:
    log = tmp_path / "log"
    chains = [
        ("--filter=exportname", "exportdesc=fixed:same", "same"),
        ("--filter=log", f"logfile={log}", "number 2"),
    ]
    for option, param, description in chains:
        with trionbd_process(option, PLUGIN, "count=300", param) as server:
            exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == names(300)
        assert exports[2]["description"] == description
    assert "name-00299" in log.read_text()


def test_a_list_failing_half_way_ends_with_an_error_and_the_connection_goes_on() -> None:
    with trionbd_process(PLUGIN, "count=2000", "fail=1200") as server:
        with RawClient(server.socket) as client:
            replies = client.option(Opt.LIST)
            assert all(r.reply == Rep.SERVER for r in replies[:-1])
            assert replies[-1].reply & REP_FLAG_ERROR
            assert b"the listing broke down" in replies[-1].payload
            assert client.info("name-00007").size == 512  # the same connection goes on
        result = subprocess.run(
            ["nbdinfo", "--list", server.uri], capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0
        assert "error to list request" in result.stderr
