"""``-u USER`` and ``-g GROUP``: the server binds as root, then runs as the user and
group given. Checked on the real command: the kernel's view of the process
(/proc/PID/status) and what the server can then open for its clients."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    export_info,
    random_file,
    read_export,
    run,
    trionbd_process,
    wait_until,
)
from trionbd import cli
from trionbd.server.daemon import Identity, identity

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid)
"""Debian's nobody and its primary group, nogroup (65534 both)."""


def credentials(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of /proc/PID/status (real, effective, saved, fs)."""
    with open(f"/proc/{pid}/status") as f:
        lines = dict(line.split(":", 1) for line in f.read().splitlines())
    return {key: [int(n) for n in lines[key].split()] for key in ("Uid", "Gid", "Groups")}


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory anybody may enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="tnbd-users", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_serves_as_the_user_and_group_given(public_dir: Path, tmp_path: Path) -> None:
    readable = random_file(public_dir / "readable.img", 1 << 20)
    (public_dir / "readable.img").chmod(0o644)
    random_file(public_dir / "secret.img", 4096)
    (public_dir / "secret.img").chmod(0o600)
    with trionbd_process("-u", "nobody", "-g", NOGROUP.gr_name, "file", f"dir={public_dir}") as s:
        ids = credentials(s.proc.pid)
        assert ids["Uid"] == [NOBODY.pw_uid] * 4
        assert ids["Gid"] == [NOGROUP.gr_gid] * 4
        assert ids["Groups"] == [NOGROUP.gr_gid]
        # A file nobody may read is served, read-only (nobody may not write it) ...
        uri = s.uri_for("readable.img")
        assert read_export(uri, tmp_path) == readable
        assert export_info(uri)["is_read_only"] is True
        # ... and root's own file cannot be opened any more.
        with pytest.raises(AssertionError, match="server policy prevents NBD_OPT_GO"):
            run(["nbdinfo", "--size", s.uri_for("secret.img")])
        secret = public_dir / "secret.img"
        wait_until(lambda: f"{secret}: Permission denied" in s.stderr, "the server says why")


def test_a_user_alone_brings_its_own_group(public_dir: Path) -> None:
    with trionbd_process("-u", str(NOBODY.pw_uid), "memory", "1M") as s:
        ids = credentials(s.proc.pid)
        assert ids["Uid"] == [NOBODY.pw_uid] * 4
        assert ids["Gid"] == [NOBODY.pw_gid] * 4
        assert ids["Groups"] == os.getgrouplist("nobody", NOBODY.pw_gid)
        assert run(["nbdinfo", "--size", s.uri]).strip() == "1048576"


def test_a_group_alone_keeps_the_user() -> None:
    with trionbd_process("-g", NOGROUP.gr_name, "memory", "1M") as s:
        ids = credentials(s.proc.pid)
        assert ids["Uid"] == [0] * 4
        assert ids["Gid"] == [NOGROUP.gr_gid] * 4
        assert ids["Groups"] == [NOGROUP.gr_gid]


def test_numeric_ids_without_a_password_entry() -> None:
    free = next(n for n in range(54321, 60000) if not _exists(n))
    assert identity(str(free), str(free)) == Identity(free, free, (free,))
    with pytest.raises(cli.ConfigError, match=f"-u {free}: no such user in the password"):
        identity(str(free), None)


def _exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-u", "no-such-user"], "-u no-such-user: no such user (give a name or a numeric id)"),
        (["-g", "no-such-group"], "-g no-such-group: no such group (give a name or a numeric id)"),
    ],
)
def test_unknown_names_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.run([*args, "memory", "1M"]) == 2
    assert capsys.readouterr().err == f"trionbd: {message}\n"


def test_refused_unless_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.run(["-f", "-u", "nobody", "memory", "1M"]) == 2
    assert capsys.readouterr().err == (
        "trionbd: -u/-g: changing user or group needs root (this process runs as uid 1000)\n"
    )
