"""The ``trionbd`` command, with nbdkit's syntax.

    trionbd [OPTIONS] PLUGIN [MAGIC] [KEY=VALUE ...] [--filter=NAME ...]

``--filter`` may stand before or after the plugin and may repeat; the first filter
named is the one closest to the client. A bare word after the plugin sets the plugin's
magic parameter (``trionbd file disk.img``). Each ``key=value`` goes to the first
filter (nearest the client) that declares ``key``, else to the plugin.

How it runs, as nbdkit does: once its sockets listen (and the pidfile is written) it
forks into the background and the parent exits 0, so ``trionbd -U sock ... && client``
works; ``-f`` stays in the foreground. ``--run CMD`` serves (on a private Unix socket
unless ``-U``/``-p`` say otherwise) while ``sh -c CMD`` runs with ``$uri``, ``$nbd``,
``$unixsocket``, ``$port``, ``$exportname`` and ``$tls`` in its environment, then exits
with its status. ``-s`` serves one client on stdin/stdout. ``LISTEN_PID``/``LISTEN_FDS``
(systemd socket activation) serve the passed sockets. SIGINT, SIGTERM and SIGQUIT shut
down gracefully (a second one cuts the grace period short); SIGUSR1 asks every layer
for a report; SIGHUP is ignored.

Exit status: 0 after a clean shutdown, 1 when the server cannot start (or plugin code
stopped it by raising ``KeyboardInterrupt`` or ``SystemExit``: one line says what and
where), 2 for a bad command line or parameter; with ``--run``, the command's status
(128+N if signal N killed it).
"""

from __future__ import annotations

import logging
import os
import platform
import re
import signal
import socket
import sys
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import cyclopts
import trio
from cyclopts import App, Parameter

