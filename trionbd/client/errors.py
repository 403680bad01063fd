"""What the client raises: :class:`~trionbd.chain.NBDError` subclasses carrying a host
``errno`` (the server's NBD errors mapped back by :mod:`trionbd.protocol.errnos`)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum

import trio

from ..chain.errors import NBDError
from ..protocol.constants import Err, Opt, Rep
from ..protocol.errnos import host_errno, option_errno
from ..protocol.errors import ProtocolError

STREAM_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
"""What a broken or closed stream raises."""


class RequestError(NBDError):
    """The server answered a request with an error. The connection stays usable.

    ``error`` is the NBD error value (``Err``), ``errno`` the matching host errno
    (unknown values count as ``EINVAL``, as the spec says), ``message`` the server's
    message (or the error's name when it sent none), ``offset`` the offset an
    ``NBD_REPLY_TYPE_ERROR_OFFSET`` chunk pointed at.
    """

    def __init__(self, error: int, message: str, offset: int | None = None):
        super().__init__(host_errno(error), message or _name(Err, error))
        self.error = error
        self.offset = offset


class OptionError(NBDError):
    """The server refused an option of the handshake (``reply`` is its ``Rep`` error).

    ``NBD_REP_ERR_UNKNOWN`` (no such export) maps to ``ENOENT``, policy and TLS refusals
    to ``EPERM``, ``ERR_INVALID`` to ``EINVAL``, ``ERR_SHUTDOWN`` to ``ESHUTDOWN``.
    The connection stays in the handshake: another option may follow.
    """

    def __init__(self, option: int, reply: int, message: str):
        text = f"{_name(Opt, option)} refused with {_name(Rep, reply)}"
        text += f": {message}" if message else ""
        super().__init__(option_errno(reply), text)
        self.option = option
        self.reply = reply
        self.server_message = message


class ConnectionFailed(NBDError):
    """The connection could not be made, broke, or was closed (``errno`` is ``EIO``)."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


def _name(kind: type[IntEnum], value: int) -> str:
    try:
        return kind(value).name
    except ValueError:
        return str(value)


@contextmanager
def failures(peer: str, doing: str) -> Iterator[None]:
    """Turn stream and protocol errors into ``ConnectionFailed`` naming the peer."""
    try:
        yield
    except ProtocolError as e:
        raise ConnectionFailed(f"{peer}: protocol error while {doing}: {e}") from e
    except STREAM_ERRORS as e:
        raise ConnectionFailed(f"{peer}: connection failed while {doing}: {describe(e)}") from e


def describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
