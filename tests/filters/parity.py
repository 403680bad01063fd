"""Side by side with nbdkit: the same command line served by ``trionbd`` and by Debian's
nbdkit, the same client commands against both, and their answers compared."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.plugins.test_nbd import caps
from tests.support import (
    HANG_GUARD,
    SYSTEM_PYTHON,
    Running,
    nbdkit_process,
    read_line,
    run,
    trionbd_process,
    wait_until,
)


@contextlib.contextmanager
def both(*args: str) -> Iterator[tuple[Running, Running]]:
    """``trionbd ARGS`` and ``nbdkit ARGS``, both serving until the block ends."""
    with trionbd_process(*args) as ours, nbdkit_process(*args) as theirs:
        yield ours, theirs


@functools.cache
def _plain_caps(plugin: tuple[str, ...]) -> tuple[dict[str, object], dict[str, object]]:
    with both(*plugin) as (ours, theirs):
        return caps(ours.uri), caps(theirs.uri)


def same_caps(plugin: Sequence[str], *filters: str) -> dict[str, object]:
    """What a client is offered by ``PLUGIN`` with ``FILTERS`` (``--filter=`` options and
    the filters' ``key=value`` parameters: ``same_caps(["file", "disk.img"],
    "--filter=fua", "fuamode=force")``).

    Both servers must offer the same, except where they already differ without the
    filters (nbdkit advertises no block size unless a plugin sets one, ...): those
    differences must stay as they were. Returns trionbd's answers."""
    plain_ours, plain_theirs = _plain_caps(tuple(plugin))
    options = [a for a in filters if a.startswith("--")]
    params = [a for a in filters if not a.startswith("--")]
    with both(*options, *plugin, *params) as (ours, theirs):
        got_ours, got_theirs = caps(ours.uri), caps(theirs.uri)
    for key in got_ours:
        if plain_ours[key] == plain_theirs[key]:
            assert got_ours[key] == got_theirs[key], (key, got_ours, got_theirs)
    return got_ours


def libnbd(uri: str, script: str) -> str:
    """Run ``script`` with ``h`` connected to ``uri`` (Debian's Python, ``import nbd``
    done, the URI in ``uri``); its stdout."""
    prologue = "import nbd, sys\nh = nbd.NBD()\nh.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n"
    prologue += f"uri = {uri!r}\nh.connect_uri(uri)\n"
    return run([SYSTEM_PYTHON, "-c", prologue + textwrap.dedent(script)])


TRY = """
def attempt(what, call, *args):
    try:
        call(*args)
        print(what, "ok")
    except nbd.Error as e:
        print(what, "errno", e.errno)
"""
"""A helper for ``libnbd`` scripts: ``attempt("label", h.pwrite, buf, offset)`` prints
``label ok`` or ``label errno N`` (the NBD error the server sent, as an errno)."""


def same_output(uris: Sequence[str], script: str) -> str:
    """Run ``script`` (``libnbd``) against each URI; all must print the same. Returns it."""
    outputs = [libnbd(uri, script) for uri in uris]
    assert all(out == outputs[0] for out in outputs), outputs
    return outputs[0]


def requests_below(
    filters: Sequence[str], plugin: Sequence[str], params: Sequence[str], script: str, tmp: Path
) -> list[str]:
    """Serve ``PLUGIN`` through ``FILTERS`` and nbdkit's log filter under them, on both
    servers; run ``script`` (``libnbd``) against each. Both must print the same, and both
    logs must show the same requests reaching the layer below (as ``connection=1 Write
    id=1 offset=0x0 count=0x1000 fua=1`` and ``connection=1 ...Write id=1 return=0``
    lines, without time stamps); returns them."""
    found, printed = [], []
    for start, name in ((trionbd_process, "ours.log"), (nbdkit_process, "theirs.log")):
        log = tmp / name
        log.unlink(missing_ok=True)
        with start(*filters, "--filter=log", *plugin, *params, f"logfile={log}") as server:
            printed.append(libnbd(server.uri, script))
            # Stop the server only once it has seen every client leave: trionbd flushes
            # the clients still connected when it shuts down, which nbdkit does not.
            wait_until(functools.partial(_all_left, log), "the server saw every client leave")
        lines = log.read_text().splitlines()
        found.append(
            [line.split(" ", 2)[2] for line in lines if " id=" in line and "connection=" in line]
        )
    assert printed[0] == printed[1], printed
    assert found[0] == found[1], found
    return found[0]


def _all_left(log: Path) -> bool:
    text = log.read_text()
    return text.count(" Connect ") == text.count(" Disconnect ")


_HOLD = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
print(len(h.pread(4096, 0)), flush=True)
h.shutdown()
"""


class Held:
    """A libnbd client in transmission with a server until :meth:`release`."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.proc = proc

    def release(self) -> str:
        """Read 4096 bytes, disconnect; what the client printed (``4096`` if it could)."""
        out, _ = self.proc.communicate("\n", timeout=HANG_GUARD)
        assert self.proc.returncode == 0, out
        return out.strip()


@contextlib.contextmanager
def holding(uri: str) -> Iterator[Held]:
    """A client connected to ``uri`` (GO done) for the block, or until released."""
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", _HOLD, uri],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(proc, HANG_GUARD) == "connected\n"
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), True)  # read_line made it non-blocking
        yield Held(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
