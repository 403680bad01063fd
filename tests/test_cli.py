"""The ``trionbd`` command line: nbdkit's syntax, help, errors (exit 2, one line),
``-U -``, bundled flags, ``--filter`` anywhere, the pidfile, ``python -m trionbd``.

Parsing is tested in process (``parse_args``/``build_chain``); what needs a process
(exit codes, sockets, signals, files) runs the real command.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    HANG_GUARD,
    PYTHON,
    ROOT,
    SYSTEM_PYTHON,
    read_line,
    run,
    short_tmpdir,
    trionbd_process,
    trionbd_run,
    wait_until,
)
from trionbd import cli
from trionbd.chain import ConfigError, Filter, Param, Plugin
from trionbd.cli import build_chain, help_text, parse_args
from trionbd.net import Address
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import HandshakeFlag
from trionbd.registry import builtin_names

TAG = "tests.test_cli:Tag"


class Tag(Filter):
    """tag: a do-nothing filter with one parameter, for routing tests."""

    name = "tag"
    params = (Param("tag", "any text"), Param("size", "shadows the plugin's size=", str))

    def __init__(self, tag: str = "", size: str = "") -> None:
        self.tag = tag
        self.size = size


class Interrupting(MemoryPlugin):
    """Reads at 4096 raise KeyboardInterrupt, at 8192 SystemExit(3), as plugin code may."""

    name = "interrupting"

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        if offset == 4096:
            raise KeyboardInterrupt
        if offset == 8192:
            raise SystemExit(3)
        return await super().pread(h, count, offset, flags)


def parsed(*args: str) -> cli.Options:
    return parse_args(list(args))


# --- help and version ----------------------------------------------------------------------------


def test_help_lists_options_plugins_and_filters() -> None:
    result = trionbd_run("--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: trionbd [OPTIONS] PLUGIN")
    for option in ("-U, --unix=SOCKET", "-r, --readonly", "--filter=NAME", "-P, --pidfile"):
        assert f"\n  {option}" in out
    plugins = out.split("Plugins")[1].split("Filters")[0]
    for line in (
        "file           serve a file or block device, or every regular file in a directory.",
        "memory         a sparse RAM disk.",
        "null           a disk that reads as zeroes and throws writes away.",
        "pattern        a read-only disk where every 8-byte word holds its own offset.",
    ):
        assert line in plugins


def test_help_shows_defaults_and_keeps_long_names_apart_from_their_text() -> None:
    options = help_text(parsed()).split("Options:\n")[1].split("\n\n")[0].splitlines()
    text = "\n".join(options)
    for option, default in (
        ("-t, --threads=N", "64"),
        ("--handshake-timeout, --timeout=SECONDS", "10"),
        ("--shutdown-timeout=SECONDS", "5"),
        ("--idle-timeout=SECONDS", "0"),
    ):
        line = next(i for i, line in enumerate(options) if line.startswith(f"  {option}"))
        described = " ".join(" ".join(options[line : line + 3]).split())
        assert f"(default: {default})" in described, described
    # Names too long for their column stand alone, the text starts on the next line.
    assert (
        "\n  -e, --exportname, --export-name, --export=NAME\n"
        + " " * 26
        + "the export named in printed URIs"
    ) in "\n" + text
    # Every line is an option's names (alone, or two spaces before the text) or text.
    declared = {
        ", ".join(opt.names) + ("" if opt.metavar is None else f"={opt.metavar}")
        for _, opt in cli.OPTIONS.values()
    }
    for line in options:
        if not line.startswith(" " * 26):
            assert line[2:].split("  ")[0] in declared, line


def test_plugin_help_is_its_manual_and_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["file", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("file: serve a file or block device")
    # The parameters are listed once, from their declarations.
    assert "\nParameters:" not in out and out.count("Parameters of file:") == 1
    for param in ("file=PATH", "dir=DIR", "cache=default|none"):
        assert f"\n  {param} " in out
    assert cli.run(["--help", "memory"]) == 0
    assert capsys.readouterr().out.startswith("memory: a sparse RAM disk.")


@pytest.mark.parametrize(
    "args",
    [[name] for name in builtin_names(Plugin)] + [[f"--filter={n}"] for n in builtin_names(Filter)],
)
def test_manuals_are_plain_text_with_parameters_listed_once(args: list[str]) -> None:
    """No reStructuredText markup reaches the terminal, and the parameters come from
    the declarations alone (no hand-written second list in the docstring)."""
    text = help_text(parsed(*args, "--help"))
    assert "``" not in text and not re.search(r":[a-z]+:`", text), text
    assert not re.search(r"::$", text, re.MULTILINE), text
    assert "\nParameters:" not in text and "\nParameters (" not in text, text
    assert text.count("\nParameters of ") == 1


def test_plain_turns_markup_into_text() -> None:
    assert cli.plain("Use ``-r`` with\n``file=x``; see :mod:`trionbd.formats`.") == (
        "Use -r with\nfile=x; see trionbd.formats."
    )
    assert cli.plain("Example::\n\n  x\n\nAlso ::\n\n  y") == "Example:\n\n  x\n\nAlso\n\n  y"


def test_filter_help() -> None:
    text = help_text(parsed(f"--filter={TAG}", "--help"))
    assert "Parameters of tag:" in text and "\n  tag=STRING " in text
    assert "\n  size=STRING " in text


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run([flag]) == 0
    assert capsys.readouterr().out == "trionbd 0.1.0\n"


def test_console_script_and_python_m_are_the_same_command() -> None:
    script = Path(PYTHON).parent / "trionbd"
    assert run([str(script), "-V"]) == trionbd_run("-V").stdout == "trionbd 0.1.0\n"


# --- errors: exit 2 and one line naming the culprit ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch"], "trionbd: unknown plugin 'nosuch' (known: file, http, memory,"),
        (["--filter=nosuch", "memory", "1M"], "trionbd: unknown filter 'nosuch' (known: "),
        (["memory", "1M", "colour=blue"], "unknown parameter 'colour' (not a parameter of memory)"),
        (["memory", "size=big"], "trionbd: memory: bad value for size=big: 'big' is not a size"),
        (["memory", "8E"], "larger than the maximum size 9223372036854775807"),
        (["memory"], "trionbd: memory: parameter 'size' is required"),
        (["memory", "1M", "2M"], "trionbd: unexpected argument '2M' (parameters are key=value)"),
        (["memory", "1M", "size=2M"], "parameter 'size' given more than once"),
        (["--bogus", "memory", "1M"], "trionbd: unknown option --bogus\n"),
        (["memory", "1M", "-x"], "trionbd: unknown option -x\n"),
        (["-rx", "memory", "1M"], "trionbd: unknown option -x\n"),
        (["-p", "abc", "memory", "1M"], "trionbd: bad value for -p: 'abc' is not an integer\n"),
        (["--port=70000", "memory", "1M"], "bad value for -p/--port: '70000' is not a TCP port"),
        (["--fore=1", "memory", "1M"], "trionbd: option --fore takes no value\n"),
        (["memory", "1M", "-U"], "trionbd: option -U needs a value (SOCKET)\n"),
        (["memory", "1M", "--run"], "trionbd: option --run needs a value (CMD)\n"),
        (
            ["--ex=x", "memory", "1M"],
            "trionbd: option --ex is ambiguous: --exit-with-parent, --export, --export-name, "
            "--exportname\n",
        ),
        (["--tls=maybe", "memory", "1M"], "bad value for --tls: 'maybe' is not off, on or require"),
        (["--idle-timeout=-1", "memory", "1M"], "'-1' is not a number of seconds (0 or more)"),
        (["-t", "0", "memory", "1M"], "trionbd: bad value for -t: '0' is less than 1\n"),
        (
            ["tar", "disk.tar", "tar-entry=a b"],
            "trionbd: 'tar' is a filter, not a plugin: try trionbd file disk.tar 'tar-entry=a b' "
            "--filter=tar\n",
        ),
        (["tar"], "'tar' is a filter, not a plugin: try trionbd file FILE --filter=tar\n"),
        (["tar", "--help"], "'tar' is a filter, not a plugin: its manual is trionbd --filter=tar"),
        (["--filter=file", "memory", "1M"], "'file' is a plugin, not a filter: name it without"),
        (["file", "cache=maybe", "x"], "trionbd: file: bad value for cache=maybe: 'maybe' is not"),
        (["file", "/nonexistent/disk.img"], "trionbd: file: /nonexistent/disk.img: No such file"),
        ([], "trionbd: no plugin given (try: trionbd --help)"),
        (["--mask-handshake=2", "memory", "1M"], "drops FIXED_NEWSTYLE (bit 0)"),
        (["--filter=os:getcwd", "memory", "1M"], "'os:getcwd' is not a trionbd filter class"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.run(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert message in err


def test_exit_status_2_from_the_real_command() -> None:
    result = trionbd_run("memory", "1M", "colour=blue")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("trionbd: unknown parameter 'colour' (not a parameter of memory)\n")


@pytest.mark.parametrize(
    ("offset", "raised"), [(4096, "KeyboardInterrupt"), (8192, "SystemExit(3)")]
)
def test_a_plugin_raising_keyboard_interrupt_or_system_exit_stops_with_one_line(
    offset: int, raised: str
) -> None:
    with short_tmpdir() as tmp:
        proc = subprocess.Popen(
            [PYTHON, "-m", "trionbd", "-f", "--print-uri", "-U", str(tmp / "sock"),
             "tests.test_cli:Interrupting", "1M"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            uri = proc.stdout.readline().strip()
            read = run([SYSTEM_PYTHON, "-m", "nbd", "-u", uri, "-c", f"h.pread(16, {offset})"],
                       check=False)  # fmt: skip
            assert read == ""
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 1, err
    where = r"\(/\S+/tests/test_cli\.py:\d+\)"
    assert re.fullmatch(
        f"trionbd: {re.escape(raised)} raised in pread {where} stopped the server\n", err
    ), err


def test_cannot_listen_exits_1_naming_where_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["-U", "/nonexistent/dir/sock", "memory", "1M"]) == 1
    assert capsys.readouterr().err == (
        "trionbd: /nonexistent/dir/sock: no such file or directory\n"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.run(["-p", str(port), "-i", "127.0.0.1", "memory", "1M"]) == 1
    assert capsys.readouterr().err == f"trionbd: 127.0.0.1:{port}: address already in use\n"


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["-U", "-", "memory", "1M"],
        ["memory", "1M", "-U", "-"],
        ["-U-", "memory", "1M"],
        ["-fU", "-", "memory", "1M"],
        ["--unix", "-", "memory", "1M"],
    ],
)
def test_unix_dash_means_a_private_socket(args: list[str]) -> None:
    opts = parsed(*args)
    assert (opts.unix, opts.plugin, opts.params) == ("-", "memory", ["1M"])


@pytest.mark.parametrize("bundle", ["-fr", "-rf", "-rfv"])
def test_bundled_short_flags(bundle: str) -> None:
    opts = parsed(bundle, "memory", "1M")
    assert opts.config.readonly
    assert opts.verbose == ("v" in bundle)


@pytest.mark.parametrize(
    "args",
    [
        ["--filter=" + TAG, "--filter", TAG, "memory", "1M"],
        ["--filter=" + TAG, "memory", "1M", "--filter=" + TAG],
        ["memory", "--filter", TAG, "1M", "--filter=" + TAG],
        ["memory", "1M", "--filter=" + TAG, "--filter=" + TAG],
    ],
)
def test_filters_before_and_after_the_plugin(args: list[str]) -> None:
    opts = parsed(*args)
    assert (opts.plugin, opts.params, opts.filters) == ("memory", ["1M"], [TAG, TAG])


def test_parameters_go_to_the_first_filter_declaring_them_else_the_plugin() -> None:
    opts = parsed("--filter=" + TAG, "memory", "4M", "size=1M", "tag=near", "--filter=" + TAG)
    chain = build_chain(opts)
    near, far = chain.filters
    assert isinstance(near, Tag) and isinstance(far, Tag)
    # The first filter named is the one closest to the client, and it declares size= too.
    assert chain.top.target is near
    assert (near.tag, near.size, far.tag, far.size) == ("near", "1M", "", "")
    # The magic parameter (a bare word) always belongs to the plugin.
    assert isinstance(chain.plugin, MemoryPlugin) and chain.plugin.size == 4 << 20


def test_options_become_server_configuration() -> None:
    opts = parsed("--no-sr", "--no-mc", "--no-eh", "--mask-handshake", "1",
                  "--handshake-timeout", "0", "--shutdown-timeout", "1.5",
                  "--max-connections", "3", "-e", "disk",
                  "-p", "10900", "-i", "::1", "memory", "1M")  # fmt: skip
    c = opts.config
    assert not c.structured_replies and not c.meta_contexts and not c.extended_headers
    assert parsed("memory", "1M").config.extended_headers
    assert c.handshake_flags == HandshakeFlag.FIXED_NEWSTYLE
    assert c.handshake_timeout is None  # 0 = no timeout
    assert (c.shutdown_timeout, c.max_connections) == (1.5, 3)
    assert (opts.exportname, opts.port, opts.ipaddr) == ("disk", 10900, "::1")


def test_parse_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"^unknown option --nope$"):
        parse_args(["--nope"])


def test_options_may_follow_the_plugin_and_its_parameters() -> None:
    """As GNU getopt permutes nbdkit's arguments: options anywhere, words kept in order."""
    opts = parsed("memory", "-r", "size=1M", "-e", "x", "--filter", TAG, "tag=y", "-v")
    assert (opts.plugin, opts.params, opts.filters) == ("memory", ["size=1M", "tag=y"], [TAG])
    assert opts.config.readonly and opts.verbose and opts.exportname == "x"


