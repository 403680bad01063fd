"""The accept loop: out of descriptors (and the like) it waits and retries, keeping the
clients it has; any other accept error ends the server instead of spinning forever.

Both errors are real: EMFILE from a lowered RLIMIT_NOFILE, EINVAL from a listening TCP
socket shut down for reading."""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

import trionbd.client as nbd
from tests.support import HANG_GUARD, short_tmpdir
from trionbd.plugins.memory import MemoryPlugin
from trionbd.server import Server, open_unix_listener, serve
from trionbd.server.server import ACCEPT_CAPACITY_ERRNOS

MiB = 1 << 20


@contextmanager
def no_more_descriptors() -> Iterator[None]:
    """Until the block ends, opening a descriptor fails with EMFILE (the soft limit is
    the number the next descriptor would get)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class AcceptFailures(logging.Handler):
    """The failed accepts the server logs; ``event`` is set at the first."""

    def __init__(self) -> None:
        super().__init__()
        self.event = trio.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("accept on "):
            self.records.append(record)
            self.event.set()


@contextmanager
def accept_failures() -> Iterator[AcceptFailures]:
    handler = AcceptFailures()
    logger = logging.getLogger("trionbd.server")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_the_capacity_errors_are_those_of_trio_serve_listeners() -> None:
    expected = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
    assert expected == ACCEPT_CAPACITY_ERRNOS


async def test_out_of_descriptors_the_server_waits_and_keeps_its_clients() -> None:
    with short_tmpdir() as tmp, accept_failures() as failed:
        path = str(tmp / "sock")
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                serve, MemoryPlugin(MiB), [await open_unix_listener(path)]
            )
            async with await nbd.connect_unix(path) as first:
                await first.pwrite(b"kept", 0)
                sock = trio.socket.socket(socket.AF_UNIX)  # made before the limit
                with trio.fail_after(HANG_GUARD):
                    with no_more_descriptors():
                        await sock.connect(path)  # queued; accepting it fails
                        await failed.event.wait()
                        # The connected client is still served meanwhile.
                        assert await first.pread(4, 0) == b"kept"
                    second = await nbd.connect(trio.SocketStream(sock))
                    async with second:
                        assert await second.pread(4, 0) == b"kept"
            server.shutdown()
    record = failed.records[0]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        f"accept on {path} failed: EMFILE (Too many open files); retrying in 0.1s"
    )


async def test_other_accept_errors_end_the_server() -> None:
    sock = trio.socket.socket(socket.AF_INET)
    await sock.bind(("127.0.0.1", 0))
    sock.listen()
    listener = trio.SocketListener(sock)
    sock.shutdown(socket.SHUT_RD)  # accept(2) now fails with EINVAL
    with pytest.RaisesGroup(OSError, flatten_subgroups=True) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, MemoryPlugin(MiB), [listener])
            with trio.fail_after(HANG_GUARD):
                await trio.sleep_forever()
    await listener.aclose()
    error: BaseException = caught.value
    while isinstance(error, BaseExceptionGroup):
        (error,) = error.exceptions
    assert isinstance(error, OSError) and error.errno == errno.EINVAL
