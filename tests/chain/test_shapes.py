"""The three shapes of export lists through the chain, checked with real clients against
the real ``trionbd`` command over ``file file=`` and ``file dir=``.

1. pass-through: a filter shows the list of the layer below unchanged;
2. own list: a filter lists names of its own, read through a lifetime context at start-up;
3. product: each export below combined with the filter's items, ``BELOW/ITEM``.

Every byte of every listed export is compared with the source.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.chain.raw_client import RawClient
from tests.chain.shape_filters import DIRECTORY_SIZE, Directory, format_directory
from tests.support import (
    Running,
    export_info,
    libnbd_python,
    listing,
    read_export,
    serving,
    trionbd_process,
)
from trionbd.chain import Chain
from trionbd.plugins.file import FilePlugin
from trionbd.protocol.constants import Opt, Rep

SHAPES = "tests.chain.shape_filters"
PASSTHROUGH = f"--filter={SHAPES}:Passthrough"
DIRECTORY = f"--filter={SHAPES}:Directory"
PRODUCT = f"--filter={SHAPES}:DirectoryProduct"
MANY = f"--filter={SHAPES}:ManyNames"


def make_image(path: Path, items: list[tuple[str, int]], seed: int) -> dict[str, bytes]:
    """Write an image whose directory lists ``(name, size)`` items laid out after the
    directory block, with random bytes everywhere else; return each item's bytes."""
    rng = random.Random(seed)
    entries = []
    offset = DIRECTORY_SIZE + rng.randrange(1, 512)  # entries are not block-aligned
    for name, size in items:
        entries.append((name, offset, size))
        offset += size + rng.randrange(0, 300)
    data = bytearray(rng.randbytes(offset + 1000))
    data[:DIRECTORY_SIZE] = format_directory(entries)
    path.write_bytes(data)
    return {name: bytes(data[off : off + size]) for name, off, size in entries}


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """One image with three entries, one name with a space and one with a slash."""
    path = tmp_path / "disk.img"
    items = make_image(path, [("alpha", 10000), ("beta gamma", 5000), ("dir/item", 777)], 1)
    return path, items


@pytest.fixture
def directory(tmp_path: Path) -> tuple[Path, dict[str, dict[str, bytes]]]:
    """A directory of three images (sorted: one.img, three.img, two.img)."""
    d = tmp_path / "images"
    d.mkdir()
    layout = {
        "one.img": [("a", 3000), ("b", 70000)],
        "two.img": [("c", 12345), ("x/y", 1)],
        "three.img": [("a", 4096)],
    }
    contents = {
        name: make_image(d / name, items, i) for i, (name, items) in enumerate(layout.items())
    }
    return d, contents


def check_exports(server: Running, expected: dict[str, bytes], tmp: Path) -> list[dict[str, Any]]:
    """The listing names exactly ``expected`` (in that order) with the right sizes, and
    every export serves exactly its bytes."""
    exports = listing(server.uri)
    assert [e["export-name"] for e in exports] == list(expected)
    for e in exports:
        data = expected[e["export-name"]]
        assert e["export-size"] == len(data), e
        assert read_export(server.uri_for(e["export-name"]), tmp) == data, e["export-name"]
    return exports


