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


# --- scripts/backports-source: the APT entry scripts/setup adds for qemu 10 -----------------

DEB822 = """\
Types: deb deb-src
# a comment inside the stanza
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Enabled: no
Components: main

# http://snapshot.debian.org/archive/debian/20250520T000000Z
Types: deb deb-src
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBGPL0BUBEADmW5NdOOHwPIJlgPu6JDcKw/NZJPR8lsD3K87ZM18gzyQZJD+w
 -----END PGP PUBLIC KEY BLOCK-----
"""


def backports_source(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "backports-source"), *map(str, files)],
        capture_output=True, text=True, timeout=HANG_GUARD,
    )  # fmt: skip


def test_backports_entry_from_a_deb822_stanza(tmp_path: Path) -> None:
    """The first enabled deb stanza for bookworm, suite changed, comments dropped,
    continuation lines (an inline key) kept; no mirror is made up."""
    (tmp_path / "debian.sources").write_text(DEB822)
    result = backports_source(tmp_path / "debian.sources")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "Types: deb\n"
        "URIs: http://mirror.example/debian\n"
        "Suites: bookworm-backports\n"
        "Components: main contrib\n"
        "Signed-By:\n"
        " -----BEGIN PGP PUBLIC KEY BLOCK-----\n"
        " .\n"
        " mQINBGPL0BUBEADmW5NdOOHwPIJlgPu6JDcKw/NZJPR8lsD3K87ZM18gzyQZJD+w\n"
        " -----END PGP PUBLIC KEY BLOCK-----\n"
    )


def test_backports_entry_from_a_one_line_list_when_there_is_no_deb822_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "deb http://mirror.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian"
        " bookworm main non-free-firmware # the main one\n"
    )
    result = backports_source(tmp_path / "absent.sources", tmp_path / "sources.list")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian"
        " bookworm-backports main non-free-firmware\n"
    )


def test_no_bookworm_entry_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.list").write_text("deb http://mirror.example/debian trixie main\n")
    result = backports_source(tmp_path / "x.list")
    assert result.returncode == 1 and result.stdout == ""
    assert "no enabled 'deb' entry for bookworm" in result.stderr