from . import __version__
from .chain import Chain, ConfigError, Filter, Plugin, StartupError
from .chain.params import describe_params
from .chain.registry import builtin_names, entry_point_names, load, manual, summary
from .protocol.constants import DEFAULT_PORT, HandshakeFlag
from .server import Server, ServerConfig, daemon, private_socket_path, serve
from .server.config import HANDSHAKE_TIMEOUT, SHUTDOWN_TIMEOUT
from .server.listeners import as_listener, bind_tcp, bind_unix
from .server.tls import ROOT_CERTIFICATES_DIR, TLSMode, TLSSettings, psk_supported

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
    foreground: bool = False
    run: str | None = None
    single: bool = False
    exit_with_parent: bool = False
    log: str | None = None
    dump_plugin: bool = False
    dump_config: bool = False
    tls: TLSSettings = field(default_factory=TLSSettings)
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
        str | None,
        Parameter(name=["-i", "--ipaddr", "--ip-addr"], help="listen on this address only"),
    ] = None,
    foreground: Annotated[
        bool,
        Parameter(
            name=["-f", "--foreground", "--no-fork"],
            negative="",
            help="stay in the foreground (default: detach once listening)",
        ),
    ] = False,
    pidfile: Annotated[
        str | None,
        Parameter(name=["-P", "--pidfile", "--pid-file"], help="write the PID here once listening"),
    ] = None,
    readonly: Annotated[
        bool,
        Parameter(name=["-r", "--readonly", "--read-only"], negative="", help="serve read-only"),
    ] = False,
    exportname: Annotated[
        str,
        Parameter(
            name=["-e", "--exportname", "--export-name", "--export"],
            help="export name used in printed URIs and $uri",
        ),
    ] = "",
    run: Annotated[
        str | None,
        Parameter(
            name="--run",
            allow_leading_hyphen=True,
            help="serve while sh -c CMD runs (with $uri set); exit with its status",
        ),
    ] = None,
    single: Annotated[
        bool,
        Parameter(
            name=["-s", "--single", "--stdin"],
            negative="",
            help="serve one client on stdin/stdout",
        ),
    ] = False,
    exit_with_parent: Annotated[
        bool,
        Parameter(name="--exit-with-parent", negative="", help="exit when the parent exits"),
    ] = False,
    log_to: Annotated[
        Literal["stderr", "syslog", "null"] | None,
        Parameter(name="--log", help="errors to stderr, syslog or null (background: syslog)"),
    ] = None,
    dump_plugin: Annotated[
        bool, Parameter(name="--dump-plugin", negative="", help="describe the plugin, exit")
    ] = False,
    dump_config: Annotated[
        bool, Parameter(name="--dump-config", negative="", help="describe trionbd, exit")
    ] = False,
    tls: Annotated[
        Literal["off", "on", "require"] | None,
        Parameter(name="--tls", help="TLS: off, on or require (default: on if certificates)"),
    ] = None,
    tls_certificates: Annotated[
        str | None,
        Parameter(name="--tls-certificates", help="directory with ca-cert.pem, server-*.pem"),
    ] = None,
    tls_psk: Annotated[
        str | None,
        Parameter(name="--tls-psk", help="pre-shared keys file (Python >= 3.13)"),
    ] = None,
    tls_verify_peer: Annotated[
        bool,
        Parameter(name="--tls-verify-peer", negative="", help="require client certificates"),
    ] = False,
    threads: Annotated[
        int | None,
        Parameter(name=["-t", "--threads"], help="requests served at once per connection"),
    ] = None,
    newstyle: Annotated[
        bool, Parameter(name=["-n", "--newstyle", "--new-style"], negative="")
    ] = False,
    oldstyle: Annotated[
        bool, Parameter(name=["-o", "--oldstyle", "--old-style"], negative="")
    ] = False,
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
        float,
        Parameter(
            name="--handshake-timeout",
            help="seconds a negotiating client has for each option (0: no limit)",
        ),
    ] = HANDSHAKE_TIMEOUT,
    idle_timeout: Annotated[
        float,
        Parameter(
            name="--idle-timeout",
            help="close a client that sends nothing for this many seconds with no request "
            "in flight (0: never, the default)",
        ),
    ] = 0,
    shutdown_timeout: Annotated[
        float, Parameter(name="--shutdown-timeout", help="grace seconds at shutdown")
    ] = SHUTDOWN_TIMEOUT,
    max_connections: Annotated[
        int | None, Parameter(name="--max-connections", help="refuse clients beyond this")
    ] = None,
) -> Options | str:
    if version:
        return f"trionbd {__version__}"
    del newstyle  # -n is accepted: newstyle is the only protocol
    if oldstyle:
        raise ConfigError("-o/--oldstyle: the oldstyle protocol is not supported (newstyle only)")
    for name, value in (
        ("--handshake-timeout", handshake_timeout),
        ("--idle-timeout", idle_timeout),
        ("--shutdown-timeout", shutdown_timeout),
    ):
        if value < 0:
            raise ConfigError(f"{name}={value}: a number of seconds, at least 0")
    if max_connections is not None and max_connections < 1:
        raise ConfigError(f"--max-connections={max_connections}: at least 1 client")
    if threads is not None and threads < 1:
        raise ConfigError(f"-t/--threads={threads}: at least 1 request must be served at once")
    config = ServerConfig(
        readonly=readonly,
        structured_replies=not no_sr,
        meta_contexts=not no_mc,
        handshake_timeout=handshake_timeout or None,
        idle_timeout=idle_timeout or None,
        shutdown_timeout=shutdown_timeout,
        max_connections=max_connections,
    )
    if threads is not None:
        config.max_in_flight = threads
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
        # Absolute paths: the background process moves to /.
        unix=unix if unix in (None, "-") else os.path.abspath(unix),
        port=port,
        ipaddr=ipaddr,
        pidfile=None if pidfile is None else os.path.abspath(pidfile),
        exportname=exportname,
        verbose=verbose,
        print_uri=print_uri,
        help=help,
        foreground=foreground,
        run=run,
        single=single,
        exit_with_parent=exit_with_parent,
        log=log_to,
        dump_plugin=dump_plugin,
        dump_config=dump_config,
        tls=TLSSettings(
            mode=None if tls is None else TLSMode(tls),
            certificates=None if tls_certificates is None else os.path.abspath(tls_certificates),
            psk=None if tls_psk is None else os.path.abspath(tls_psk),
            verify_peer=tls_verify_peer,
        ),
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
    owners: list[type[Plugin] | type[Filter]] = [*filter_classes, plugin_cls]
    routed: list[list[tuple[str, str]]] = [[] for _ in owners]
    magic_seen = False
    for word in opts.params:
        key, sep, value = word.partition("=")
        if not sep or not _KEY.fullmatch(key):  # a URI with "=" is a magic value (nbdkit)
            if magic_seen or plugin_cls.magic_param is None:
                raise ConfigError(f"unexpected argument {word!r} (parameters are key=value)")
            magic_seen = True
            routed[-1].append((plugin_cls.magic_param, word))
            continue
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