def comparable(exports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Listings of two servers, without the socket-dependent URI."""
    return [{k: v for k, v in e.items() if k != "uri"} for e in exports]


# --- 1. pass-through -----------------------------------------------------------------------


def test_passthrough_file_shows_the_plugin_list_unchanged(image: Any, tmp_path: Path) -> None:
    path, _ = image
    with trionbd_process("file", f"file={path}") as plain:
        without = listing(plain.uri)
    with trionbd_process(PASSTHROUGH, "file", f"file={path}") as server:
        exports = check_exports(server, {"": path.read_bytes()}, tmp_path)
    assert comparable(exports) == comparable(without)


def test_passthrough_dir_shows_every_file(directory: Any, tmp_path: Path) -> None:
    d, _ = directory
    files = {p.name: p.read_bytes() for p in sorted(d.iterdir())}
    with trionbd_process("file", f"dir={d}") as plain:
        without = listing(plain.uri)
    with trionbd_process(PASSTHROUGH, "file", f"dir={d}") as server:
        exports = check_exports(server, files, tmp_path)
    assert comparable(exports) == comparable(without)
    assert [e["description"] for e in exports] == [
        f"regular file, {len(data)} bytes" for data in files.values()
    ]


# --- 2. own list ---------------------------------------------------------------------------


def test_own_list_file_lists_the_directory_entries(image: Any, tmp_path: Path) -> None:
    path, items = image
    with trionbd_process(DIRECTORY, "file", f"file={path}") as server:
        exports = check_exports(server, items, tmp_path)
    assert exports[0]["description"].startswith("bytes ")
    assert all(e["is_read_only"] for e in exports)


def test_own_list_dir_replaces_the_file_names(directory: Any, tmp_path: Path) -> None:
    d, contents = directory
    # The directory is read from the default export below: the first file, one.img.
    with trionbd_process(DIRECTORY, "file", f"dir={d}") as server:
        check_exports(server, contents["one.img"], tmp_path)
    with trionbd_process(DIRECTORY, "file", f"dir={d}", "start-export=two.img") as server:
        check_exports(server, contents["two.img"], tmp_path)


async def test_own_list_is_built_before_any_client_and_shared(image: Any) -> None:
    path, items = image
    directory = Directory()
    chain = Chain(FilePlugin(file=str(path)), [directory])
    async with serving(chain) as server:
        # Nothing has connected yet, and the list is ready from one lifetime context.
        assert list(directory.entries) == list(items)
        assert len(server.lifetime.contexts) == 1
        shared = server.lifetime.contexts[0]
        uri = server.uris[0]
        for _ in range(2):
            assert len(await trio.to_thread.run_sync(listing, uri)) == len(items)
        # Clients came and went; the shared context is still the only one and still open.
        assert server.lifetime.contexts == [shared]
        assert not shared.closed
    assert shared.closed


# --- 3. product ----------------------------------------------------------------------------


def test_product_over_single_export_names_are_items(image: Any, tmp_path: Path) -> None:
    path, items = image
    with trionbd_process(PRODUCT, "file", f"file={path}") as server:
        check_exports(server, items, tmp_path)


def test_product_over_dir_names_are_below_slash_item(directory: Any, tmp_path: Path) -> None:
    d, contents = directory
    expected = {
        f"{below}/{item}": data
        for below in sorted(contents)
        for item, data in contents[below].items()
    }
    assert list(expected) == ["one.img/a", "one.img/b", "three.img/a", "two.img/c", "two.img/x/y"]
    with trionbd_process(PRODUCT, "file", f"dir={d}") as server:
        check_exports(server, expected, tmp_path)


# --- the default export --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "source", "canonical"),
    [
        ([], "dir", "one.img"),
        ([PASSTHROUGH], "dir", "one.img"),
        ([DIRECTORY], "file", "alpha"),
        ([DIRECTORY], "dir", "a"),
        ([PRODUCT], "file", "alpha"),
        ([PRODUCT], "dir", "one.img/a"),
        ([PASSTHROUGH, PRODUCT], "dir", "one.img/a"),
    ],
)
def test_default_export_resolves_through_the_chain(
    filters: list[str], source: str, canonical: str, image: Any, directory: Any, tmp_path: Path
) -> None:
    arg = f"file={image[0]}" if source == "file" else f"dir={directory[0]}"
    with trionbd_process(*filters, "file", arg) as server:
        info = export_info(server.uri)
        listed = listing(server.uri)
        data = read_export(server.uri, tmp_path)
        named = read_export(server.uri_for(canonical), tmp_path)
    assert info["export-name"] == canonical  # NBD_INFO_NAME
    by_name = {e["export-name"]: e for e in listed}
    assert info["export-size"] == by_name[canonical]["export-size"] == len(data)
    assert data == named


# --- unknown names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "source", "unknown", "good", "says"),
    [
        ([PASSTHROUGH], "dir", "nope.img", "two.img", "no export named 'nope.img'"),
        ([DIRECTORY], "file", "nope", "beta gamma", "no entry named 'nope'"),
        ([PRODUCT], "dir", "one.img/nope", "two.img/x/y", "'one.img' has no entry 'nope'"),
        ([PRODUCT], "dir", "nope.img/a", "one.img/b", "names are EXPORT/ITEM"),
    ],
)
def test_unknown_name_is_err_unknown_and_the_connection_survives(
    filters: list[str],
    source: str,
    unknown: str,
    good: str,
    says: str,
    image: Any,
    directory: Any,
) -> None:
    if source == "file":
        arg, data = f"file={image[0]}", image[1][good]
    else:
        arg = f"dir={directory[0]}"
        below, _, item = good.partition("/")
        d = directory[1]
        data = d[below][item] if PRODUCT in filters else (directory[0] / good).read_bytes()
    with trionbd_process(*filters, "file", arg) as server:
        with RawClient(server.socket) as client:
            for option in (Opt.INFO, Opt.GO):
                refused = client.info(unknown, option)
                assert refused.reply == Rep.ERR_UNKNOWN
                assert says in refused.message
            ok = client.info(good, Opt.INFO)
            assert ok.reply == Rep.ACK and ok.name == good and ok.size == len(data)
            ok = client.info(good, Opt.GO)
            assert ok.reply == Rep.ACK and ok.size == len(data)
            assert client.read(0, len(data)) == data
        # libnbd in option mode sees the failure and goes on with the same handle.
        script = f"""
import nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri({server.uri!r})
h.set_export_name({unknown!r})
try:
    h.opt_info()
except nbd.Error as e:
    print("refused:", e)
else:
    raise SystemExit("opt_info of an unknown name succeeded")
h.set_export_name({good!r})
h.opt_go()
print("size:", h.get_size())
"""
        out = libnbd_python(script)
    assert "refused:" in out
    assert f"size: {len(data)}" in out


# --- long lists ----------------------------------------------------------------------------


def test_a_list_of_100000_names_is_served_in_full(image: Any) -> None:
    path, _ = image
    count = 100_000
    script = """
import time, nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(URI)
names = []
start = time.perf_counter()
n = h.opt_list(lambda name, desc: names.append(name))
elapsed = time.perf_counter() - start
print(n, len(names), len(set(names)), names[0], names[-1], f"{elapsed:.3f}")
h.opt_abort()
"""
    with trionbd_process(MANY, "file", f"file={path}", f"names={count}") as server:
        out = libnbd_python(script.replace("URI", repr(server.uri))).split()
    assert out[:5] == [str(count), str(count), str(count), "name-000000", f"name-{count - 1:06d}"]
    print(f"\nopt_list of {count} names: {out[5]} s")


def test_nbdinfo_lists_10000_names(image: Any) -> None:
    path, _ = image
    count = 10_000
    # nbdinfo asks INFO of every name within one handshake: the default handshake
    # timeout applies per option, so however long the listing takes it is not cut off.
    with trionbd_process(MANY, "file", f"file={path}", f"names={count}") as server:
        start = time.perf_counter()
        exports = listing(server.uri)
        elapsed = time.perf_counter() - start
    assert [e["export-name"] for e in exports] == [f"name-{i:06d}" for i in range(count)]
    assert {e["export-size"] for e in exports} == {path.stat().st_size}
    print(f"\nnbdinfo --list --json of {count} names: {elapsed:.2f} s")
