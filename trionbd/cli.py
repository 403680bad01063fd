"""The ``trionbd`` command, with nbdkit's syntax.

    trionbd [OPTIONS] PLUGIN [MAGIC] [KEY=VALUE ...] [--filter=NAME ...]

``--filter`` may stand before or after the plugin and may repeat; the first filter
named is the one closest to the client. A bare word after the plugin sets the plugin's
magic parameter (``trionbd file disk.img``). Each ``key=value`` goes to the first
filter (nearest the client) that declares ``key``, else to the plugin.

Each option is declared once, as a field of ``Options`` (its spellings, its value, its
help line and its default), and the words are parsed the way GNU getopt_long parses
nbdkit's: options anywhere, ``-fr`` bundles, unambiguous abbreviations, ``--``.

How it runs, as nbdkit does: once its sockets listen (and the pidfile is written) it
forks into the background and the parent exits 0, so ``trionbd -U sock ... && client``
works; ``-f`` stays in the foreground. ``--run CMD`` serves (on a private Unix socket
unless ``-U``/``-p`` say otherwise) while ``sh -c CMD`` runs with ``$uri``, ``$nbd``,
``$unixsocket``, ``$port``, ``$exportname`` and ``$tls`` in its environment, then exits
with its status. ``-U -`` listens on a private Unix socket and, without ``--run``,
prints its URI (nobody could find it otherwise). ``-s`` serves one client on
stdin/stdout. ``LISTEN_PID``/``LISTEN_FDS``
(systemd socket activation) serve the passed sockets. SIGINT, SIGTERM and SIGQUIT shut
down gracefully (a second one cuts the grace period short); SIGUSR1 asks every layer
for a report; SIGHUP is ignored.

Exit status: 0 after a clean shutdown, 1 when the server cannot start (or plugin code
stopped it by raising ``KeyboardInterrupt`` or ``SystemExit``: one line says what and
where), 2 for a bad command line or parameter; with ``--run``, the command's status
(128+N if signal N killed it).

(Longer than the ~800 lines a module should keep to: about half of it is the option
declarations, which are the manual; the parser and the run modes read them in place.)
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shlex
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import trio

from . import __version__
from .chain import Chain, ConfigError, Filter, Plugin, StartupError
from .chain.params import (
    describe_params,
    help_columns,
    parse_bool,
    parse_int,
    parse_seconds_or_zero,
)
from .net.address import Address
from .protocol.constants import DEFAULT_PORT, HandshakeFlag
from .registry import builtin_names, entry_point_names, load, manual, summary
from .server import Server, ServerConfig, daemon, private_socket_path, serve, workers
from .server.config import HANDSHAKE_TIMEOUT, MAX_IN_FLIGHT, SHUTDOWN_TIMEOUT
from .server.listeners import address_of, as_listener, bind_tcp, bind_unix, bind_vsock
from .server.tls import ROOT_CERTIFICATES_DIR, TLSMode, TLSSettings, psk_supported

log = logging.getLogger("trionbd")

_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
"""What the part before ``=`` must look like for a word to be ``key=value`` (as nbdkit)."""


# --- options: each declared once, on its field of Options ---------------------------------------


@dataclass(frozen=True)
class Option:
    """How a field of ``Options`` is given on the command line."""

    names: tuple[str, ...]
    """``-U``, ``--unix``, ...: one letter after one hyphen, or a long name after two."""
    help: str
    metavar: str | None
    """The value as ``--help`` shows it; ``None`` for a flag, which takes no value."""
    parse: Callable[[str], Any]
    repeat: bool
    """Every use adds to a list (``--filter``); otherwise the last use wins (as getopt)."""
    const: Any = True
    """What a flag stores in its field (``-4`` and ``-6`` store their address family)."""


def _option(
    *names: str,
    metavar: str,
    help: str,
    parse: Callable[[str], Any] = str,
    default: Any = None,
) -> Any:
    """A field of ``Options`` set by the option ``names``: the one place that gives its
    spellings, its value's parser, its ``--help`` line and its default. A list default
    makes the option repeatable."""
    repeat = isinstance(default, list)
    meta = {"options": (Option(names, help, metavar, parse, repeat),)}
    if repeat:
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


def _flag(*names: str, help: str) -> Any:
    """A field of ``Options`` that the option ``names`` sets to true (it takes no value)."""
    return field(default=False, metadata={"options": (Option(names, help, None, str, False),)})


def _either(*flags: tuple[tuple[str, ...], str, Any]) -> Any:
    """A field of ``Options`` set by any of several flags, each ``(names, help, value)``
    storing its own value; the last one given wins (``-4``/``-6``). Default: ``None``."""
    options = tuple(Option(names, help, None, str, False, value) for names, help, value in flags)
    return field(default=None, metadata={"options": options})


def _port(text: str) -> int:
    """A port as ``-p`` takes it: TCP's are 16-bit, AF_VSOCK's 32-bit (checked in
    ``Options`` once ``--vsock`` is known)."""
    port = parse_int(text)
    if not 0 <= port <= 0xFFFFFFFF:
        raise ValueError(f"{text!r} is not a port (0 to 65535; with --vsock to 4294967295)")
    return port


def _count(text: str) -> int:
    n = parse_int(text)
    if n < 1:
        raise ValueError(f"{text!r} is less than 1")
    return n


def _socket_path(text: str) -> str:
    return text if text == "-" else os.path.abspath(text)


LOG_TARGETS = ("stderr", "syslog", "null")


def _log_target(text: str) -> str:
    """nbdkit's targets as they are; anything else is a file (made absolute)."""
    if not text:
        raise ValueError("'' is neither stderr, syslog, null nor a file")
    return text if text in LOG_TARGETS else os.path.abspath(text)