def dump_config() -> str:
    """``--dump-config``: what this trionbd is, as sorted ``key=value`` lines (nbdkit's)."""
    package = os.path.dirname(os.path.abspath(__file__))
    major, minor, *_ = __version__.split(".")
    items = {
        "binary": os.path.abspath(sys.argv[0]),
        "exit_with_parent": "yes" if daemon.exit_with_parent_supported() else "no",
        "filterdir": os.path.join(package, "filters"),
        "filters": ",".join(builtin_names(Filter) + entry_point_names(Filter)),
        "host_cpu": platform.machine(),
        "host_os": sys.platform,
        "name": "trionbd",
        "plugindir": os.path.join(package, "plugins"),
        "plugins": ",".join(builtin_names(Plugin) + entry_point_names(Plugin)),
        "python": platform.python_version(),
        "root_tls_certificates_dir": ROOT_CERTIFICATES_DIR,
        "tls": "yes",
        "tls_psk": "yes" if psk_supported() else "no",
        "trio": trio.__version__,
        "version": __version__,
        "version_major": major,
        "version_minor": minor,
    }
    return "\n".join(f"{key}={value}" for key, value in sorted(items.items()))


_PLUGIN_CALLBACKS = sorted(
    name
    for name, value in vars(Plugin).items()
    if callable(value) and not name.startswith("_") and name != "from_params"
)


def dump_plugin(opts: Options) -> str:
    """``--dump-plugin``: the plugin as ``key=value`` lines in nbdkit's style (path, name,
    version, thread model, magic parameter, parameters, ``has_CALLBACK=1`` per callback)."""
    if opts.plugin is None:
        raise ConfigError("--dump-plugin needs a plugin name")
    cls = load(Plugin, opts.plugin)
    module = sys.modules.get(cls.__module__)
    lines = [
        f"path={getattr(module, '__file__', None) or cls.__module__}",
        f"name={cls.name}",
        f"version={cls.version or __version__}",
        f"thread_model={cls.concurrency.name.lower()}",
        f"nonblocking={int(cls.nonblocking)}",
    ]
    if cls.magic_param:
        lines.append(f"magic_config_key={cls.magic_param}")
    lines.append(f"params={','.join(p.name for p in cls.params)}")
    lines += [
        f"has_{name}=1"
        for name in _PLUGIN_CALLBACKS
        if getattr(cls, name) is not getattr(Plugin, name)
    ]
    return "\n".join(lines)


def _foreground(opts: Options, activated: bool) -> bool:
    """Check that the run modes asked for go together; whether to stay in the
    foreground (everything but a plain listening server does)."""
    listening = [
        flag
        for flag, given in (
            ("-U", opts.unix is not None),
            ("-p", opts.port is not None),
            ("-i", opts.ipaddr is not None),
            ("--run", opts.run is not None),
        )
        if given
    ]
    if opts.single and listening:
        raise ConfigError(f"-s serves stdin/stdout: it cannot be combined with {listening[0]}")
    if activated and (listening or opts.single):
        flag = listening[0] if listening else "-s"
        raise ConfigError(
            f"socket activation (LISTEN_PID/LISTEN_FDS) serves the sockets passed in: it "
            f"cannot be combined with {flag}"
        )
    if opts.exit_with_parent and not daemon.exit_with_parent_supported():
        raise ConfigError(f"--exit-with-parent is supported on Linux only, not {sys.platform}")
    return bool(opts.foreground or opts.run or opts.single or activated or opts.exit_with_parent)