def test_double_dash_ends_the_options() -> None:
    opts = parsed("-r", "--", "memory", "-v", "--filter=x")
    assert (opts.plugin, opts.params, opts.filters, opts.verbose) == (
        "memory", ["-v", "--filter=x"], [], False,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="unexpected argument '-v'"):
        build_chain(parsed("--", "memory", "1M", "-v"))


@pytest.mark.parametrize(
    ("spelling", "field", "value"),
    [
        (["--fore"], "foreground", True),
        (["--read"], "readonly", True),  # --readonly and --read-only: one option
        (["--expo", "x"], "exportname", "x"),  # --export, --export-name, --exportname
        (["--tls-c=/c"], "tls_certificates", "/c"),
        (["--thr=8"], "threads", 8),
    ],
)
def test_long_names_may_be_shortened_while_unambiguous(
    spelling: list[str], field: str, value: object
) -> None:
    assert getattr(parsed(*spelling, "memory", "1M"), field) == value


@pytest.mark.parametrize(
    ("args", "value"),
    [(["-t8"], 8), (["-t", "8"], 8), (["--threads=8"], 8), (["-t", "4", "-t", "8"], 8)],
)
def test_values_joined_or_apart_and_the_last_one_wins(args: list[str], value: int) -> None:
    assert parsed(*args, "memory", "1M").config.max_in_flight == value