def _tls_mode(text: str) -> TLSMode:
    """nbdkit's spellings: ``require`` (or ``required``, ``force``), else a boolean."""
    if text.lower() in ("require", "required", "force"):
        return TLSMode.REQUIRE
    try:
        return TLSMode.ON if parse_bool(text) else TLSMode.OFF
    except ValueError:
        raise ValueError(f"{text!r} is not off, on or require") from None


@dataclass
class Options:
    """The command line: the plugin, the words after it, and one field per option.

    Paths are made absolute as they are parsed (the background process moves to /).
    ``config`` and ``tls`` are what the options make of the server's settings."""

    plugin: str | None = None
    params: list[str] = field(default_factory=list)
    """The words after the plugin's name: ``key=value`` parameters and the magic value."""

    filters: list[str] = _option(
        "--filter", metavar="NAME", default=[],
        help="add a filter; repeatable, the first named is the one nearest the client",
    )  # fmt: skip
    unix: str | None = _option(
        "-U", "--unix", metavar="SOCKET", parse=_socket_path,
        help="listen on a Unix socket; - for a private one, whose URI is printed",
    )  # fmt: skip
    port: int | None = _option(
        "-p", "--port", metavar="PORT", parse=_port,
        help=f"listen on this TCP port; 0: any free one (without -U: {DEFAULT_PORT})",
    )  # fmt: skip
    ipaddr: str | None = _option(
        "-i", "--ipaddr", "--ip-addr", metavar="ADDR",
        help="listen on this address only (default: every address)",
    )  # fmt: skip
    family: socket.AddressFamily | None = _either(
        (("-4", "--ipv4-only"), "TCP on IPv4 only (-i's name resolved to IPv4)", socket.AF_INET),
        (("-6", "--ipv6-only"), "TCP on IPv6 only (-i's name resolved to IPv6)", socket.AF_INET6),
    )
    vsock: bool = _flag(
        "--vsock", help=f"listen on AF_VSOCK; -p is its port (default {DEFAULT_PORT})"
    )
    keepalive: bool = _flag("--keepalive", help="TCP keepalive (SO_KEEPALIVE) on client sockets")
    exportname: str = _option(
        "-e", "--exportname", "--export-name", "--export", metavar="NAME", default="",
        help="the export named in printed URIs and in --run's $uri",
    )  # fmt: skip
    readonly: bool = _flag("-r", "--readonly", "--read-only", help="serve read-only")
    foreground: bool = _flag(
        "-f", "--foreground", "--no-fork",
        help="stay in the foreground (default: go to the background once listening)",
    )  # fmt: skip
    pidfile: str | None = _option(
        "-P", "--pidfile", "--pid-file", metavar="FILE", parse=os.path.abspath,
        help="write the process id to FILE once listening",
    )  # fmt: skip
    print_uri: bool = _flag("--print-uri", help="print the URI to connect to once listening")
    run: str | None = _option(
        "--run", metavar="CMD",
        help="serve while sh -c CMD runs (with $uri set), then exit with its status",
    )  # fmt: skip
    single: bool = _flag("-s", "--single", "--stdin", help="serve one client on stdin/stdout")
    exit_with_parent: bool = _flag("--exit-with-parent", help="exit when the parent exits")
    tls_mode: TLSMode | None = _option(
        "--tls", metavar="off|on|require", parse=_tls_mode,
        help="TLS for clients (default: on when certificates are found)",
    )  # fmt: skip
    tls_certificates: str | None = _option(
        "--tls-certificates", metavar="DIR", parse=os.path.abspath,
        help="directory of ca-cert.pem, server-cert.pem and server-key.pem",
    )  # fmt: skip
    tls_psk: str | None = _option(
        "--tls-psk", metavar="FILE", parse=os.path.abspath,
        help="pre-shared keys in psktool's format (needs Python 3.13)",
    )  # fmt: skip
    tls_verify_peer: bool = _flag(
        "--tls-verify-peer", help="require a client certificate issued by the CA"
    )
    threads: int = _option(
        "-t", "--threads", metavar="N", parse=_count, default=MAX_IN_FLIGHT,
        help="requests served at once per connection",
    )  # fmt: skip
    workers: int | None = _option(
        "--workers", metavar="N", parse=_count,
        help="serve from N processes (default: one per core if every layer is "
        "process-safe, else 1)",
    )  # fmt: skip
    max_connections: int | None = _option(
        "--max-connections", metavar="N", parse=_count,
        help="refuse clients beyond N at once (default: no limit)",
    )  # fmt: skip
    handshake_timeout: float = _option(
        "--handshake-timeout", "--timeout", metavar="SECONDS", parse=parse_seconds_or_zero,
        default=HANDSHAKE_TIMEOUT,
        help="seconds a negotiating client has for each option; 0: no limit",
    )  # fmt: skip
    idle_timeout: float = _option(
        "--idle-timeout", metavar="SECONDS", parse=parse_seconds_or_zero, default=0.0,
        help="close a client that sends nothing this long with no request in flight; 0: never",
    )  # fmt: skip
    shutdown_timeout: float = _option(
        "--shutdown-timeout", metavar="SECONDS", parse=parse_seconds_or_zero,
        default=SHUTDOWN_TIMEOUT,
        help="seconds requests in flight get to finish at shutdown",
    )  # fmt: skip
    no_sr: bool = _flag(
        "--no-sr", help="do not offer structured replies (nor extended headers: they imply them)"
    )
    no_eh: bool = _flag("--no-eh", help="do not offer extended headers (64-bit requests)")
    no_mc: bool = _flag("--no-mc", help="do not offer meta contexts (base:allocation)")
    mask_handshake: int | None = _option(
        "--mask-handshake", metavar="MASK", parse=parse_int,
        help="offer only these handshake flags (bit 0, FIXED_NEWSTYLE, must stay)",
    )  # fmt: skip
    newstyle: bool = _flag(
        "-n", "--newstyle", "--new-style", help="the newstyle protocol (always; accepted)"
    )
    oldstyle: bool = _flag(
        "-o", "--oldstyle", "--old-style", help="the oldstyle protocol (not supported)"
    )
    log: str | None = _option(
        "--log", metavar="stderr|syslog|null|FILE", parse=_log_target,
        help="where errors and warnings go (default: stderr; syslog in the background); "
        "a FILE also gets -v's debug messages",
    )  # fmt: skip
    user: str | None = _option(
        "-u", "--user", metavar="USER",
        help="run as USER (a name or uid) once listening; needs root",
    )  # fmt: skip
    group: str | None = _option(
        "-g", "--group", metavar="GROUP",
        help="run as GROUP (a name or gid) once listening (default with -u: USER's); needs root",
    )  # fmt: skip
    verbose: bool = _flag("-v", "--verbose", help="debug messages too (to stderr)")
    help: bool = _flag("-h", "--help", help="this text; with a plugin or filters: their manuals")
    version: bool = _flag("-V", "--version", help="print the version")
    dump_config: bool = _flag("--dump-config", help="describe this trionbd (key=value lines)")
    dump_plugin: bool = _flag("--dump-plugin", help="describe the plugin (key=value lines)")
    long_options: bool = _flag("--long-options", help="list the long options")
    short_options: bool = _flag("--short-options", help="list the short options")

    config: ServerConfig = field(init=False)
    tls: TLSSettings = field(init=False)

    def __post_init__(self) -> None:
        if self.oldstyle:
            raise ConfigError(
                "-o/--oldstyle: the oldstyle protocol is not supported (newstyle only)"
            )
        if self.port is not None and self.port > 65535 and not self.vsock:
            raise ConfigError(
                f"bad value for -p/--port: '{self.port}' is not a TCP port (0 to 65535)"
            )
        self.config = ServerConfig(
            readonly=self.readonly,
            structured_replies=not self.no_sr,
            extended_headers=not self.no_eh,
            meta_contexts=not self.no_mc,
            handshake_timeout=self.handshake_timeout or None,
            idle_timeout=self.idle_timeout or None,
            shutdown_timeout=self.shutdown_timeout,
            max_in_flight=self.threads,
            max_connections=self.max_connections,
            keepalive=self.keepalive,
        )
        if self.mask_handshake is not None:
            self.config.handshake_flags &= self.mask_handshake
            if not self.config.handshake_flags & HandshakeFlag.FIXED_NEWSTYLE:
                raise ConfigError(
                    f"--mask-handshake={self.mask_handshake} drops FIXED_NEWSTYLE (bit 0), "
                    "the only handshake trionbd speaks: no client could connect"
                )
        self.tls = TLSSettings(
            mode=self.tls_mode,
            certificates=self.tls_certificates,
            psk=self.tls_psk,
            verify_peer=self.tls_verify_peer,
        )