def bind_sockets(opts: Options, cleanup: list[str]) -> list[socket.socket]:
    """Listen where the options say, before forking. Unix socket paths (and the private
    directory of ``-U -``) are added to ``cleanup`` for removal at exit. ``--run``
    without ``-U`` or ``-p`` listens on a private Unix socket."""
    socks: list[socket.socket] = []
    unix = opts.unix
    if unix is None and opts.run is not None and opts.port is None:
        unix = "-"
    try:
        if unix is not None:
            path = unix
            if path == "-":
                path = private_socket_path()
                cleanup.append(os.path.dirname(path))
            socks.append(bind_unix(path))
            cleanup.insert(0, path)
        if opts.port is not None or unix is None:
            port = DEFAULT_PORT if opts.port is None else opts.port  # -p 0: any free port
            socks += bind_tcp(port, opts.ipaddr)
    except OSError as e:
        for sock in socks:
            sock.close()
        raise StartupError(f"cannot listen: {e}") from e
    return socks


async def serve_main(
    chain: Chain,
    opts: Options,
    sockets: list[socket.socket],
    stdio: tuple[int, int] | None,
    readiness: daemon.Readiness,
    cleanup: list[str],
) -> int:
    """Serve until a signal (or the ``-s`` client, or the ``--run`` command) ends it;
    returns the exit status."""
    listeners = [as_listener(sock) for sock in sockets]
    status: list[int] = []  # the --run command's
    # The receiver restores the handlers it found when it closes: SIGUSR1 arriving
    # during the last moments of shutdown must find "ignore", not "terminate".
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
    with trio.open_signal_receiver(*stops, signal.SIGUSR1) as signals:
        # The watcher outlives the serving nursery: a second signal must still reach it
        # while the first one's graceful shutdown runs.
        async with trio.open_nursery() as watching:
            async with trio.open_nursery() as serving:
                server: Server = await serving.start(serve, chain, listeners, opts.config)
                for address in server.addresses:
                    log.info("listening on %s", address.uri(opts.exportname))
                # The pidfile first: whoever waited for the printed URI finds it too.
                if opts.pidfile:
                    daemon.write_pidfile(opts.pidfile)
                    cleanup.append(opts.pidfile)
                if opts.print_uri and server.addresses:
                    print(uri_of(server, opts), flush=True)
                readiness.ready(keep_stderr=opts.verbose or opts.log == "stderr")
                watching.start_soon(_watch_signals, signals, server, serving.cancel_scope)
                if stdio is not None:
                    await server.serve_stream(daemon.stdio_stream(*stdio))
                    serving.cancel_scope.cancel()
                elif opts.run is not None:
                    await run_command(opts.run, server, opts, status)
                    serving.cancel_scope.cancel()
            watching.cancel_scope.cancel()
    return status[0] if status else 0


def uri_of(server: Server, opts: Options) -> str:
    """The URI clients use: the first address, ``nbds`` when TLS is required."""
    return server.addresses[0].uri(opts.exportname, tls=opts.config.tls is TLSMode.REQUIRE)


KILL_AFTER = 5.0
"""Seconds a ``--run`` command has between SIGTERM and SIGKILL when trionbd stops first."""


async def run_command(command: str, server: Server, opts: Options, status: list[int]) -> None:
    """Run ``sh -c command`` with nbdkit's variables set; append its exit status (128+N
    when signal N killed it) to ``status``. If trionbd is stopped first, the command
    gets SIGTERM (SIGKILL after ``KILL_AFTER`` seconds)."""
    env = daemon.run_environment(
        server.addresses[0], opts.exportname, opts.config.tls, opts.tls.certificates, opts.tls.psk
    )
    proc = await trio.lowlevel.open_process(["/bin/sh", "-c", command], env=env)
    try:
        await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(KILL_AFTER):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        assert proc.returncode is not None
        if proc.returncode < 0:
            log.warning("--run: the command was killed by signal %d", -proc.returncode)
        status.append(daemon.exit_status(proc.returncode))


