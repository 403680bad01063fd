"""exportname: choose which export names clients see, may open, and how they are described.

The layer below decides what each export name serves; this filter changes what clients
are told about it and which names they may ask for:

* ``default-export=NAME``: a client asking for the default export (``""``) gets
  ``NAME`` from the layer below instead of that layer's own default. An empty NAME is
  the same as leaving it out.
* ``exportname-list=MODE``: what ``NBD_OPT_LIST`` shows.

  - ``keep`` (default): the list of the layer below;
  - ``error``: the listing is refused (``NBD_REP_ERR_POLICY``);
  - ``empty``: an empty list;
  - ``defaultonly`` (or ``default-only``): only the canonical name of the default
    export (nothing when the default export is not permitted);
  - ``explicit``: exactly the names given with ``exportname=``.

  A listing need not match reality: a listed name may fail to open, and a client may
  open a name it learned elsewhere (unless ``exportname-strict`` is on).
* ``exportname-strict=true``: clients may only open the names given with
  ``exportname=``; any other name is refused as if it did not exist
  (``NBD_REP_ERR_UNKNOWN``), so a client learns nothing about names below. The
  default export is permitted only when ``exportname=`` lists ``""``; its canonical
  name is then ``default-export`` (or ``""`` when that is not set), and that name may
  be opened too.
* ``exportname=NAME``: adds NAME to the names of ``explicit`` listing and of strict
  mode. Repeatable.
* ``exportdesc=MODE``: the description sent with each export (in listings and in
  ``NBD_INFO_DESCRIPTION``).

  - ``keep`` (default): the layer below's description (names added with
    ``exportname=`` have none);
  - ``none``: no descriptions, e.g. so descriptions below cannot leak information;
  - ``fixed:STRING``: STRING for every export;
  - ``script:COMMAND``: the output of COMMAND, run by ``/bin/sh`` with the export
    name in the exported shell variable ``$name`` and stdin empty. One trailing
    newline is removed; descriptions longer than 4096 bytes are cut. A command that
    fails (non-zero status) or runs longer than 10 seconds gives no description and a
    warning in the log. A listing runs up to 8 commands at a time.

Example (clients may open file1 and file3 of the directory, not file2)::

  trionbd --filter=exportname file dir=/srv/images \\
      exportname-list=explicit exportname-strict=true \\
      exportname=file1 exportname=file3 \\
      exportdesc=script:'ls -l /srv/images/"$name"'
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import signal
from collections.abc import AsyncIterator, Sequence
from typing import Any

import trio

from ..chain import (
    Export,
    ExportList,
    Filter,
    Layer,
    NBDError,
    Next,
    Param,
    each_export,
    parse_bool,
)
from ..protocol.constants import MAX_STRING

log = logging.getLogger(__name__)

LIST_MODES = ("keep", "error", "empty", "defaultonly", "explicit")
DESC_MODES = ("keep", "none", "fixed:STRING", "script:COMMAND")
SCRIPT_TIMEOUT = 10.0
"""Seconds an ``exportdesc=script:`` command may run before it is killed."""
SCRIPT_CONCURRENCY = 8
"""Description commands run at the same time while answering one listing."""
SHELL = "/bin/sh"


def parse_export_name(text: str) -> str:
    """An export name as given on the command line: at most 4096 bytes of UTF-8."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("the name is not valid UTF-8") from None
    if size > MAX_STRING:
        raise ValueError(f"the name is {size} bytes long; export names are at most {MAX_STRING}")
    return text


def parse_list_mode(text: str) -> str:
    mode = "defaultonly" if text == "default-only" else text
    if mode not in LIST_MODES:
        raise ValueError(f"{text!r} is not one of {', '.join(LIST_MODES)}")
    return mode


parse_list_mode.__name__ = "|".join(LIST_MODES)


def parse_exportdesc(text: str) -> tuple[str, str]:
    """``(mode, argument)``: ``("keep", "")``, ``("none", "")``, ``("fixed", STRING)``
    or ``("script", COMMAND)``."""
    if text in ("keep", "none"):
        return text, ""
    mode, sep, rest = text.partition(":")
    if sep and mode in ("fixed", "script"):
        if mode == "script" and not rest.strip():
            raise ValueError("script: needs a command")
        return mode, rest
    raise ValueError(f"{text!r} is not one of {', '.join(DESC_MODES)}")


parse_exportdesc.__name__ = "|".join(DESC_MODES)


