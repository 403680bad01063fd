"""Many real clients at once: 64 libnbd connections, each writing and checking its own
region, then every client checking another's (multi-conn: one shared disk)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support import libnbd_python, run, trionbd_process

CLIENTS = 64
REGION = 256 * 1024

SCRIPT = """
import hashlib, threading, nbd

URI = {uri!r}
CLIENTS, REGION = {clients}, {region}
ready = threading.Barrier(CLIENTS)
written = threading.Barrier(CLIENTS)
errors = []

def content(i):
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (REGION // len(seed) + 1))[:REGION]

def client(i):
    try:
        h = nbd.NBD()
        h.connect_uri(URI)
        assert h.can_multi_conn()
        ready.wait()  # all 64 connected at the same time
        data = content(i)
        base = i * REGION
        # A mix: 16 KiB writes in shuffled order, one with FUA, then zeroes.
        order = sorted(range(0, REGION, 16384), key=lambda o: (o * 7919 + i) % REGION)
        for n, off in enumerate(order):
            h.pwrite(data[off:off + 16384], base + off, nbd.CMD_FLAG_FUA if n == 0 else 0)
        h.zero(4096, base + REGION - 4096)
        h.flush()
        expected = data[:-4096] + bytes(4096)
        for off in range(0, REGION, 65536):
            assert h.pread(65536, base + off) == expected[off:off + 65536], (i, off)
        written.wait()
        j = (i + 1) % CLIENTS  # the neighbour's region, written on another connection
        other = content(j)[:-4096] + bytes(4096)
        assert h.pread(REGION, j * REGION) == other, ("neighbour", i, j)
        h.shutdown()
    except BaseException as e:
        errors.append(f"client {{i}}: {{e!r}}")
        ready.abort()
        written.abort()

threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("\\n".join(errors) or "ok")
"""


def check_64_clients(uri: str) -> None:
    out = libnbd_python(SCRIPT.format(uri=uri, clients=CLIENTS, region=REGION), timeout=120)
    assert out.strip() == "ok", out


def test_64_clients_on_a_memory_export() -> None:
    with trionbd_process("memory", str(CLIENTS * REGION)) as server:
        check_64_clients(server.uri)


def test_64_clients_on_a_file_export(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xff" * CLIENTS * REGION)
    with trionbd_process("file", str(path)) as server:
        check_64_clients(server.uri)
        # And a real copy tool on top, through the same server, while it is warm.
        run(["nbdcopy", "--connections=4", server.uri, str(tmp_path / "copy.img")])
    data = path.read_bytes()
    assert (tmp_path / "copy.img").read_bytes() == data
    assert b"\xff" * 4096 not in data  # every region was overwritten


def test_pipelined_requests_on_several_connections(tmp_path: Path) -> None:
    """nbdcopy keeps up to 64 requests in flight on each of 4 connections."""
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 << 20))
    with trionbd_process("memory", "16M") as server:
        run(["nbdcopy", "--connections=4", "--requests=64", "--request-size=65536", str(src),
             server.uri])  # fmt: skip
        run(["nbdcopy", "--connections=4", "--requests=64", server.uri, str(tmp_path / "b.img")])
    assert (tmp_path / "b.img").read_bytes() == src.read_bytes()
