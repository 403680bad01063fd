"""--max-connections with real clients: a client over the limit is refused in the
handshake with the reason (qemu prints it; libnbd reports the server's policy), the
server logs the refusal, and once a place is free clients are served again."""

from __future__ import annotations

import subprocess
import time

from tests.support import SYSTEM_PYTHON, run, trionbd_process

HOLDER = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
h.shutdown()
"""


def test_clients_over_the_limit_are_told_why() -> None:
    with trionbd_process("--max-connections=1", "memory", "1M") as server:
        holder = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", HOLDER, server.uri],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline() == "connected\n"
        qemu = subprocess.run(["qemu-img", "info", server.uri], capture_output=True, text=True)
        assert qemu.returncode != 0
        assert "too many clients: the limit is 1 (--max-connections)" in qemu.stderr
        libnbd = subprocess.run(
            [SYSTEM_PYTHON, "-c", HOLDER, server.uri], capture_output=True, text=True
        )
        assert libnbd.returncode != 0 and "server policy prevents" in libnbd.stderr
        holder.stdin.write("\n")
        holder.stdin.close()
        assert holder.wait(30) == 0
        # The server may see the holder's disconnect a moment after the holder exits.
        for _ in range(100):
            size = run(["nbdinfo", "--size", server.uri], check=False).strip()
            if size:
                break
            time.sleep(0.1)
        assert size == "1048576"
        log = server.stderr
    assert log.count("refused: too many clients: the limit is 1 (--max-connections)") >= 2
