"""Protocol errors raised by the sans-IO state machines."""


class ProtocolError(Exception):
    """Base class: the byte stream can no longer be trusted; close the connection."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol. The message says what was expected and what arrived."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol (or the current state) does not allow."""
