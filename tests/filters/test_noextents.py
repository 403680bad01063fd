"""The noextents filter: block status says "data" everywhere, whatever the layer below
has; the bytes are unchanged. Side by side with nbdkit's noextents filter."""

from __future__ import annotations

from pathlib import Path

from tests.filters.parity import both, same_caps
from tests.support import read_export, run, sparse_file, trionbd_process
from trionbd.chain import Chain, Extent
from trionbd.filters.noextents import NoExtentsFilter
from trionbd.plugins.memory import MemoryPlugin

MiB = 1 << 20


async def test_block_status_is_all_data_over_a_sparse_layer() -> None:
    plugin = MemoryPlugin(4 * MiB)
    chain = Chain(plugin, [NoExtentsFilter()])
    ctx = await chain.top.open(False, "")
    try:
        await ctx.pwrite(b"x" * 4096, MiB)
        below = ctx.below
        assert below is not None
        assert len(await below.extents(4 * MiB, 0)) > 1  # the memory plugin knows its holes
        assert not await ctx.can_extents()
        assert await ctx.extents(4 * MiB, 0) == [Extent(0, 4 * MiB, 0)]
        assert await ctx.pread(4096, MiB) == b"x" * 4096
    finally:
        await ctx.close()


def test_map_and_bytes_match_nbdkit(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    content = sparse_file(path, 4 * MiB, [(MiB, 65536), (3 * MiB, 4096)])
    with both("--filter=noextents", "file", str(path)) as (ours, theirs):
        ours_map = run(["nbdinfo", "--map", ours.uri])
        assert ours_map == run(["nbdinfo", "--map", theirs.uri])
        assert ours_map.split() == ["0", str(4 * MiB), "0", "data"]
        assert read_export(ours.uri, tmp_path) == content
    with trionbd_process("file", str(path)) as plain:  # without the filter: holes
        assert "hole" in run(["nbdinfo", "--map", plain.uri])
    caps = same_caps(["file", str(path)], "--filter=noextents")
    assert caps["base:allocation"] is True