class ExportnameFilter(Filter):
    """Adjust export names and descriptions between the client and the layer below."""

    name = "exportname"
    process_safe = True
    params = (
        Param(
            "default-export",
            "open this export of the layer below when a client asks for the default export",
            parse_export_name,
            metavar="NAME",
        ),
        Param("exportname-list", "what NBD_OPT_LIST shows", parse_list_mode, default="keep"),
        Param(
            "exportname-strict",
            "allow only the exportname= names to be opened",
            parse_bool,
            default="false",
        ),
        Param(
            "exportname",
            "a name for exportname-list=explicit and exportname-strict",
            parse_export_name,
            repeat=True,
            metavar="NAME",
        ),
        Param("exportdesc", "export descriptions", parse_exportdesc, default="keep"),
    )

    def __init__(
        self,
        default_export: str = "",
        exportname_list: str = "keep",
        exportname_strict: bool = False,
        exportname: Sequence[str] = (),
        exportdesc: tuple[str, str] = ("keep", ""),
    ):
        self.default = default_export
        self.list_mode = exportname_list
        self.strict = exportname_strict
        self.names = list(dict.fromkeys(exportname))
        self.allowed = set(self.names)
        if "" in self.allowed:
            self.allowed.add(default_export)
        self.desc_mode, self.desc_arg = exportdesc

    # --- exports -------------------------------------------------------------------------

    async def list_exports(self, below: Layer, readonly: bool, is_tls: bool) -> ExportList:
        exports: ExportList
        if self.list_mode == "error":
            raise NBDError(errno.EPERM, "exportname: the export list is restricted by policy")
        if self.list_mode == "empty":
            return []
        if self.list_mode == "keep":
            exports = await below.list_exports(readonly, is_tls)
        elif self.list_mode == "explicit":
            exports = [Export(n) for n in self.names]
        else:
            try:
                exports = [Export(await self.default_export(below, readonly, is_tls))]
            except NBDError:
                return []
        return await self._described(exports)

    async def default_export(self, below: Layer, readonly: bool, is_tls: bool) -> str:
        if self.strict:
            if "" not in self.names:
                raise NBDError(
                    errno.ENOENT,
                    "exportname: the default export is not permitted (exportname-strict is on "
                    'and exportname= does not list "")',
                )
            return self.default
        if self.default:
            return self.default
        return await below.default_export(readonly, is_tls)

    # --- per connection ------------------------------------------------------------------

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        if self.strict and export_name not in self.allowed:
            raise NBDError(errno.ENOENT, f"exportname: no export named {export_name!r}")
        return await below.open(readonly, export_name, is_tls), export_name

    async def export_description(self, next: Next, h: Any) -> str | None:
        if self.desc_mode == "keep":
            return await next.export_description()
        return await self._describe(h) or None

    # --- descriptions --------------------------------------------------------------------

    async def _described(self, exports: ExportList) -> ExportList:
        """``exports`` with descriptions replaced according to ``exportdesc``. Lists are
        mapped lazily where no command runs, so a long list below stays streamed."""
        if self.desc_mode == "keep":
            return exports
        if self.desc_mode != "script":
            text = self.desc_arg if self.desc_mode == "fixed" else ""

            async def described() -> AsyncIterator[Export]:
                async for e in each_export(exports):
                    yield Export(e.name, text)

            return described()
        names = [e.name async for e in each_export(exports)]
        descriptions = [""] * len(names)
        limiter = trio.CapacityLimiter(SCRIPT_CONCURRENCY)

        async def describe(i: int) -> None:
            async with limiter:
                descriptions[i] = await self._describe(names[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(names)):
                nursery.start_soon(describe, i)
        return [Export(n, d) for n, d in zip(names, descriptions, strict=True)]

    async def _describe(self, export_name: str) -> str:
        """The description of ``export_name`` for the ``none``, ``fixed`` and ``script``
        modes ("" for none)."""
        if self.desc_mode == "fixed":
            return self.desc_arg
        if self.desc_mode != "script":
            return ""
        return await run_description_script(self.desc_arg, export_name)


async def run_description_script(command: str, export_name: str) -> str:
    """Run ``command`` with ``$name`` set to ``export_name``; its output, or "" on failure.

    The command runs in a session of its own, so a timeout kills everything it started.
    """
    script = f"export name; name={shlex.quote(export_name)}\n{command}\n"
    result = None
    with trio.move_on_after(SCRIPT_TIMEOUT):
        result = await trio.run_process(
            [SHELL, "-c", script],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            start_new_session=True,
            deliver_cancel=_kill_session,
        )
    if result is None:
        log.warning(
            "exportname: exportdesc script for %r ran longer than %gs; killed, no description",
            export_name,
            SCRIPT_TIMEOUT,
        )
        return ""
    if result.returncode != 0:
        stderr = result.stderr.decode("utf-8", "replace").strip()
        log.warning(
            "exportname: exportdesc script for %r failed with status %d%s; no description",
            export_name,
            result.returncode,
            f": {stderr}" if stderr else "",
        )
        return ""
    out = result.stdout
    if out.endswith(b"\n"):
        out = out[:-1]
    return out.decode("utf-8", "replace")  # the server cuts it to MAX_STRING bytes


async def _kill_session(process: trio.Process) -> None:
    """Cancellation of a description command: kill its whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


FILTER = ExportnameFilter
