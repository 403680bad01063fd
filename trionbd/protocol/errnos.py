"""Host ``errno`` values and NBD errors, both ways, in one place.

The server answers a failed request with :func:`nbd_error` of the host errno the chain
raised, and a failed option (an export that cannot be opened or listed) with
:func:`option_error`. The client turns the server's answers back into host errno values:
:func:`host_errno` for a request, :func:`option_errno` for an option. The NBD protocol
names only a handful of errors; everything else travels as ``EINVAL`` (requests) or
``ERR_UNKNOWN`` (options), as nbdkit does.
"""

from __future__ import annotations

import errno

from .constants import CmdFlag, Err, Rep

_TO_NBD = {
    errno.EPERM: Err.EPERM,
    errno.EROFS: Err.EPERM,
    errno.EACCES: Err.EPERM,
    errno.EIO: Err.EIO,
    errno.ENOMEM: Err.ENOMEM,
    errno.ENOSPC: Err.ENOSPC,
    errno.EDQUOT: Err.ENOSPC,
    errno.EFBIG: Err.ENOSPC,
    errno.ESHUTDOWN: Err.ESHUTDOWN,
    errno.EINVAL: Err.EINVAL,
}
_TO_HOST: dict[int, int] = {
    Err.EPERM: errno.EPERM,
    Err.EIO: errno.EIO,
    Err.ENOMEM: errno.ENOMEM,
    Err.EINVAL: errno.EINVAL,
    Err.ENOSPC: errno.ENOSPC,
    Err.EOVERFLOW: errno.EOVERFLOW,
    Err.ENOTSUP: errno.ENOTSUP,
    Err.ESHUTDOWN: errno.ESHUTDOWN,
}
_OPTION_TO_HOST: dict[int, int] = {
    Rep.ERR_UNKNOWN: errno.ENOENT,
    Rep.ERR_POLICY: errno.EPERM,
    Rep.ERR_TLS_REQD: errno.EPERM,
    Rep.ERR_INVALID: errno.EINVAL,
    Rep.ERR_SHUTDOWN: errno.ESHUTDOWN,
    Rep.ERR_UNSUP: errno.ENOTSUP,
    Rep.ERR_PLATFORM: errno.ENOTSUP,
}


def nbd_error(code: int, flags: int) -> Err:
    """The NBD error a client sees when a request with command ``flags`` fails with the
    host errno ``code``. ``ENOTSUP`` is ``NBD_ENOTSUP`` only for a FAST_ZERO request and
    ``EOVERFLOW`` is ``NBD_EOVERFLOW`` only for a DF read; both are ``EINVAL`` otherwise."""
    if code in (errno.ENOTSUP, errno.EOPNOTSUPP):
        return Err.ENOTSUP if flags & CmdFlag.FAST_ZERO else Err.EINVAL
    if code == errno.EOVERFLOW:
        return Err.EOVERFLOW if flags & CmdFlag.DF else Err.EINVAL
    return _TO_NBD.get(code, Err.EINVAL)


def host_errno(error: int) -> int:
    """The host errno of the NBD error ``error`` (unknown values are ``EINVAL``, as the
    specification says)."""
    return _TO_HOST.get(error, errno.EINVAL)


def option_error(code: int) -> Rep:
    """The option error reply for an export that cannot be opened or listed because of
    the host errno ``code``."""
    if code in (errno.EACCES, errno.EPERM):
        return Rep.ERR_POLICY
    if code == errno.ESHUTDOWN:
        return Rep.ERR_SHUTDOWN
    if code == errno.EINVAL:
        return Rep.ERR_INVALID
    return Rep.ERR_UNKNOWN


def option_errno(reply: int) -> int:
    """The host errno of an option error reply: ``ERR_UNKNOWN`` (no such export) is
    ``ENOENT``, policy and TLS refusals ``EPERM``; anything unknown ``EIO``."""
    return _OPTION_TO_HOST.get(reply, errno.EIO)