@pytest.mark.parametrize(
    ("given", "mode"),
    [("on", "on"), ("yes", "on"), ("1", "on"), ("off", "off"), ("false", "off"),
     ("require", "require"), ("required", "require"), ("force", "require")],
)  # fmt: skip
def test_tls_takes_nbdkits_spellings(given: str, mode: str) -> None:
    tls = parsed(f"--tls={given}", "memory", "1M").tls
    assert tls.mode is not None and tls.mode.value == mode


def test_long_and_short_option_lists(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["--long-options"]) == 0
    longs = capsys.readouterr().out.split()
    assert {"--unix", "--filter", "--export-name", "--run", "--tls-psk"} <= set(longs)
    assert all(n.startswith("--") for n in longs) and "--long-options" not in longs
    assert cli.run(["--short-options"]) == 0
    shorts = capsys.readouterr().out.split()
    assert {"-U", "-p", "-f", "-r", "-e", "-s", "-t", "-v", "-V"} <= set(shorts)
    # Every listed name parses (bash completion offers exactly these).
    for name in longs + shorts:
        assert name in cli.OPTIONS


# --- the real process ---------------------------------------------------------------------------


def test_private_socket_with_unix_dash_is_removed_at_exit() -> None:
    proc = subprocess.Popen(
        [PYTHON, "-m", "trionbd", "-f", "--print-uri", "-U", "-", "memory", "1M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri.startswith("nbd+unix:///?socket=/")
        socket_path = Path(uri.split("socket=", 1)[1])
        assert socket_path.is_socket()
        assert run(["nbdinfo", "--size", uri]).strip() == str(1 << 20)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not socket_path.exists() and not socket_path.parent.exists()


@pytest.mark.parametrize("foreground", [True, False])
def test_unix_dash_without_run_prints_the_uri(foreground: bool) -> None:
    """``-U -`` names a socket nobody else knows: its URI is printed, as --print-uri."""
    with short_tmpdir() as tmp:
        pidfile = tmp / "pid"
        args = ["-f"] if foreground else []
        proc = subprocess.Popen(
            [PYTHON, "-m", "trionbd", *args, "-U", "-", "-P", str(pidfile), "memory", "1M"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            uri = read_line(proc, HANG_GUARD).strip()
            assert uri.startswith("nbd+unix:///?socket=/"), uri
            assert run(["nbdinfo", "--size", uri]).strip() == str(1 << 20)
            if not foreground:  # the parent returns once the child serves
                assert proc.wait(20) == 0
        finally:
            pid = int(pidfile.read_text()) if pidfile.exists() else proc.pid
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not pidfile.exists(), "the server removed its pidfile")
            rest, _ = proc.communicate(timeout=20)
        assert rest == ""  # the URI once, nothing else


def test_pidfile_is_written_once_listening_and_removed_at_exit() -> None:
    with short_tmpdir() as tmp:
        pidfile = tmp / "trionbd.pid"
        with trionbd_process("-P", str(pidfile), "-e", "x", "memory", "1M") as server:
            # The URI is printed once the server listens; the pidfile is there by then.
            assert pidfile.read_text() == f"{server.proc.pid}\n"
            assert server.uri.endswith("/x?socket=" + server.socket)
            assert run(["nbdinfo", "--size", server.uri_for("")]).strip() == str(1 << 20)
        assert not pidfile.exists()
        assert not Path(server.socket).exists()


def test_pidfile_without_print_uri_means_listening() -> None:
    with short_tmpdir() as tmp:
        pidfile, sock = tmp / "pid", tmp / "sock"
        proc = subprocess.Popen(
            [PYTHON, "-m", "trionbd", "-f", "-U", str(sock), "-P", str(pidfile), "memory", "1M"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not pidfile.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pidfile.read_text() == f"{proc.pid}\n"
            # Written once listening: a client connects right away.
            assert run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"]).strip() == "1048576"
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert not pidfile.exists()


def test_read_only_and_bundles_reach_the_server() -> None:
    with short_tmpdir() as tmp:
        sock = tmp / "sock"
        proc = subprocess.Popen(
            [PYTHON, "-m", "trionbd", "-frU", str(sock), "--print-uri", "memory", "1M"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            uri = proc.stdout.readline().strip()
            assert run(["nbdinfo", "--is", "readonly", uri]) == ""
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err


def test_tcp_port_0_picks_a_free_port_and_prints_a_usable_uri() -> None:
    proc = subprocess.Popen(
        [PYTHON, "-m", "trionbd", "-f", "--print-uri", "-p", "0", "-i", "127.0.0.1", "memory",
         "1M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri.startswith("nbd://127.0.0.1:") and not uri.startswith("nbd://127.0.0.1:0/")
        assert run(["nbdinfo", "--size", uri]).strip() == "1048576"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


@pytest.mark.parametrize(
    ("host", "port", "uri"),
    [
        ("0.0.0.0", 10809, "nbd://localhost/disk"),
        ("::", 10900, "nbd://localhost:10900/disk"),
        ("::1", 10900, "nbd://[::1]:10900/disk"),
        ("192.0.2.1", 10809, "nbd://192.0.2.1/disk"),
    ],
)
def test_tcp_uris(host: str, port: int, uri: str) -> None:
    assert Address(host=host, port=port).uri("disk") == uri
