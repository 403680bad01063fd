"""The exitlast filter: the server exits (status 0) once the last client with an export
open has gone, and not before the first one. Each case runs on trionbd and on nbdkit
1.32 (which has the filter) alike."""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest

from tests.filters.parity import holding
from tests.support import HANG_GUARD, Running, nbdkit_process, run, trionbd_process

Start = Callable[..., AbstractContextManager[Running]]
SERVERS = pytest.mark.parametrize(
    "start", [trionbd_process, nbdkit_process], ids=["ours", "nbdkit"]
)


def exits_by_itself(server: Running) -> None:
    assert server.proc.wait(HANG_GUARD) == 0
    with pytest.raises(AssertionError):  # nobody listens any more
        run(["nbdinfo", "--size", server.uri])


@SERVERS
def test_not_before_the_first_client_opens_an_export(start: Start) -> None:
    with start("--filter=exitlast", "memory", "1M") as server:
        with socket.socket(socket.AF_UNIX) as idle:  # connects, negotiates nothing, leaves
            idle.settimeout(HANG_GUARD)
            idle.connect(server.socket)
            assert idle.recv(8) == b"NBDMAGIC"
        assert run(["nbdinfo", "--size", server.uri]).strip() == "1048576"
        exits_by_itself(server)


@SERVERS
def test_only_when_the_last_client_has_gone(start: Start) -> None:
    with start("--filter=exitlast", "memory", "1M") as server:
        with holding(server.uri) as first:
            for _ in range(2):  # others come and go: the server keeps serving
                assert run(["nbdinfo", "--size", server.uri]).strip() == "1048576"
            assert server.proc.poll() is None
            assert first.release() == "4096"
        exits_by_itself(server)


@SERVERS
def test_a_listing_ends_it_too(start: Start) -> None:
    with start("--filter=exitlast", "memory", "1M") as server:
        assert '"export-size": 1048576' in run(["nbdinfo", "--list", "--json", server.uri])
        exits_by_itself(server)
