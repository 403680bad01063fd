"""Every NBD wire constant, named as in the protocol specification.

Magic numbers, option and reply codes, flags, commands and errors, plus the limits
trionbd enforces. Nothing here does I/O.
"""

from enum import IntEnum, IntFlag

# --- magic numbers ---------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943
"""ASCII ``NBDMAGIC``: first 8 bytes of the server greeting."""
IHAVEOPT = 0x49484156454F5054
"""ASCII ``IHAVEOPT``: second greeting magic, and the magic of every option request."""
REPLY_MAGIC = 0x0003E889045565A9
"""Magic of every option reply."""
REQUEST_MAGIC = 0x25609513
"""Magic of a compact (28-byte) request."""
EXTENDED_REQUEST_MAGIC = 0x21E41C71
"""Magic of an extended (32-byte) request, once extended headers are negotiated."""
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C
"""Magic of an extended (32-byte) reply header, once extended headers are negotiated."""


class HandshakeFlag(IntFlag):
    """Server handshake flags (16 bit), sent in the greeting."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """Client flags (32 bit), sent right after the greeting."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(IntEnum):
    """Option codes of the handshake phase."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_FLAG_ERROR = 1 << 31
"""Set in the type of every error reply to an option (``NBD_REP_FLAG_ERROR``)."""


class Rep(IntEnum):
    """Option reply types. Errors have REP_FLAG_ERROR set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_FLAG_ERROR | 1
    ERR_POLICY = REP_FLAG_ERROR | 2
    ERR_INVALID = REP_FLAG_ERROR | 3
    ERR_PLATFORM = REP_FLAG_ERROR | 4
    ERR_TLS_REQD = REP_FLAG_ERROR | 5
    ERR_UNKNOWN = REP_FLAG_ERROR | 6
    ERR_SHUTDOWN = REP_FLAG_ERROR | 7
    ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
    ERR_TOO_BIG = REP_FLAG_ERROR | 9
    ERR_EXT_HEADER_REQD = REP_FLAG_ERROR | 10

    @property
    def is_error(self) -> bool:
        return bool(self & REP_FLAG_ERROR)


class Info(IntEnum):
    """Info types inside ``NBD_REP_INFO`` replies."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    """Per-export transmission flags (16 bit)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12
    """A BLOCK_STATUS request may name the context ids it wants in a payload (only
    with extended headers)."""


class Cmd(IntEnum):
    """Request types of the transmission phase."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(IntFlag):
    """Request (command) flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5
    """Extended headers only: the request's length is the length of a payload that
    follows the header (always so for WRITE), not an effect length."""


FUA_BIT = int(CmdFlag.FUA)
"""``CmdFlag.FUA`` as a plain int, for the per-request paths: ``flags & CmdFlag.FUA`` on
an int goes through ``IntFlag.__and__`` and costs about a microsecond."""


class ReplyFlag(IntFlag):
    DONE = 1 << 0


REPLY_TYPE_FLAG_ERROR = 1 << 15
"""Set in the type of every error chunk (what the spec's ``NBD_REPLY_TYPE_IS_ERR`` tests)."""


class ReplyType(IntEnum):
    """Structured reply chunk types. Errors have REPLY_TYPE_FLAG_ERROR set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    """64-bit extents: the block status chunk of extended headers."""
    ERROR = REPLY_TYPE_FLAG_ERROR | 1
    ERROR_OFFSET = REPLY_TYPE_FLAG_ERROR | 2


class Err(IntEnum):
    """Error values of simple replies and error chunks (not the host's errno values)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class State(IntFlag):
    """``base:allocation`` status flags of block status descriptors."""

    HOLE = 1 << 0
    ZERO = 1 << 1


UNALLOCATED = State.HOLE | State.ZERO
"""The status of a range that stores nothing and reads as zeroes."""


BASE_ALLOCATION = "base:allocation"
"""The metadata context of allocation (``State`` flags); offered first, so its id is 1
when a client selects it."""

# --- limits ----------------------------------------------------------------------------

MAX_STRING = 4096
"""Longest export name, description, query or error message (bytes)."""
MAX_OPTION_LENGTH = 64 * 1024 * 1024
"""Longest option payload trionbd reads and discards; a longer one closes the connection."""
MAX_OPTION_PAYLOAD_KEPT = 64 * 1024
"""Longest payload a known option may have; longer ones are discarded and refused."""
MAX_REQUEST = 64 * 1024 * 1024
"""Longest READ or WRITE payload accepted (bytes)."""
MAX_DISCARDED_WRITE = 128 * 1024 * 1024
"""Longest refused WRITE payload that is read and thrown away; beyond it, close."""
MAX_EXTENTS = 1 << 20
"""Most extents sent in one block status chunk (the specification's limit); a longer
answer is cut there, and the client asks again for the rest."""
MAX_META_QUERIES = 128
"""Most queries one LIST/SET_META_CONTEXT may carry."""
MAX_OPTIONS = 32
"""Options a client may send before entering transmission, plus this many per listed export."""

BLOCK_SIZE_MIN = 1
BLOCK_SIZE_PREFERRED = 4096
BLOCK_SIZE_MAX = 32 * 1024 * 1024
"""Advertised maximum payload. Requests up to MAX_REQUEST are still accepted."""

DEFAULT_PORT = 10809
