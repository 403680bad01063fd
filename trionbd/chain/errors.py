"""Errors a plugin or filter raises, and errors of configuration and start-up."""

import errno as _errno


class NBDError(Exception):
    """A request (or an open) failed with ``errno`` (a host ``errno`` value).

    The server maps it to the NBD error code and logs ``message``; the client sees the
    message where the protocol carries one (error chunks, option error replies).
    """

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{self.message} ({name})"


class DropConnection(Exception):
    """Raised from a data callback to drop the client at once (nbdkit's
    ``nbdkit_disconnect(true)``): the request gets no reply, the connection's other
    requests are cancelled, and the connection closes. The message is logged."""


class ConfigError(Exception):
    """A bad command line or parameter value. The CLI prints it and exits with status 2."""


class StartupError(Exception):
    """The server cannot start (a backend failed to open, ...). The CLI exits with status 1."""
