"""scripts/demo as the README tells a new user to run it: a line per step, then a
read-only server of the demo archive's members with the commands to try; Enter stops it."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

from tests.support import HANG_GUARD, ROOT, listing, read_export, read_line, run, short_tmpdir


def test_the_demo_serves_its_archive_read_only_until_enter(tmp_path: Path) -> None:
    with short_tmpdir() as demo:  # the socket lives here: a short path
        proc = subprocess.Popen(
            [str(ROOT / "scripts" / "demo")],
            env={**os.environ, "TRIONBD_DEMO_DIR": str(demo)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            lines = []
            while not lines or not lines[-1].startswith("demo: press Enter"):
                line = read_line(proc, HANG_GUARD)
                assert line, f"the demo stopped early:\n{''.join(lines)}"
                lines.append(line)
            shown = "".join(lines)
            uri = next(line for line in lines if "default export" in line).split(": ")[-1]
            uri = uri.strip()
            assert f"nbdinfo --list '{uri}'" in shown and f"nbdcopy '{uri}' disk.img" in shown
            assert "read-only" in shown
            names = [e["export-name"] for e in listing(uri)]
            assert names == ["disk.img", "random.bin", "sparse.img"]
            run(["nbdinfo", "--is", "readonly", uri])  # exit status 0: read-only
            with tarfile.open(demo / "demo.tar") as archive:
                member = archive.extractfile("random.bin")
                assert member is not None
                expected = member.read()
            random_uri = uri.replace("nbd+unix:///?", "nbd+unix:///random.bin?")
            assert read_export(random_uri, tmp_path) == expected
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            _, err = proc.communicate(timeout=HANG_GUARD)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        # A line per step on stderr; the server's socket is gone.
        assert "demo: setting up" in err and "setup: ready" in err and "demo: building" in err
        assert not (demo / "nbd.sock").exists()