OPTIONS: dict[str, tuple[str, Option]] = {
    name: (f.name, opt)
    for f in fields(Options)
    for opt in f.metadata.get("options", ())
    for name in opt.names
}
"""Every spelling of every option: the field it sets and its declaration."""


def parse_args(argv: Sequence[str]) -> Options:
    """Parse the command line as GNU getopt_long parses nbdkit's: options anywhere
    (before, among and after the plugin's words), bundles (``-fr``, ``-frU SOCK``), a
    value joined or apart (``-U-``, ``-U -``, ``--unix=-``, ``--unix -``), a long name
    shortened as long as it stays unambiguous (``--fore``), and ``--`` ending the
    options. Raises ``ConfigError`` with one line on mistakes."""
    values: dict[str, Any] = {}
    words: list[str] = []
    args = list(argv)
    i = 0

    def value_of(given: str, opt: Option) -> str:
        nonlocal i
        if i == len(args):
            raise ConfigError(f"option {given} needs a value ({opt.metavar})")
        i += 1
        return args[i - 1]

    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            words += args[i:]
            break
        if arg.startswith("--"):
            given, has_value, value = arg.partition("=")
            attr, opt = _long_option(given)
            if opt.metavar is None and has_value:
                raise ConfigError(f"option {given} takes no value")
            if opt.metavar is not None and not has_value:
                value = value_of(given, opt)
            _store(values, attr, opt, given, value)
        elif arg.startswith("-") and arg != "-":
            for j, letter in enumerate(arg[1:], start=2):
                given = "-" + letter
                if given not in OPTIONS:
                    raise ConfigError(f"unknown option {given}")
                attr, opt = OPTIONS[given]
                if opt.metavar is None:
                    _store(values, attr, opt, given, "")
                    continue
                _store(values, attr, opt, given, arg[j:] or value_of(given, opt))
                break
        else:
            words.append(arg)
    return Options(plugin=words[0] if words else None, params=words[1:], **values)


