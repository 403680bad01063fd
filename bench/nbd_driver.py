"""Client-side drivers for bench/run.py, run with Debian's /usr/bin/python3 (``import nbd``).

The same libnbd client drives every server, so the client's cost is the same for all.

    python3 nbd_driver.py connect-loop URI SECONDS
        Connect, finish the handshake, read 4 KiB at offset 0, disconnect; repeat until
        SECONDS pass. Prints JSON: {"connections": N, "seconds": S}.

    python3 nbd_driver.py first-read URI BYTES
        Connect and read BYTES at offset 0 (the first bytes a client gets). Prints JSON:
        {"seconds": S} from before connecting until the read returned.

    python3 nbd_driver.py hold URI COUNT
        Open COUNT connections (each finishes the handshake) and print one JSON line
        {"connections": COUNT, "connect_s": S}; keep them open until stdin gets a line or
        closes, then disconnect them all.

This file must run on Debian's Python 3.11 with only the standard library and nbd.
"""

from __future__ import annotations

import json
import sys
import time

import nbd  # type: ignore[import-not-found, unused-ignore]


def connect_loop(uri: str, seconds: float) -> None:
    count = 0
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pread(4096, 0)
        h.shutdown()
        del h  # closes the socket
        count += 1
    print(json.dumps({"connections": count, "seconds": time.monotonic() - start}))


def first_read(uri: str, length: int) -> None:
    start = time.monotonic()
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(length, 0)
    seconds = time.monotonic() - start
    h.shutdown()
    print(json.dumps({"seconds": seconds}))


def hold(uri: str, count: int) -> None:
    start = time.monotonic()
    handles = []
    for _ in range(count):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    elapsed = time.monotonic() - start
    print(json.dumps({"connections": len(handles), "connect_s": elapsed}), flush=True)
    sys.stdin.readline()
    for h in handles:
        h.shutdown()


def main(argv: list[str]) -> None:
    mode, uri, amount = argv
    if mode == "connect-loop":
        connect_loop(uri, float(amount))
    elif mode == "first-read":
        first_read(uri, int(amount))
    elif mode == "hold":
        hold(uri, int(amount))
    else:
        sys.exit(f"nbd_driver: unknown mode {mode!r} (connect-loop, first-read or hold)")


if __name__ == "__main__":
    main(sys.argv[1:])
