"""ClientContext: a client in transmission as a chain context (``Next``), against
in-process trionbd servers."""

from __future__ import annotations

from typing import Any

import pytest

import trionbd.client as nbd
from tests.client.test_meta_contexts import GiB, MiB, Recorder, client_of
from trionbd.chain import Chain, Extent, Filter, Plugin
from trionbd.chain.layer import LayerContext
from trionbd.client.context import COMPACT_PIECE
from trionbd.plugins.memory import MemoryPlugin
from trionbd.plugins.pattern import PatternPlugin
from trionbd.protocol.constants import CmdFlag, TransmissionFlag
from trionbd.server import ServerConfig
from trionbd.server.handshake import transmission_flags

# --- capabilities --------------------------------------------------------------------------


class ReadOnly(Plugin):
    name = "readonly"

    async def get_size(self, h: Any) -> int:
        return MiB

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        return bytes(count)


@pytest.mark.parametrize(
    ("make", "readonly"),
    [
        (lambda: MemoryPlugin(size=64 * MiB), False),
        (lambda: MemoryPlugin(size=64 * MiB), True),
        (lambda: PatternPlugin(size=MiB), False),
        (ReadOnly, False),
        (Recorder, False),
    ],
    ids=["memory", "memory -r", "pattern", "pread only", "recorder"],
)
async def test_capabilities_are_what_the_server_advertised(make: Any, readonly: bool) -> None:
    """The server's capabilities, advertised as transmission flags and read back by the
    client context, give the same flags again (emulated ones are native over the wire)."""
    chain = Chain(make())
    served: LayerContext = await chain.top.open(readonly, "")
    async with client_of(chain, ServerConfig(readonly=readonly)) as client:
        ctx = nbd.ClientContext(client)
        caps, want = ctx.caps, served.caps
        assert caps is not None and want is not None
        assert transmission_flags(caps) == transmission_flags(want)
        assert (caps.size, caps.block_size) == (want.size, want.block_size)
        assert caps.extents  # the server offers base:allocation for every export
        assert await ctx.can_write() == (not readonly and want.write)
        assert await ctx.get_size() == want.size
        assert ctx.export_name == "" and ctx.name == client.peer
    await served.close()


# --- what a context promises that the protocol does not ------------------------------------


@pytest.mark.parametrize("extended", [True, False])
async def test_long_trims_zeroes_and_caches_and_block_status_fit_the_headers(
    extended: bool,
) -> None:
    """With extended headers a 5 GiB trim, zero or cache is one request; with compact
    headers it goes in pieces of 2 GiB, and block status asks about 2 GiB at most."""
    plugin = Recorder()
    async with client_of(plugin, extended_headers=extended) as client:
        ctx = nbd.ClientContext(client)
        await ctx.trim(5 * GiB, GiB)
        await ctx.zero(5 * GiB, GiB, CmdFlag.NO_HOLE)
        await ctx.cache(5 * GiB, GiB)
        extents = await ctx.extents(5 * GiB, GiB)
    pieces = [(5 * GiB, GiB)] if extended else [(2 * GiB, GiB), (2 * GiB, 3 * GiB), (GiB, 5 * GiB)]
    expected: list[tuple[Any, ...]] = []
    for name, flags in (("trim", 0), ("zero", CmdFlag.NO_HOLE), ("cache", 0)):
        expected += [(name, n, offset, flags) for n, offset in pieces]
    assert plugin.calls[: len(expected)] == expected
    asked = 5 * GiB if extended else COMPACT_PIECE
    assert plugin.calls[len(expected) :] == [("extents", asked, GiB)]
    assert extents == [Extent(GiB, asked, 0)]  # clipped to the range asked


async def test_a_read_with_df_works_where_the_server_does_not_offer_it() -> None:
    async with client_of(MemoryPlugin(size=MiB), structured_replies=False) as client:
        assert not client.flags & TransmissionFlag.SEND_DF
        with pytest.raises(nbd.RequestError):
            await client.pread(512, 0, CmdFlag.DF)  # the server refuses the flag
        ctx = nbd.ClientContext(client)
        assert await ctx.pread(512, 0, CmdFlag.DF) == bytes(512)
        # No block status without structured replies: all data, as a context says.
        assert not await ctx.can_extents()
        assert await ctx.extents(4096, 0) == [Extent(0, 4096, 0)]


async def test_a_client_context_under_a_filter_and_closed_by_it() -> None:
    """A filter whose ``next`` is a client context: reads, writes and close go through."""
    async with client_of(MemoryPlugin(size=MiB)) as client:
        ctx = nbd.ClientContext(client)
        await Filter().pwrite(ctx, None, b"through", 4096, 0)
        assert await Filter().pread(ctx, None, 7, 4096, 0) == b"through"
        await ctx.close()
        assert client.failure is not None  # closed
        with pytest.raises(nbd.ConnectionFailed):
            await ctx.pread(1, 0)


async def test_meta_extents_are_clipped_to_the_range() -> None:
    async with client_of(Recorder(), meta_contexts=["x:runs"]) as client:
        ctx = nbd.ClientContext(client)
        assert await ctx.meta_extents("x:runs", 3 * MiB, MiB // 2) == [
            Extent(MiB // 2, MiB // 2, 0),
            Extent(MiB, MiB, 1),
            Extent(2 * MiB, MiB, 0),
            Extent(3 * MiB, MiB // 2, 1),
        ]
        assert await ctx.meta_extents("x:runs", 3 * MiB, MiB // 2, CmdFlag.REQ_ONE) == [
            Extent(MiB // 2, MiB // 2, 0)
        ]