async def _watch_signals(
    signals: AsyncIterator[int], server: Server, scope: trio.CancelScope
) -> None:
    """SIGUSR1: every layer reports. First SIGINT/SIGTERM/SIGQUIT: graceful shutdown.
    Second: cut the grace period short."""
    count = 0
    async for signum in signals:
        if signum == signal.SIGUSR1:
            await server.chain.report()
            continue
        count += 1
        log.info("%s received", signal.Signals(signum).name)
        server.shutdown(0 if count > 1 else None)
        scope.cancel()


def setup_logging(verbose: bool, target: str) -> None:
    """Errors and warnings go to ``target`` (stderr, syslog or null); with ``-v``, debug
    messages also go to stderr (never to syslog, as nbdkit). Nothing goes to stdout."""
    fmt = "trionbd: %(levelname)s: %(message)s" if verbose else "trionbd: %(message)s"
    handlers: list[logging.Handler] = []
    if target == "stderr" or verbose:
        to_stderr = logging.StreamHandler(sys.stderr)
        if target != "stderr":
            to_stderr.addFilter(lambda record: record.levelno < logging.WARNING)
        handlers.append(to_stderr)
    if target == "syslog":
        to_syslog = daemon.SyslogHandler()
        to_syslog.setLevel(logging.WARNING)
        to_syslog.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(to_syslog)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format=fmt,
        handlers=handlers or [logging.NullHandler()],
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
        if opts.dump_config:
            print(dump_config())
            return 0
        if opts.dump_plugin:
            print(dump_plugin(opts))
            return 0
        activated = daemon.activation_sockets()
        foreground = _foreground(opts, activated is not None)
        opts.tls.check()
        setup_logging(opts.verbose, opts.log or ("stderr" if foreground else "syslog"))
        chain = build_chain(opts)
        chain.get_ready()
    except ConfigError as e:
        print(f"trionbd: {e}", file=sys.stderr)
        return 2
    except StartupError as e:
        print(f"trionbd: {e}", file=sys.stderr)
        return 1
    cleanup: list[str] = []
    failed: list[str] = []
    status = 1
    try:
        try:
            opts.config.tls, opts.config.tls_context = opts.tls.resolve()
            sockets = activated if activated is not None else []
            if activated is None and not opts.single:
                sockets = bind_sockets(opts, cleanup)
            if opts.exit_with_parent:
                daemon.exit_with_parent()
        except StartupError as e:
            failed.append(str(e))
        else:
            stdio = daemon.take_stdio() if opts.single else None
            readiness = daemon.Readiness() if foreground else daemon.fork_into_background()
            try:
                status = trio.run(serve_main, chain, opts, sockets, stdio, readiness, cleanup)
            except* StartupError as group:
                failed += [str(e) for e in leaves(group)]
            except* (KeyboardInterrupt, SystemExit) as group:
                failed += [stopped_by(e) for e in leaves(group)]
    finally:
        for path in cleanup:
            daemon.remove_quietly(path)
        chain.unload()
    for message in failed:
        print(f"trionbd: {message}", file=sys.stderr)
    return 1 if failed else status


def stopped_by(error: BaseException) -> str:
    """One line for a ``KeyboardInterrupt`` or ``SystemExit`` raised while serving
    (plugin code may raise them; the signals themselves are handled): what was raised
    where. It still stops the server, as it would a library server."""
    what = repr(error) if error.args else type(error).__name__
    frames = traceback.extract_tb(error.__traceback__)
    where = f" in {frames[-1].name} ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{what} raised{where} stopped the server"


def leaves(error: BaseException) -> list[BaseException]:
    """The non-group exceptions inside a (possibly nested) exception group."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in leaves(e)]
    return [error]


def main() -> None:
    sys.exit(run())
