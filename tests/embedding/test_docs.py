"""The docs cannot rot: the README's Embedding section (docs/embedding.md) runs as pasted,
the example plugin and filter of docs/plugins.md are the modules of the example package
and do what the page says, every Python block there at least compiles, and the complete
examples pass ``mypy --strict`` against the installed package (``py.typed``)."""

from __future__ import annotations

import ast
import errno
import os
import random
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import trio

import trionbd
from tests.support import HANG_GUARD, ROOT, short_tmpdir
from trionbd.plugins.memory import MemoryPlugin

DOCS = ROOT / "docs"
EXAMPLE = ROOT / "examples" / "trionbd-example"
KiB = 1024
MiB = 1024 * KiB
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def section(text: str, heading: str) -> str:
    """The lines from ``heading`` up to the next heading of the same level."""
    start = text.index(f"\n{heading}\n") + 1
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)].strip("\n") + "\n"


def example_blocks() -> dict[str, str]:
    """The blocks of docs/plugins.md that are files of the example package: those whose
    first line is ``# examples/...``, by path, without that line."""
    text = (DOCS / "plugins.md").read_text()
    out = {}
    for body in code_blocks(text, "python") + code_blocks(text, "toml"):
        first, _, rest = body.partition("\n")
        if first.startswith("# examples/"):
            out[first[2:]] = rest
    return out


def load_block(path: str) -> types.ModuleType:
    """Run the docs' code for ``path`` as a module."""
    module = types.ModuleType(Path(path).stem + "_from_docs")
    exec(compile(example_blocks()[path], f"docs/plugins.md ({path})", "exec"), module.__dict__)
    return module


PLUGIN = "examples/trionbd-example/src/trionbd_example/plugin.py"
FILTER = "examples/trionbd-example/src/trionbd_example/filter.py"
PYPROJECT = "examples/trionbd-example/pyproject.toml"


# --- the README's Embedding section -------------------------------------------------------


def readme_section() -> str:
    return section((DOCS.parent / "README.md").read_text(), "## Embedding")


def test_the_readme_section_is_short_and_runs_as_pasted(tmp_path: Path) -> None:
    text = readme_section()
    assert len(text.splitlines()) < 30, text
    (code,) = code_blocks(text, "python")
    script = tmp_path / "embed.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "b'hello' ExportStats(requests=2, bytes_read=5, bytes_written=5, errors=0, connections=1)\n"
    )
    assert result.stderr == ""


def test_every_python_block_of_the_docs_compiles() -> None:
    for page in ("embedding.md", "plugins.md"):
        blocks = code_blocks((DOCS / page).read_text(), "python")
        assert blocks, page
        for i, code in enumerate(blocks):
            # Fragments may use ``await`` at the top level, as in an async function.
            compile(code, f"docs/{page} block {i}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_the_complete_examples_pass_mypy_strict(tmp_path: Path) -> None:
    (tmp_path / "readme_example.py").write_text(code_blocks(readme_section(), "python")[0])
    for path in (PLUGIN, FILTER):
        (tmp_path / Path(path).name).write_text(example_blocks()[path])
    # The editable install is an import hook, which mypy does not follow: point it at
    # the source tree instead.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "."],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- docs/plugins.md: the example plugin and filter -----------------------------------------


def test_the_docs_show_the_example_package_as_it_is() -> None:
    blocks = example_blocks()
    assert sorted(blocks) == sorted([PYPROJECT, PLUGIN, FILTER])
    for path in (PLUGIN, FILTER):
        assert blocks[path] == (ROOT / path).read_text(), path
    assert blocks[PYPROJECT] in (ROOT / PYPROJECT).read_text()


async def test_the_example_plugin_is_a_writable_ram_disk() -> None:
    mem = load_block(PLUGIN)
    plugin = mem.MemExample.from_params([("size", "1M")])
    data = random.Random(1).randbytes(100 * KiB)
    with short_tmpdir() as tmp, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(trionbd.serve, plugin, f"unix:{tmp}/sock")
            async with await trionbd.connect_unix(f"{tmp}/sock") as client:
                assert client.size == MiB and not client.is_read_only
                assert client.can_multi_conn and not client.can_flush
                await client.pwrite(data, 12345)
                assert await client.pread(len(data), 12345) == data
                await client.zero(1000, 20000)  # emulated with writes of zeroes
                assert await client.pread(1000, 20000) == bytes(1000)
                with pytest.raises(trionbd.RequestError) as caught:
                    await client.zero(1000, 0, trionbd.CmdFlag.FAST_ZERO)
                assert caught.value.errno == errno.ENOTSUP
            nursery.cancel_scope.cancel()
    expected = bytearray(data)
    expected[20000 - 12345 : 21000 - 12345] = bytes(1000)
    assert plugin.disk[12345 : 12345 + len(data)] == expected


async def test_the_example_filter_xors_what_it_stores_and_nothing_escapes_it() -> None:
    mem, xor = load_block(PLUGIN), load_block(FILTER)
    plugin = mem.MemExample(MiB)
    key = 0xA5
    chain = trionbd.Chain(plugin, [xor.XorExample.from_params([("xor-key", "0xa5")])])
    data = random.Random(2).randbytes(64 * KiB)
    with short_tmpdir() as tmp, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(trionbd.serve, chain, f"unix:{tmp}/sock")
            async with await trionbd.connect_unix(f"{tmp}/sock") as client:
                await client.pwrite(data, 4096)
                assert await client.pread(len(data), 4096) == data
                # What the plugin holds is the data XORed; the rest reads as the key.
                assert plugin.disk[4096 : 4096 + len(data)] == bytes(b ^ key for b in data)
                assert await client.pread(16, 0) == bytes([key]) * 16
                await client.zero(8192, 4096)  # through the filter: stored as the key
                assert await client.pread(8192, 4096) == bytes(8192)
                assert plugin.disk[4096 : 4096 + 8192] == bytes([key]) * 8192
            nursery.cancel_scope.cancel()


async def test_the_example_filter_never_reports_zeroes_it_does_not_serve() -> None:
    xor = load_block(FILTER)
    chain = trionbd.Chain(MemoryPlugin(size=4 * MiB), [xor.XorExample()])
    with short_tmpdir() as tmp, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(trionbd.serve, chain, f"unix:{tmp}/sock")
            async with await trionbd.connect_unix(f"{tmp}/sock") as client:
                await client.pwrite(b"x" * 64 * KiB, 0)
                extents = await client.block_status(4 * MiB, 0)
                assert [(e.length, e.flags) for e in extents] == [
                    (64 * KiB, 0),
                    (4 * MiB - 64 * KiB, int(trionbd.State.HOLE)),  # a hole, not zeroes
                ]
                assert await client.pread(4, MiB) == b"\x5a" * 4
            nursery.cancel_scope.cancel()


def test_the_example_filter_refuses_a_key_that_is_not_a_byte() -> None:
    xor = load_block(FILTER)
    with pytest.raises(trionbd.ConfigError, match="xor-key=256 is not a byte"):
        xor.XorExample.from_params([("xor-key", "256")])
    with pytest.raises(trionbd.ConfigError, match="bad value for xor-key=x"):
        xor.XorExample.from_params([("xor-key", "x")])
