"""Listening sockets that cannot listen say where and why, in one line."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from trionbd.server.listeners import ListenError, bind_tcp, bind_unix, listen


def test_a_unix_socket_in_a_missing_directory(tmp_path: Path) -> None:
    path = str(tmp_path / "no" / "sock")
    with pytest.raises(ListenError) as caught:
        bind_unix(path)
    assert str(caught.value) == f"{path}: no such file or directory"
    assert caught.value.errno == errno.ENOENT and caught.value.where == path


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_a_tcp_port_in_use(family: socket.AddressFamily, host: str) -> None:
    with socket.socket(family) as taken:
        try:
            taken.bind((host, 0))
        except OSError as e:
            pytest.skip(f"no {host} here: {e}")
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError) as caught:
            bind_tcp(port, host)
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        assert str(caught.value) == f"{where}: address already in use"
        assert caught.value.errno == errno.EADDRINUSE
        # The same error from an address string, as serve() takes them.
        with pytest.raises(ListenError) as caught:
            listen(f"tcp:{where}")
        assert str(caught.value) == f"{where}: address already in use"