def _long_option(given: str) -> tuple[str, Option]:
    """The option a long name names: exactly, or as the start of one option's names."""
    if given in OPTIONS:
        return OPTIONS[given]
    starting = sorted(name for name in OPTIONS if name.startswith(given) and len(given) > 2)
    found = {OPTIONS[name][0] for name in starting}
    if not found:
        raise ConfigError(f"unknown option {given}")
    if len(found) > 1:
        raise ConfigError(f"option {given} is ambiguous: {', '.join(starting)}")
    return OPTIONS[starting[0]]


def _store(values: dict[str, Any], attr: str, opt: Option, given: str, value: str) -> None:
    if opt.metavar is None:
        values[attr] = opt.const
        return
    try:
        parsed = opt.parse(value)
    except ValueError as e:
        raise ConfigError(f"bad value for {given}: {e}") from None
    if opt.repeat:
        values.setdefault(attr, []).append(parsed)
    else:
        values[attr] = parsed


def options_help() -> str:
    """The option lines of ``--help``: names, value, help and default, from the fields."""
    rows = []
    for f in fields(Options):
        for opt in f.metadata.get("options", ()):
            names = ", ".join(opt.names) + ("" if opt.metavar is None else f"={opt.metavar}")
            default = f.default
            shown = (
                "" if default is None or isinstance(default, bool) or default is MISSING
                else f"{default:g}" if isinstance(default, float)
                else str(default)
            )  # fmt: skip
            rows.append((names, opt.help + (f" (default: {shown})" if shown else "")))
    return help_columns(rows)


