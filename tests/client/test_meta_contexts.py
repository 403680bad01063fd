"""The client's meta contexts besides ``base:allocation``: listing them, selecting them,
block status of each, against in-process trionbd servers whose plugins record what
reaches them."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import pytest

import trionbd.client as nbd
from tests.support import serving
from trionbd.chain import Chain, Extent, NBDError, Plugin
from trionbd.protocol.constants import BASE_ALLOCATION, TransmissionFlag
from trionbd.server import ServerConfig

MiB, GiB = 1 << 20, 1 << 30
BIG = 8 * GiB


class Recorder(Plugin):
    """An 8 GiB export that reads as zeroes and records the other data calls; it offers
    the metadata context 'x:runs', whose status alternates every MiB."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def get_size(self, h: Any) -> int:
        return BIG

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        return bytes(count)

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.calls.append(("pwrite", len(buf), offset, flags))

    async def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("trim", count, offset, flags))

    async def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("zero", count, offset, flags))

    async def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("cache", count, offset, flags))

    async def extents(self, h: Any, count: int, offset: int, flags: int) -> Iterable[Extent]:
        self.calls.append(("extents", count, offset))
        return [Extent(0, BIG, 0)]  # more than asked: the server clips

    async def meta_contexts(self, readonly: bool, export_name: str, is_tls: bool) -> list[str]:
        return ["x:runs"]

    async def meta_extents(
        self, h: Any, context: str, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        self.calls.append(("meta_extents", context, count, offset))
        first = offset - offset % MiB
        return [Extent(s, MiB, s // MiB % 2) for s in range(first, offset + count, MiB)]


@asynccontextmanager
async def client_of(
    target: Plugin | Chain, config: ServerConfig | None = None, **kw: Any
) -> AsyncIterator[nbd.Client]:
    async with serving(target, config) as server:
        path = server.addresses[0].unix_path
        assert path is not None
        async with await nbd.connect_unix(path, **kw) as client:
            yield client


async def test_list_meta_contexts_and_select_more_than_base_allocation() -> None:
    async with serving(Recorder()) as server:
        path = server.addresses[0].unix_path
        assert path is not None
        async with await nbd.handshake(await nbd.open_stream(server.addresses[0])) as h:
            assert await h.list_meta_contexts() == [BASE_ALLOCATION, "x:runs"]
            assert await h.list_meta_contexts("", ["x:"]) == ["x:runs"]
            assert await h.list_meta_contexts("", ["qemu:"]) == []
        wanted = ["x:runs", "y:none"]
        async with await nbd.connect_unix(path, meta_contexts=wanted) as client:
            assert client.meta_contexts == [BASE_ALLOCATION, "x:runs"]
            assert await client.block_status(3 * MiB, MiB // 2, context="x:runs") == [
                Extent(MiB // 2, MiB // 2, 0),
                Extent(MiB, MiB, 1),
                Extent(2 * MiB, MiB, 0),
                Extent(3 * MiB, MiB // 2, 1),
            ]
            with pytest.raises(NBDError) as info:
                await client.block_status(MiB, 0, context="y:none")
            assert info.value.errno == errno.EINVAL
            assert "meta context y:none was not negotiated" in info.value.message
        async with await nbd.connect_unix(path, base_allocation=False) as client:
            assert client.meta_contexts == [] and not client.can_block_status


@pytest.mark.parametrize("extended", [True, False])
async def test_block_status_of_one_context_names_it_where_the_server_allows(
    extended: bool,
) -> None:
    """With extended headers (the server then takes the payload form) a block status
    asks about its one context, and the server computes only that; with compact
    headers the server answers every selected context and the client keeps its own."""
    plugin = Recorder()
    async with client_of(plugin, extended_headers=extended, meta_contexts=["x:runs"]) as client:
        assert bool(client.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD) == extended
        runs = await client.block_status(2 * MiB, 0, context="x:runs")
        allocation = await client.block_status(2 * MiB, 0)
    assert runs == [Extent(0, MiB, 0), Extent(MiB, MiB, 1)]
    assert allocation == [Extent(0, 2 * MiB, 0)]
    both = [("extents", 2 * MiB, 0), ("meta_extents", "x:runs", 2 * MiB, 0)]
    if extended:
        assert plugin.calls == [both[1], both[0]]
    else:
        assert sorted(plugin.calls, key=str) == sorted(both * 2, key=str)
