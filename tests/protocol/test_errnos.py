"""The errno tables: host errno to NBD error and option error, and back."""

from __future__ import annotations

import errno

import pytest

from trionbd.protocol.constants import CmdFlag, Err, Rep
from trionbd.protocol.errnos import host_errno, nbd_error, option_errno, option_error


@pytest.mark.parametrize(
    ("code", "flags", "error"),
    [
        (errno.EPERM, 0, Err.EPERM),
        (errno.EROFS, 0, Err.EPERM),
        (errno.EACCES, 0, Err.EPERM),
        (errno.EIO, 0, Err.EIO),
        (errno.ENOMEM, 0, Err.ENOMEM),
        (errno.ENOSPC, 0, Err.ENOSPC),
        (errno.EDQUOT, 0, Err.ENOSPC),
        (errno.EFBIG, 0, Err.ENOSPC),
        (errno.ESHUTDOWN, 0, Err.ESHUTDOWN),
        (errno.ENOTSUP, 0, Err.EINVAL),
        (errno.ENOTSUP, CmdFlag.FAST_ZERO, Err.ENOTSUP),
        (errno.EOPNOTSUPP, CmdFlag.FAST_ZERO, Err.ENOTSUP),
        (errno.EOVERFLOW, 0, Err.EINVAL),
        (errno.EOVERFLOW, CmdFlag.DF, Err.EOVERFLOW),
        (errno.ENOENT, 0, Err.EINVAL),
        (errno.EBADF, 0, Err.EINVAL),
    ],
)
def test_errno_mapping(code: int, flags: int, error: Err) -> None:
    assert nbd_error(code, flags) == error


@pytest.mark.parametrize("error", [e for e in Err if e is not Err.OK])
def test_every_nbd_error_maps_back_to_the_host_errno_of_its_name(error: Err) -> None:
    assert host_errno(error) == getattr(errno, error.name)


def test_unknown_nbd_errors_are_einval() -> None:
    assert host_errno(1234) == errno.EINVAL


@pytest.mark.parametrize(
    ("code", "reply", "back"),
    [
        (errno.ENOENT, Rep.ERR_UNKNOWN, errno.ENOENT),
        (errno.EACCES, Rep.ERR_POLICY, errno.EPERM),
        (errno.EPERM, Rep.ERR_POLICY, errno.EPERM),
        (errno.EINVAL, Rep.ERR_INVALID, errno.EINVAL),
        (errno.ESHUTDOWN, Rep.ERR_SHUTDOWN, errno.ESHUTDOWN),
        (errno.EIO, Rep.ERR_UNKNOWN, errno.ENOENT),
    ],
)
def test_option_errors_both_ways(code: int, reply: Rep, back: int) -> None:
    assert option_error(code) == reply
    assert option_errno(reply) == back


def test_other_option_replies_map_to_host_errors() -> None:
    assert option_errno(Rep.ERR_TLS_REQD) == errno.EPERM
    assert option_errno(Rep.ERR_UNSUP) == errno.ENOTSUP
    assert option_errno(Rep.ERR_PLATFORM) == errno.ENOTSUP
    assert option_errno(Rep.ERR_TOO_BIG) == errno.EIO
