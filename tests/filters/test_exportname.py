"""The exportname filter: every listing mode, strict mode, the default export and every
description mode, checked with real clients (nbdinfo, nbdcopy) and exact option replies."""

from __future__ import annotations

import logging
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.chain.raw_client import RawClient
from tests.support import (
    PYTHON,
    ROOT,
    Running,
    export_info,
    listing,
    read_export,
    run,
    trionbd_exit,
    trionbd_process,
    wait_until,
)
from trionbd.filters import exportname
from trionbd.protocol.constants import MAX_STRING, Opt, Rep

FILTER = "--filter=exportname"
NAMES = ["a", "b", "c"]


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A directory of three files of different sizes (the file plugin lists them sorted)."""
    d = tmp_path / "images"
    d.mkdir()
    rng = random.Random(7)
    data = {name: rng.randbytes(4096 * (i + 1) + 17 * i) for i, name in enumerate(NAMES)}
    for name, content in data.items():
        (d / name).write_bytes(content)
    return d, data


def serve(images: tuple[Path, Any], *params: str) -> Any:
    return trionbd_process(FILTER, "file", f"dir={images[0]}", *params)


def raw_list(server: Running) -> tuple[int, list[str]]:
    with RawClient(server.socket) as client:
        return client.list_names()


# --- exportname-list -----------------------------------------------------------------------


def test_keep_is_the_default_and_shows_the_list_below(images: Any, tmp_path: Path) -> None:
    with trionbd_process("file", f"dir={images[0]}") as plain:
        without = listing(plain.uri)
    for params in [(), ("exportname-list=keep",)]:
        with serve(images, *params) as server:
            exports = listing(server.uri)
            assert [e["export-name"] for e in exports] == NAMES
            for name in NAMES:
                assert read_export(server.uri_for(name), tmp_path) == images[1][name]
        strip = [{k: v for k, v in e.items() if k != "uri"} for e in exports]
        assert strip == [{k: v for k, v in e.items() if k != "uri"} for e in without]


def test_error_refuses_the_listing_with_err_policy(images: Any) -> None:
    with serve(images, "exportname-list=error") as server:
        result = subprocess.run(
            ["nbdinfo", "--list", server.uri], capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0
        assert "list" in result.stderr
        with RawClient(server.socket) as client:
            replies = client.option(Opt.LIST)
            assert [r.reply for r in replies] == [Rep.ERR_POLICY]
            assert b"restricted by policy" in replies[0].payload
            # The connection survives, and names still open.
            ok = client.info("b")
            assert ok.reply == Rep.ACK and ok.size == len(images[1]["b"])


def test_empty_lists_nothing_but_names_still_open(images: Any, tmp_path: Path) -> None:
    with serve(images, "exportname-list=empty") as server:
        assert listing(server.uri) == []
        assert raw_list(server) == (Rep.ACK, [])
        assert read_export(server.uri_for("c"), tmp_path) == images[1]["c"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (("exportname-list=defaultonly",), "a"),
        (("exportname-list=default-only",), "a"),
        (("exportname-list=defaultonly", "default-export=c"), "c"),
    ],
)
def test_defaultonly_lists_the_canonical_default(
    params: tuple[str, ...], expected: str, images: Any, tmp_path: Path
) -> None:
    with serve(images, *params) as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == [expected]
        assert exports[0]["export-size"] == len(images[1][expected])
        assert read_export(server.uri, tmp_path) == images[1][expected]


def test_defaultonly_lists_nothing_when_the_default_is_not_permitted(images: Any) -> None:
    with serve(
        images, "exportname-list=defaultonly", "exportname-strict=true", "exportname=a"
    ) as server:
        assert raw_list(server) == (Rep.ACK, [])


def test_explicit_lists_exactly_the_given_names(images: Any, tmp_path: Path) -> None:
    with serve(images, "exportname-list=explicit", "exportname=c", "exportname=a") as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == ["c", "a"]
        assert [e["export-size"] for e in exports] == [len(images[1]["c"]), len(images[1]["a"])]
        # Not strict: an unlisted name still opens.
        assert read_export(server.uri_for("b"), tmp_path) == images[1]["b"]
    # The list need not reflect reality: a name that does not exist below is listed.
    with serve(images, "exportname-list=explicit", "exportname=ghost") as server:
        assert raw_list(server) == (Rep.ACK, ["ghost"])
    with serve(images, "exportname-list=explicit") as server:
        assert raw_list(server) == (Rep.ACK, [])


# --- exportname-strict ---------------------------------------------------------------------


def test_strict_allows_only_the_given_names(images: Any, tmp_path: Path) -> None:
    data = images[1]
    with serve(
        images,
        "exportname-list=explicit",
        "exportname-strict=true",
        "exportname=a",
        "exportname=c",
    ) as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == ["a", "c"]
        with RawClient(server.socket) as client:
            for name in ("b", "nonexistent", ""):
                for option in (Opt.INFO, Opt.GO):
                    refused = client.info(name, option)
                    assert refused.reply == Rep.ERR_UNKNOWN, (name, refused)
                    assert refused.message
            assert "default export is not permitted" in client.info("").message
            assert "no export named 'b'" in client.info("b").message
            ok = client.info("c", Opt.GO)
            assert ok.reply == Rep.ACK and ok.size == len(data["c"])
            assert client.read(0, len(data["c"])) == data["c"]
        with RawClient(server.socket) as client:
            assert client.export_name("b") is None  # EXPORT_NAME cannot refuse: hang up
        with RawClient(server.socket) as client:
            reply = client.export_name("a")
            assert reply is not None and reply.size == len(data["a"])
        assert read_export(server.uri_for("a"), tmp_path) == data["a"]
    # Listing is independent of strictness: keep still shows everything below.
    with serve(images, "exportname-strict=true", "exportname=a") as server:
        assert raw_list(server) == (Rep.ACK, NAMES)
        with RawClient(server.socket) as client:
            assert client.info("c").reply == Rep.ERR_UNKNOWN
            assert client.info("a").reply == Rep.ACK


def test_strict_without_names_refuses_everything(images: Any) -> None:
    with serve(images, "exportname-strict=true") as server:
        with RawClient(server.socket) as client:
            for name in ["", *NAMES]:
                assert client.info(name).reply == Rep.ERR_UNKNOWN


def test_strict_default_export_needs_an_empty_exportname(images: Any, tmp_path: Path) -> None:
    data = images[1]
    with serve(
        images, "exportname-strict=true", "exportname=", "default-export=b", "exportname=c"
    ) as server:
        assert export_info(server.uri)["export-name"] == "b"
        assert read_export(server.uri, tmp_path) == data["b"]
        with RawClient(server.socket) as client:
            assert client.info("a").reply == Rep.ERR_UNKNOWN
            assert client.info("b").name == "b"  # the default's canonical name
            assert client.info("c").reply == Rep.ACK
    # Without default-export the canonical name of the default is "" itself (as in
    # nbdkit), which the file plugin in dir= mode does not serve.
    with serve(images, "exportname-strict=true", "exportname=") as server:
        with RawClient(server.socket) as client:
            refused = client.info("")
            assert refused.reply == Rep.ERR_UNKNOWN
            assert "no export named ''" in refused.message
    with trionbd_process(
        FILTER, "file", str(images[0] / "a"), "exportname-strict=true", "exportname="
    ) as server:
        assert read_export(server.uri, tmp_path) == data["a"]


# --- default-export ------------------------------------------------------------------------


def test_default_export_replaces_the_default_below(images: Any, tmp_path: Path) -> None:
    with serve(images, "default-export=c") as server:
        shown = export_info(server.uri)
        assert shown["export-name"] == "c"
        assert shown["export-size"] == len(images[1]["c"])
        assert read_export(server.uri, tmp_path) == images[1]["c"]
        assert read_export(server.uri_for("a"), tmp_path) == images[1]["a"]
    with serve(images, "default-export=") as server:  # empty: the default below
        assert export_info(server.uri)["export-name"] == "a"


# --- exportdesc ----------------------------------------------------------------------------


def descriptions(server: Running) -> list[str | None]:
    return [e.get("description") for e in listing(server.uri)]


def test_exportdesc_keep_none_fixed(images: Any) -> None:
    sizes = [len(images[1][n]) for n in NAMES]
    with serve(images, "exportdesc=keep") as server:
        assert descriptions(server) == [f"regular file, {s} bytes" for s in sizes]
        assert export_info(server.uri_for("b"))["description"] == f"regular file, {sizes[1]} bytes"
    with serve(images, "exportdesc=none") as server:
        assert descriptions(server) == [None, None, None]
        assert "description" not in export_info(server.uri_for("b"))
    with serve(images, "exportdesc=fixed:a: fixed, description") as server:
        assert descriptions(server) == ["a: fixed, description"] * 3
        assert export_info(server.uri_for("b"))["description"] == "a: fixed, description"
    with serve(images, "exportname-list=explicit", "exportname=b", "exportdesc=fixed:F") as server:
        assert descriptions(server) == ["F"]


def test_exportdesc_script_gets_the_name_in_dollar_name(images: Any) -> None:
    d, data = images
    odd = 'it\'s a $HOME `x` "q" \\ name'
    (d / odd).write_bytes(b"x" * 512)
    script = 'exportdesc=script:printf "%s has %s bytes\\n\\n" "$name" "$(stat -c %s "$DIR/$name")"'
    env = {**os.environ, "DIR": str(d)}
    with trionbd_process(FILTER, "file", f"dir={d}", script, env=env) as server:
        exports = listing(server.uri)
        shown = export_info(server.uri_for(odd))
    names = sorted([*NAMES, odd])
    assert [e["export-name"] for e in exports] == names
    sizes = {**{n: len(v) for n, v in data.items()}, odd: 512}
    # One trailing newline is removed, not more.
    assert [e["description"] for e in exports] == [f"{n} has {sizes[n]} bytes\n" for n in names]
    assert shown["description"] == f"{odd} has 512 bytes\n"


def test_exportdesc_script_keeps_the_order_of_a_long_list(tmp_path: Path) -> None:
    d = tmp_path / "many"
    d.mkdir()
    names = [f"f{i:03d}" for i in range(40)]
    for n in names:
        (d / n).write_bytes(b"\0" * 512)
    # Later names answer sooner, so the commands finish out of order.
    script = 'exportdesc=script:n=${name#f}; sleep "0.$((1200 - 1$n))"; echo "<$name>"'
    with trionbd_process(FILTER, "file", f"dir={d}", script) as server:
        with RawClient(server.socket) as client:
            replies = client.option(Opt.LIST)
    assert replies[-1].reply == Rep.ACK
    listed = []
    for r in replies[:-1]:
        size = int.from_bytes(r.payload[:4], "big")
        listed.append((r.payload[4 : 4 + size].decode(), r.payload[4 + size :].decode()))
    assert listed == [(n, f"<{n}>") for n in names]


def test_exportdesc_script_failure_and_long_output(images: Any) -> None:
    script = (
        'exportdesc=script:case "$name" in a) echo broken >&2; exit 3;; '
        'b) head -c 10000 /dev/zero | tr "\\0" x;; *) echo fine;; esac'
    )
    with serve(images, script) as server:
        exports = listing(server.uri)
        stderr = server.stderr
    assert "description" not in exports[0]
    assert exports[1]["description"] == "x" * (MAX_STRING - 3) + "..."
    assert exports[2]["description"] == "fine"
    assert "exportdesc script for 'a' failed with status 3: broken" in stderr


async def test_exportdesc_script_timeout_kills_the_command(
    mock_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The clock stands still until the command has started its child (the pid file is
    # written); only then does the test move it past the timeout.
    pidfile = tmp_path / "pid"
    command = f"sleep 100 & echo $! > {pidfile}.new; mv {pidfile}.new {pidfile}; wait; echo late"
    results: list[str] = []

    async def describe() -> None:
        results.append(await exportname.run_description_script(command, "x"))

    with caplog.at_level(logging.WARNING):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(describe)
            await trio.to_thread.run_sync(wait_until, pidfile.exists, "the pid file appears")
            mock_clock.jump(exportname.SCRIPT_TIMEOUT)
    assert results == [""]
    assert "ran longer than 10s; killed" in caplog.text
    pid = int(pidfile.read_text())
    await trio.to_thread.run_sync(
        wait_until, lambda: not _alive(pid), "the command's child dies after the timeout", 10.0
    )


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("exportname-list=bogus", "'bogus' is not one of keep, error, empty, defaultonly"),
        ("exportname-strict=maybe", "'maybe' is not a boolean"),
        ("exportdesc=bogus", "'bogus' is not one of keep, none, fixed:STRING, script:COMMAND"),
        ("exportdesc=script:", "script: needs a command"),
        ("exportname=" + "n" * (MAX_STRING + 1), f"export names are at most {MAX_STRING}"),
        ("default-export=" + "n" * (MAX_STRING + 1), f"export names are at most {MAX_STRING}"),
    ],
)
def test_bad_parameters_exit_2_with_a_message(param: str, message: str, images: Any) -> None:
    result = trionbd_exit(FILTER, "file", f"dir={images[0]}", param)
    assert result.returncode == 2
    assert "exportname: bad value for" in result.stderr
    assert message in result.stderr


def test_manual() -> None:
    out = run([PYTHON, "-m", "trionbd", FILTER, "--help"], cwd=ROOT)
    assert out.startswith("exportname: ")
    for param in ("default-export", "exportname-list", "exportname-strict", "exportdesc"):
        assert param in out
