"""Instructions the server spends per 4 KiB read: load-independent, for before/after.

    .venv/bin/python bench/instructions_per_read.py [--export NAME] -- PLUGIN [ARGS ...]

Runs ``python -m trionbd -f -U SOCK PLUGIN ARGS`` under ``valgrind --tool=callgrind``
twice, while a client sends 50 and then 500 rounds of 32 pipelined 4 KiB reads (simple
replies, random offsets in the first 64 MiB, one connection), and prints the difference
of the two instruction totals divided by the extra reads: start-up and shutdown cancel
out. The server runs in one process there: valgrind has no pidfds, so trionbd starts
no worker processes (instructions per read do not depend on their number). Counts vary
by about 1 % from run to run (how requests happen to be batched per receive); compare
two commits in the same session, interleaved, several times.
``PYTHONPATH=SRC`` measures the tree at SRC (a ``git archive`` of another commit).

    .venv/bin/python bench/instructions_per_read.py -- file /tmp/disk.img
    .venv/bin/python bench/instructions_per_read.py -- --filter=tar file /tmp/a.tar
    .venv/bin/python bench/instructions_per_read.py --export /disk.img -- --filter=ext2 file fs.img
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEPTH = 32
SIZE = 4096
ROUNDS = (50, 500)


def recv(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("the server closed the connection")
        buf += chunk
    return bytes(buf)


def client(path: str, rounds: int, export: str) -> None:
    """Old-style EXPORT_NAME handshake, then ``rounds`` rounds of DEPTH reads."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        recv(s, 18)  # NBDMAGIC, IHAVEOPT, handshake flags
        s.sendall(struct.pack(">I", 1))  # FIXED_NEWSTYLE
        name = export.encode()
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)
        size, _ = struct.unpack(">QH", recv(s, 10))
        recv(s, 124)
        rng = random.Random(1)
        blocks = min(size, 64 << 20) // SIZE
        for r in range(rounds):
            s.sendall(
                b"".join(
                    struct.pack(
                        ">IHHQQI",
                        0x25609513,
                        0,
                        0,
                        r * DEPTH + i,
                        rng.randrange(blocks) * SIZE,
                        SIZE,
                    )
                    for i in range(DEPTH)
                )
            )
            for _ in range(DEPTH):
                magic, error, _ = struct.unpack(">IIQ", recv(s, 16))
                if magic != 0x67446698 or error:
                    raise RuntimeError(f"bad reply: magic {magic:#x}, error {error}")
                recv(s, SIZE)
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))  # NBD_CMD_DISC


def instructions(args: list[str], rounds: int, export: str, tmp: Path) -> int:
    sock, out = tmp / f"{rounds}.sock", tmp / f"{rounds}.callgrind"
    env = dict(os.environ, PYTHONHASHSEED="0")
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
         sys.executable, "-m", "trionbd", "-f", "-U", str(sock), *args],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        client(str(sock), rounds, export)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
    match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    assert match, f"no instruction total in {out}"
    return int(match[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", default="", help="the export to read (default: '')")
    parser.add_argument("server_args", nargs="+", help="plugin, filters and parameters")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        few, many = (instructions(ns.server_args, n, ns.export, Path(tmp)) for n in ROUNDS)
    print((many - few) // ((ROUNDS[1] - ROUNDS[0]) * DEPTH))


if __name__ == "__main__":
    main()