def build_chain(opts: Options) -> Chain:
    """Load the plugin and filters and hand each its parameters."""
    if opts.plugin is None:
        raise ConfigError("no plugin given (try: trionbd --help)")
    plugin_cls = load_plugin(opts.plugin, opts.params)
    filter_classes = [load_filter(name) for name in opts.filters]
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


def load_plugin(name: str, params: Sequence[str] | None = None) -> type[Plugin]:
    """The plugin class ``name``. A filter's name gets a hint: how to serve with it
    (with ``params``, the words after it) or, without ``params``, to read its manual."""
    try:
        return load(Plugin, name)
    except ConfigError:
        if name not in builtin_names(Filter) + entry_point_names(Filter):
            raise
    if params is None:
        hint = f"its manual is trionbd --filter={name} --help"
    else:
        hint = "try " + shlex.join(["trionbd", "file", *(params or ["FILE"]), f"--filter={name}"])
    raise ConfigError(f"{name!r} is a filter, not a plugin: {hint}") from None


def load_filter(name: str) -> type[Filter]:
    """The filter class ``name``; a plugin's name gets a hint on how to use it."""
    try:
        return load(Filter, name)
    except ConfigError:
        if name not in builtin_names(Plugin) + entry_point_names(Plugin):
            raise
    raise ConfigError(f"{name!r} is a plugin, not a filter: name it without --filter") from None


USAGE = "usage: trionbd [OPTIONS] PLUGIN [MAGIC] [KEY=VALUE ...] [--filter=NAME ...]"


def help_text(opts: Options) -> str:
    """``--help`` alone: options, plugins and filters; with names: their manuals."""
    if opts.plugin or opts.filters:
        classes: list[type[Plugin] | type[Filter]] = [load_filter(n) for n in opts.filters]
        if opts.plugin:
            classes.append(load_plugin(opts.plugin))
        return "\n\n".join(
            f"{plain(manual(cls))}\n\nParameters of {cls.name}:\n"
            + describe_params(cls.params, getattr(cls, "magic_param", None))
            for cls in classes
        )
    plugins = builtin_names(Plugin) + entry_point_names(Plugin)
    filters = builtin_names(Filter) + entry_point_names(Filter)
    return "\n".join(
        [
            USAGE,
            "",
            "Serves a chain of filters over one plugin. The first --filter named is the one",
            "nearest the client; key=value parameters go to the filter or plugin that",
            "declares them; a bare word after the plugin is its magic parameter.",
            "",
            "Options:",
            options_help(),
            "",
            "Plugins (trionbd PLUGIN --help for a manual):",
            help_columns(((n, plain(summary(load(Plugin, n)))) for n in plugins), column=17),
            "",
            "Filters (trionbd --filter=NAME --help for a manual):",
            help_columns(((n, plain(summary(load(Filter, n)))) for n in filters), column=17),
        ]
    )


