"""The ``trionbd`` command, with nbdkit's syntax.

    trionbd [OPTIONS] PLUGIN [MAGIC] [KEY=VALUE ...] [--filter=NAME ...]

``--filter`` may stand before or after the plugin and may repeat; the first filter
named is the one closest to the client. A bare word after the plugin sets the plugin's
magic parameter (``trionbd file disk.img``). Each ``key=value`` goes to the first
filter (nearest the client) that declares ``key``, else to the plugin.

Exit status: 0 after a clean shutdown, 1 when the server cannot start, 2 for a bad
command line or parameter.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated

import cyclopts
import trio
from cyclopts import App, Parameter

from . import __version__
from .chain import Chain, ConfigError, Filter, Plugin, StartupError
from .chain.params import describe_params
from .chain.registry import builtin_names, entry_point_names, load, manual, summary
from .protocol.constants import DEFAULT_PORT, HandshakeFlag
from .server import (
    Server,
    ServerConfig,
    open_tcp_listeners,
    open_unix_listener,
    private_socket_path,
    serve,
)
from .server.config import HANDSHAKE_TIMEOUT, SHUTDOWN_TIMEOUT

log = logging.getLogger("trionbd")

_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
"""What the part before ``=`` must look like for a word to be ``key=value`` (as nbdkit)."""


@dataclass
class Options:
    """What the command line asked for (after parsing, before building anything)."""

    plugin: str | None = None
    params: list[str] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)
    unix: str | None = None
    port: int | None = None
    ipaddr: str | None = None
    pidfile: str | None = None
    exportname: str = ""
    verbose: bool = False
    print_uri: bool = False
    help: bool = False
    config: ServerConfig = field(default_factory=ServerConfig)


Flag = Parameter(negative="")

app = App(
    name="trionbd",
    help="A Network Block Device server: a chain of filters over one plugin.",
    help_flags=[],
    version_flags=[],
    result_action="return_value",
)


@app.default
def _parse(
    plugin: str | None = None,
    /,
    *params: str,
    filter: Annotated[list[str] | None, Parameter(name="--filter", help="add a filter")] = None,
    unix: Annotated[
        str | None,
        Parameter(
            name=["-U", "--unix"],
            allow_leading_hyphen=True,
            help="listen on a Unix socket (- for a private temporary one)",
        ),
    ] = None,
    port: Annotated[int | None, Parameter(name=["-p", "--port"], help="TCP port")] = None,
    ipaddr: Annotated[
        str | None, Parameter(name=["-i", "--ipaddr"], help="listen on this address only")
    ] = None,
    foreground: Annotated[
        bool, Parameter(name=["-f", "--foreground"], negative="", help="stay in the foreground")
    ] = False,
    pidfile: Annotated[
        str | None, Parameter(name=["-P", "--pidfile"], help="write the PID here once listening")
    ] = None,
    readonly: Annotated[
        bool, Parameter(name=["-r", "--readonly"], negative="", help="serve read-only")
    ] = False,
    exportname: Annotated[
        str, Parameter(name=["-e", "--exportname"], help="export name used in printed URIs")
    ] = "",
    verbose: Annotated[
        bool, Parameter(name=["-v", "--verbose"], negative="", help="debug messages")
    ] = False,
    print_uri: Annotated[
        bool, Parameter(name="--print-uri", negative="", help="print the URI once listening")
    ] = False,
    version: Annotated[bool, Parameter(name=["-V", "--version"], negative="")] = False,
    help: Annotated[bool, Parameter(name=["-h", "--help"], negative="")] = False,
    no_sr: Annotated[
        bool, Parameter(name="--no-sr", negative="", help="do not offer structured replies")
    ] = False,
    no_mc: Annotated[
        bool, Parameter(name="--no-mc", negative="", help="do not offer meta contexts")
    ] = False,
    mask_handshake: Annotated[
        int | None, Parameter(name="--mask-handshake", help="handshake flags to offer")
    ] = None,
    handshake_timeout: Annotated[
        float, Parameter(name="--handshake-timeout", help="seconds to finish negotiating")
    ] = HANDSHAKE_TIMEOUT,
    shutdown_timeout: Annotated[
        float, Parameter(name="--shutdown-timeout", help="grace seconds at shutdown")
    ] = SHUTDOWN_TIMEOUT,
    max_connections: Annotated[
        int | None, Parameter(name="--max-connections", help="refuse clients beyond this")
    ] = None,
) -> Options | str:
    if version:
        return f"trionbd {__version__}"
    config = ServerConfig(
        readonly=readonly,
        structured_replies=not no_sr,
        meta_contexts=not no_mc,
        handshake_timeout=handshake_timeout or None,
        shutdown_timeout=shutdown_timeout,
        max_connections=max_connections,
    )
    if mask_handshake is not None:
        config.handshake_flags &= mask_handshake
        if not config.handshake_flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise ConfigError(
                f"--mask-handshake={mask_handshake} drops FIXED_NEWSTYLE (bit 0), the only "
                "handshake trionbd speaks: no client could connect"
            )
    return Options(
        plugin=plugin,
        params=list(params),
        filters=list(filter or []),
        unix=unix,
        port=port,
        ipaddr=ipaddr,
        pidfile=pidfile,
        exportname=exportname,
        verbose=verbose,
        print_uri=print_uri,
        help=help,
        config=config,
    )


def parse_args(argv: Sequence[str]) -> Options | str:
    """Parse the command line; raises ``ConfigError`` with one line on mistakes."""
    try:
        result = app(list(argv), exit_on_error=False, print_error=False)
    except cyclopts.CycloptsError as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    assert isinstance(result, Options | str)
    return result


def build_chain(opts: Options) -> Chain:
    """Load the plugin and filters and hand each its parameters."""
    if opts.plugin is None:
        raise ConfigError("no plugin given (try: trionbd --help)")
    plugin_cls = load(Plugin, opts.plugin)
    filter_classes = [load(Filter, name) for name in opts.filters]
    routed: list[list[tuple[str, str]]] = [[] for _ in range(len(filter_classes) + 1)]
    magic_seen = False
    for word in opts.params:
        key, sep, value = word.partition("=")
        if not sep or not _KEY.fullmatch(key):  # a URI with "=" is a magic value (nbdkit)
            if magic_seen or plugin_cls.magic_param is None:
                raise ConfigError(f"unexpected argument {word!r} (parameters are key=value)")
            magic_seen = True
            routed[-1].append((plugin_cls.magic_param, word))
            continue
        owners: list[type[Plugin] | type[Filter]] = [*filter_classes, plugin_cls]
        for i, cls in enumerate(owners):
            if any(p.name == key for p in cls.params):
                routed[i].append((key, value))
                break
        else:
            names = ", ".join(c.name for c in owners)
            raise ConfigError(f"unknown parameter {key!r} (not a parameter of {names})")
    filters = [cls.from_params(items) for cls, items in zip(filter_classes, routed, strict=False)]
    return Chain(plugin_cls.from_params(routed[-1]), filters)


def help_text(opts: Options) -> str:
    """``--help`` alone: options, plugins and filters; with names: their manuals."""
    if opts.plugin or opts.filters:
        classes: list[type[Plugin] | type[Filter]] = [load(Filter, n) for n in opts.filters]
        if opts.plugin:
            classes.append(load(Plugin, opts.plugin))
        return "\n\n".join(
            f"{manual(cls)}\n\nParameters of {cls.name}:\n{describe_params(cls.params)}"
            for cls in classes
        )
    lines = [
        "usage: trionbd [OPTIONS] PLUGIN [MAGIC] [KEY=VALUE ...] [--filter=NAME ...]",
        "",
        "Serves a chain of filters over one plugin. The first --filter named is the one",
        "closest to the client; key=value parameters go to the filter or plugin that",
        "declares them; a bare word after the plugin is its magic parameter.",
        "",
        "Options:",
    ]
    for argument in app.assemble_argument_collection(parse_docstring=False):
        names = ", ".join(argument.parameter.name or ())
        if names and argument.parameter.help:
            lines.append(f"  {names:28} {argument.parameter.help}")
    lines += ["", "Plugins (trionbd PLUGIN --help for a manual):"]
    for name in builtin_names(Plugin) + entry_point_names(Plugin):
        lines.append(f"  {name:14} {summary(load(Plugin, name))}")
    lines += ["", "Filters (trionbd --filter=NAME --help for a manual):"]
    for name in builtin_names(Filter) + entry_point_names(Filter):
        lines.append(f"  {name:14} {summary(load(Filter, name))}")
    return "\n".join(lines)


async def open_listeners(opts: Options, cleanup: list[str]) -> list[trio.SocketListener]:
    """Open the listeners the options ask for; Unix socket paths (and a private
    directory for ``-U -``) are added to ``cleanup`` for removal at exit."""
    listeners: list[trio.SocketListener] = []
    if opts.unix is not None:
        path = opts.unix
        if path == "-":
            path = private_socket_path()
            cleanup.append(os.path.dirname(path))
        listeners.append(await open_unix_listener(path))
        cleanup.insert(0, path)
    if opts.port is not None or opts.unix is None:
        port = DEFAULT_PORT if opts.port is None else opts.port  # -p 0: any free port
        listeners += await open_tcp_listeners(port, opts.ipaddr)
    return listeners


async def serve_main(chain: Chain, opts: Options) -> None:
    """Listen, serve until SIGINT/SIGTERM, then shut down gracefully. SIGUSR1 asks every
    layer for a report (``report()``) and serving goes on."""
    cleanup: list[str] = []
    try:
        try:
            listeners = await open_listeners(opts, cleanup)
        except OSError as e:
            raise StartupError(f"cannot listen: {e}") from e
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
            async with trio.open_nursery() as nursery:
                server: Server = await nursery.start(serve, chain, listeners, opts.config)
                for address in server.addresses:
                    log.info("listening on %s", address.uri(opts.exportname))
                # The pidfile first: whoever waited for the printed URI finds it too.
                if opts.pidfile:
                    write_pidfile(opts.pidfile)
                if opts.print_uri and server.addresses:
                    print(server.addresses[0].uri(opts.exportname), flush=True)
                nursery.start_soon(_watch_signals, signals, server, nursery.cancel_scope)
    finally:
        for path in cleanup:
            remove_quietly(path)


def remove_quietly(path: str) -> None:
    try:
        if os.path.isdir(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except OSError:
        pass


async def _watch_signals(
    signals: AsyncIterator[int], server: Server, scope: trio.CancelScope
) -> None:
    """SIGUSR1: every layer reports. First SIGINT/SIGTERM: graceful shutdown. Second: cut
    the grace period short."""
    count = 0
    async for signum in signals:
        if signum == signal.SIGUSR1:
            await report(server.chain)
            continue
        count += 1
        log.info("%s received", signal.Signals(signum).name)
        server.shutdown(0 if count > 1 else None)
        scope.cancel()


async def report(chain: Chain) -> None:
    """Call ``report()`` of every layer, client side first; failures are logged."""
    for layer in reversed(chain.layers):
        try:
            await layer.target.report()
        except Exception as e:
            log.error("%s: report failed: %s", layer.name, e)


def write_pidfile(path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="trionbd: %(levelname)s: %(message)s" if verbose else "trionbd: %(message)s",
        stream=sys.stderr,
    )


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(args)
        if isinstance(opts, str):
            print(opts)
            return 0
        if opts.help:
            print(help_text(opts))
            return 0
        setup_logging(opts.verbose)
        chain = build_chain(opts)
        chain.get_ready()
    except ConfigError as e:
        print(f"trionbd: {e}", file=sys.stderr)
        return 2
    failed: list[BaseException] = []
    try:
        trio.run(serve_main, chain, opts)
    except* StartupError as group:
        failed += leaves(group)
    finally:
        if opts.pidfile:
            remove_quietly(opts.pidfile)
        chain.unload()
    for error in failed:
        print(f"trionbd: {error}", file=sys.stderr)
    return 1 if failed else 0


def leaves(error: BaseException) -> list[BaseException]:
    """The non-group exceptions inside a (possibly nested) exception group."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in leaves(e)]
    return [error]


def main() -> None:
    sys.exit(run())