def plain(text: str) -> str:
    """A docstring for the terminal: reStructuredText's markup taken out (``code``
    and :role:`target` become their text; a paragraph's closing ``::`` becomes ``:``)."""
    text = re.sub(r":[a-z]+:`([^`]*)`", r"\1", text)
    text = re.sub(r"``(.+?)``", r"\1", text, flags=re.DOTALL)
    text = re.sub(r"(?m)\s+::$", "", text)
    return re.sub(r"(?m)::$", ":", text)


def answer(opts: Options) -> str | None:
    """What to print instead of serving, for ``--help``, ``--version``, ``--dump-config``,
    ``--dump-plugin``, ``--long-options`` and ``--short-options``; ``None`` to serve."""
    if opts.help:
        return help_text(opts)
    if opts.version:
        return f"trionbd {__version__}"
    if opts.dump_config:
        return dump_config()
    if opts.dump_plugin:
        return dump_plugin(opts)
    if opts.long_options or opts.short_options:
        listed = [n for n in OPTIONS if n not in ("--long-options", "--short-options")]
        return "\n".join(n for n in listed if n.startswith("--") == opts.long_options)
    return None


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
    cls = load_plugin(opts.plugin, opts.params)
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
            ("--vsock", opts.vsock),
            ("--run", opts.run is not None),
        )
        if given
    ]
    if opts.vsock and (opts.unix is not None or opts.ipaddr is not None):
        flag = "-U" if opts.unix is not None else "-i"
        raise ConfigError(f"--vsock listens on AF_VSOCK only: it cannot be combined with {flag}")
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
    if unix is None and opts.run is not None and opts.port is None and not opts.vsock:
        unix = "-"
    try:
        if unix is not None:
            path = unix
            if path == "-":
                path = private_socket_path()
                cleanup.append(os.path.dirname(path))
            socks.append(bind_unix(path))
            cleanup.insert(0, path)
        port = DEFAULT_PORT if opts.port is None else opts.port  # -p 0: any free port
        if opts.vsock:
            socks.append(bind_vsock(port))
        elif opts.port is not None or unix is None:
            socks += bind_tcp(port, opts.ipaddr, opts.family or socket.AF_UNSPEC)
    except OSError as e:
        for sock in socks:
            sock.close()
        raise StartupError(str(e)) from e
    return socks


def worker_count(opts: Options, chain: Chain) -> int:
    """How many processes serve: ``--workers``, or by default one per core when every
    layer of the chain is process-safe (and the system can fork workers), else one.
    Raises ``ConfigError`` for ``--workers`` above 1 where it cannot apply."""
    unsafe = chain.not_process_safe()
    if opts.workers is None:
        if opts.single or not workers.available():
            return 1
        if unsafe is not None:
            log.info("serving from one process: %s is not process-safe", unsafe)
            return 1
        return workers.default_count()
    if opts.workers > 1:
        if opts.single:
            raise ConfigError(f"--workers={opts.workers}: -s serves one client, from one process")
        if unsafe is not None:
            raise ConfigError(
                f"--workers={opts.workers}: {unsafe} is not process-safe (what its clients "
                "change or count lives in one process); serve it with --workers=1"
            )
        if not workers.available():
            raise ConfigError(
                f"--workers={opts.workers}: worker processes need Linux 5.3 or later (pidfds)"
            )
    return opts.workers


def supervise(
    chain: Chain,
    opts: Options,
    sockets: list[socket.socket],
    count: int,
    readiness: daemon.Readiness,
    cleanup: list[str],
) -> tuple[int, list[str]]:
    """Serve from ``count`` worker processes; the exit status and any failures."""
    addresses = [address_of(sock) for sock in sockets]
    command = None if opts.run is None else (opts.run, run_environment(addresses[0], opts))
    supervisor = workers.Supervisor(
        chain, opts.config, sockets, count, readiness, keep_stderr(opts)
    )
    return supervisor.run(lambda: announce(addresses, opts, readiness, cleanup), command)


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
                announce(server.addresses, opts, readiness, cleanup)
                watching.start_soon(daemon.watch_signals, signals, server, serving.cancel_scope)
                if stdio is not None:
                    await server.serve_stream(daemon.stdio_stream(*stdio))
                    serving.cancel_scope.cancel()
                elif opts.run is not None:
                    await run_command(opts.run, server, opts, status)
                    serving.cancel_scope.cancel()
            watching.cancel_scope.cancel()
    return status[0] if status else 0


def announce(
    addresses: list[Address], opts: Options, readiness: daemon.Readiness, cleanup: list[str]
) -> None:
    """The server serves: log where, write the pidfile, print the URI if asked, and let
    the background parent exit."""
    for address in addresses:
        log.info("listening on %s", address.uri(opts.exportname))
    # The pidfile first: whoever waited for the printed URI finds it too.
    if opts.pidfile:
        daemon.write_pidfile(opts.pidfile)
        cleanup.append(opts.pidfile)
    # -U - alone would hide the server: its socket's name is printed.
    private = opts.unix == "-" and opts.run is None
    if (opts.print_uri or private) and addresses:
        uri = addresses[0].uri(opts.exportname, tls=opts.config.tls is TLSMode.REQUIRE)
        print(uri, flush=True)
    readiness.ready(keep_stderr=keep_stderr(opts))


def keep_stderr(opts: Options) -> bool:
    """Whether a server in the background keeps the caller's stderr (for its log)."""
    return opts.verbose or opts.log == "stderr"


def run_environment(address: Address, opts: Options) -> dict[str, str]:
    """The environment of the ``--run`` command."""
    return daemon.run_environment(
        address, opts.exportname, opts.config.tls, opts.tls.certificates, opts.tls.psk
    )


async def run_command(command: str, server: Server, opts: Options, status: list[int]) -> None:
    """Run ``sh -c command`` with nbdkit's variables set; append its exit status (128+N
    when signal N killed it) to ``status``. If trionbd is stopped first, the command
    gets SIGTERM (SIGKILL after ``daemon.KILL_AFTER`` seconds)."""
    env = run_environment(server.addresses[0], opts)
    proc = await trio.lowlevel.open_process(["/bin/sh", "-c", command], env=env)
    try:
        await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(daemon.KILL_AFTER):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        assert proc.returncode is not None
        if proc.returncode < 0:
            log.warning("--run: the command was killed by signal %d", -proc.returncode)
        status.append(daemon.exit_status(proc.returncode))


def setup_logging(verbose: bool, target: str) -> None:
    """Errors and warnings go to ``target`` (stderr, syslog, null or a file's path); with
    ``-v``, debug messages also go to stderr (never to syslog, as nbdkit) and to the
    file. Nothing goes to stdout. A file that cannot be opened raises ``StartupError``."""
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
    elif target not in LOG_TARGETS:
        try:
            to_file = logging.FileHandler(target, encoding="utf-8")
        except OSError as e:
            raise StartupError(f"--log={target}: {e.strerror or e}") from e
        to_file.setFormatter(
            logging.Formatter("%(asctime)s trionbd[%(process)d]: %(levelname)s: %(message)s")
        )
        handlers.append(to_file)
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
        text = answer(opts)
        if text is not None:
            print(text)
            return 0
        activated = daemon.activation_sockets()
        foreground = _foreground(opts, activated is not None)
        who = daemon.identity(opts.user, opts.group)
        opts.tls.check()
        setup_logging(opts.verbose, opts.log or ("stderr" if foreground else "syslog"))
        chain = build_chain(opts)
        processes = worker_count(opts, chain)
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
            if who is not None:
                daemon.become(who)
            if opts.exit_with_parent:  # after become(): a change of user clears it
                daemon.exit_with_parent()
        except StartupError as e:
            failed.append(str(e))
        else:
            stdio = daemon.take_stdio() if opts.single else None
            readiness = daemon.Readiness() if foreground else daemon.fork_into_background()
            if processes > 1:
                status, failures = supervise(chain, opts, sockets, processes, readiness, cleanup)
                failed += failures
            else:
                try:
                    status = trio.run(serve_main, chain, opts, sockets, stdio, readiness, cleanup)
                except* StartupError as group:
                    failed += [str(e) for e in daemon.leaves(group)]
                except* (KeyboardInterrupt, SystemExit) as group:
                    failed += [daemon.stopped_by(e) for e in daemon.leaves(group)]
    finally:
        for path in cleanup:
            daemon.remove_quietly(path)
        chain.unload()
    for message in failed:
        print(f"trionbd: {message}", file=sys.stderr)
    return 1 if failed else status


def main() -> None:
    sys.exit(run())
