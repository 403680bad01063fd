"""The HTTP client of the remote plugins (``http`` and ``s3``).

A :class:`Remote` is one pool of keep-alive connections (httpx, running natively on
Trio) shared by every client of the server, and the rules every request follows:

* At most ``connections`` requests are on the wire at once; more wait for a free
  connection (in order) before their time starts, so waiting never counts against
  ``timeout``, which limits each attempt from sending the request to the last body byte.
* Faults that may pass are retried with exponential backoff (``retry-delay``, doubled
  each time, ``retries`` times): refused, reset or dropped connections (a body cut off
  mid-way included), attempts running out of time, 5xx, 408 and 429 answers, and what
  the plugin adds (S3's ``SlowDown`` and ``RequestTimeout``). Other answers are final: a
  4xx is an error at once, logged with its status.
* A range GET must be answered ``206`` for exactly the range asked, with exactly that
  many bytes. A ``200`` (the server ignored the range) is refused without reading its
  body; a short or over-long body, a different range or an encoded body is an error,
  never data. Bodies are never decoded (``Accept-Encoding: identity``).
* Cancellation (a client that went away, shutdown) ends a request at once; its
  connection is closed rather than returned to the pool.
* The pool lives in a task of the lifetime nursery (:meth:`Remote.run`) and is closed
  there, when the lifetime ends.
"""

from __future__ import annotations

import errno
import getpass
import logging
import math
import re
import ssl
import sys
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from .. import __version__
from ..chain import ConfigError, NBDError, Param, parse_bool, parse_int, parse_seconds_or_zero

log = logging.getLogger(__name__)
# httpx logs every request at info level and httpcore every step at debug level: with -v
# they would drown the server's own messages. Their warnings still show.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

CLOSE_TIMEOUT = 5.0
"""Seconds the pool gets to close its connections at the end of the lifetime."""
ERROR_BODY_LIMIT = 64 * 1024
"""Bytes of an error answer's body kept (S3 puts its error code there)."""
ANY_STATUS = range(100, 600)
"""``ok`` for a request whose every answer the caller looks at itself."""


def parse_secret(text: str) -> str:
    """A password or cookie as nbdkit takes it: ``-`` reads it from the terminal (or one
    line of stdin when that is not a terminal), ``+FILE`` from a file (one trailing
    newline removed), anything else is the value itself."""
    if text == "-":
        if sys.stdin.isatty():
            return getpass.getpass("password: ")
        return sys.stdin.readline().removesuffix("\n")
    if text.startswith("+"):
        try:
            with open(text[1:]) as f:
                return f.read().removesuffix("\n")
        except OSError as e:
            raise ValueError(f"cannot read {text[1:]}: {e.strerror}") from None
    return text


PARAMS = (
    Param(
        "connections",
        "connections to the server kept open and used at once",
        parse_int,
        default="4",
    ),
    Param("retries", "times a failed request is retried", parse_int, default="4"),
    Param(
        "retry-delay",
        "seconds before the first retry, doubled for each next one",
        parse_seconds_or_zero,
        metavar="SECONDS",
        default="0.5",
    ),
    Param(
        "timeout",
        "seconds one attempt of a request may take, 0 for no limit",
        parse_seconds_or_zero,
        metavar="SECONDS",
        default="60",
    ),
    Param("sslverify", "false: do not verify the server's certificate", parse_bool, default="true"),
    Param(
        "cainfo",
        "CA certificates to verify the server with, instead of the system's",
        metavar="FILE",
    ),
    Param(
        "capath", "a directory of CA certificates with hashed names (openssl rehash)", metavar="DIR"
    ),
)
"""The connection parameters every remote plugin takes; :meth:`Settings.of` reads them."""


@dataclass(frozen=True)
class Settings:
    """How a :class:`Remote` connects and retries."""

    connections: int = 4
    retries: int = 4
    retry_delay: float = 0.5
    timeout: float | None = 60.0
    """Seconds per attempt; ``None`` for no limit."""
    verify: ssl.SSLContext | bool = True
    proxy: str | None = None
    unix_socket: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    """Sent with every request, after the defaults (User-Agent, Accept-Encoding)."""
    auth: tuple[str, str] | None = None
    """User and password for HTTP basic authentication."""

    @classmethod
    def of(
        cls,
        owner: str,
        *,
        connections: int = 4,
        retries: int = 4,
        retry_delay: float = 0.5,
        timeout: float = 60.0,
        sslverify: bool = True,
        cainfo: str | None = None,
        capath: str | None = None,
        **more: Any,
    ) -> Settings:
        """Settings from :data:`PARAMS` (keyword arguments as the constructor gets them);
        ``more`` sets the other fields. Raises ``ConfigError`` naming ``owner``."""
        if connections < 1:
            raise ConfigError(f"{owner}: connections={connections} must be at least 1")
        if retries < 0:
            raise ConfigError(f"{owner}: retries={retries} must not be negative")
        verify: ssl.SSLContext | bool = False
        if sslverify:
            try:
                verify = ssl.create_default_context(cafile=cainfo, capath=capath)
            except (OSError, ssl.SSLError) as e:
                what = " and ".join(
                    f"{k}={v}" for k, v in (("cainfo", cainfo), ("capath", capath)) if v
                )
                raise ConfigError(f"{owner}: cannot load {what}: {e}") from None
        elif cainfo or capath:
            raise ConfigError(f"{owner}: cainfo= and capath= make no sense with sslverify=false")
        return cls(
            connections=connections,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout or None,
            verify=verify,
            **more,
        )


@dataclass(frozen=True)
class Reply:
    """An answer that the caller accepted (its status was in ``ok``)."""

    status: int
    headers: httpx.Headers
    body: bytes
    url: str
    """The URL that answered (after redirects)."""


class HttpError(NBDError):
    """A final answer that was not in ``ok``: EIO, with the status in the message."""

    def __init__(self, status: int, message: str, body: bytes):
        super().__init__(errno.EIO, message)
        self.status = status
        self.body = body


class _Retry(Exception):
    """A fault that may pass: try again after the backoff."""


Sign = Callable[[str, str, dict[str, str], bytes], Awaitable[dict[str, str]]]
"""Adds authentication to a request: (method, url, headers, body) -> headers. Called for
each attempt (a signature carries the time it was made)."""


def retryable_status(status: int, body: bytes) -> bool:
    """Answers worth another try: server errors, 408 Request Timeout, 429 Too Many Requests."""
    return status >= 500 or status in (408, 429)


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def content_range(headers: httpx.Headers) -> tuple[int, int, int | None] | None:
    """``Content-Range: bytes FIRST-LAST/TOTAL`` as (first, last, total or None)."""
    m = _CONTENT_RANGE.match(headers.get("content-range", ""))
    if m is None:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from, outermost first."""
    chain = [e]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None:
        if inner in chain:
            break
        chain.append(inner)
    return chain


def _describe(e: httpx.TransportError) -> str:
    """What went wrong, from the first exception of the chain that says something
    (httpx's own often say nothing on Trio), named by httpx's class."""
    text = next((str(c) for c in _causes(e) if str(c)), "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _is_final(e: httpx.TransportError) -> bool:
    """Transport errors that another try cannot mend: a certificate that does not
    verify, a URL scheme httpx does not speak."""
    if isinstance(e, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return True
    return any(isinstance(c, ssl.SSLCertVerificationError) for c in _causes(e))


class Remote:
    """A pool of keep-alive HTTP(S) connections with retries and checked ranges."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        retryable: Callable[[int, bytes], bool] = retryable_status,
        explain: Callable[[bytes], str] | None = None,
    ):
        """``retryable(status, body)`` tells which error answers to retry; ``explain(body)``
        adds what an error answer's body says to the message (S3's error code)."""
        self.name = name
        """Starts every message (the plugin's name)."""
        self.settings = settings
        self._retryable = retryable
        self._explain = explain
        self._slots = trio.CapacityLimiter(settings.connections)
        self._client: httpx.AsyncClient | None = None

    # --- the pool's lifetime -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the pool and keep it until cancelled, then close it. Start it in the
        lifetime nursery (``await lifetime.nursery.start(remote.run)``): requests may be
        made from any task once it has started, until the lifetime ends."""
        s = self.settings
        limits = httpx.Limits(
            max_connections=s.connections, max_keepalive_connections=s.connections
        )
        headers = [("User-Agent", f"trionbd/{__version__}"), ("Accept-Encoding", "identity")]
        names = {k.lower() for k, _ in s.headers}
        headers = [(k, v) for k, v in headers if k.lower() not in names] + list(s.headers)
        transport = None
        if s.unix_socket is not None:
            transport = httpx.AsyncHTTPTransport(verify=s.verify, limits=limits, uds=s.unix_socket)
        client = httpx.AsyncClient(
            headers=headers,
            auth=s.auth,
            verify=s.verify,
            proxy=s.proxy,
            limits=limits,
            timeout=httpx.Timeout(None),  # each attempt has its own deadline (fetch)
            transport=transport,
        )
        self._client = client
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._client = None
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await client.aclose()

    # --- requests ------------------------------------------------------------------------

    async def fetch(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes = b"",
        ok: Collection[int] = (200,),
        span: tuple[int, int] | None = None,
        sign: Sign | None = None,
        follow: bool = False,
        limit: int = 64 << 20,
        attempts: int | None = None,
        quiet: bool = False,
    ) -> Reply:
        """Send a request until it gets an answer in ``ok`` (returned with its body),
        retrying what may pass; raise ``HttpError`` for a final answer outside ``ok``
        and ``NBDError(EIO)`` when the retries are spent.

        ``span=(offset, count)`` asks for that range of bytes: a 206 answer must hold
        exactly it. ``follow`` follows redirects (the reply's ``url`` is the final one).
        A body longer than ``limit`` is an error. ``attempts`` overrides ``retries + 1``.
        Final failures are logged as warnings unless ``quiet`` (the caller reports them).
        """
        hdrs = dict(headers or {})
        what = f"{method} {url}"
        if span is not None:
            offset, count = span
            hdrs["Range"] = f"bytes={offset}-{offset + count - 1}"
            what += f" bytes {offset}-{offset + count - 1}"
        settings = self.settings
        tries = settings.retries + 1 if attempts is None else attempts
        delay = settings.retry_delay
        timeout = math.inf if settings.timeout is None else settings.timeout
        reason = ""
        for attempt in range(1, tries + 1):
            async with self._slots:
                with trio.move_on_after(timeout) as scope:
                    try:
                        return await self._once(
                            method, url, hdrs, content, ok, span, sign, follow, limit, what
                        )
                    except NBDError as e:
                        if not quiet:
                            log.warning("%s", e.message)
                        raise
                    except _Retry as e:
                        reason = str(e)
                if scope.cancelled_caught:
                    reason = f"no complete answer within {settings.timeout:g} s (timeout=)"
            if attempt < tries:
                log.info(
                    "%s: %s: %s; retry %d of %d in %g s",
                    self.name, what, reason, attempt, tries - 1, delay,
                )  # fmt: skip
                await trio.sleep(delay)
                delay *= 2
        error = NBDError(errno.EIO, f"{self.name}: {what}: {reason} (after {tries} attempts)")
        if not quiet:
            log.warning("%s", error.message)
        raise error

    async def _once(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        content: bytes,
        ok: Collection[int],
        span: tuple[int, int] | None,
        sign: Sign | None,
        follow: bool,
        limit: int,
        what: str,
    ) -> Reply:
        client = self._client
        if client is None:
            raise NBDError(errno.ESHUTDOWN, f"{self.name}: the connection pool is closed")
        if sign is not None:
            headers = await sign(method, url, headers, content)
        request = client.build_request(method, url, headers=headers, content=content)
        try:
            response = await client.send(request, stream=True, follow_redirects=follow)
        except httpx.TransportError as e:
            if _is_final(e):
                raise NBDError(errno.EIO, f"{self.name}: {what}: {_describe(e)}") from None
            raise _Retry(_describe(e)) from None
        try:
            status = response.status_code
            if status in ok:
                count = None
                if status == 206 and span is not None:
                    count = self._check_range(response, span, what)
                if method == "HEAD":  # no body, but read its end: the connection is reused
                    await response.aread()
                    body = b""
                else:
                    body = await self._body(response, what, count, limit)
                return Reply(status, response.headers, body, str(response.url))
            if status == 200 and span is not None:
                raise NBDError(
                    errno.EIO,
                    f"{self.name}: {what}: the server ignored the range and answered 200 with "
                    "the whole body (range requests are needed)",
                )
            body = await self._error_body(response)
            if self._retryable(status, body):
                raise _Retry(f"HTTP {status} {response.reason_phrase}")
            message = f"{self.name}: {what}: HTTP {status} {response.reason_phrase}"
            detail = self._explain(body) if self._explain is not None else ""
            if detail:
                message += f" ({detail})"
            if response.has_redirect_location:
                message += (
                    f", redirecting to {response.headers['location']} (redirects are "
                    "followed only at start-up, and not with followlocation=false)"
                )
            raise HttpError(status, message, body)
        except httpx.TransportError as e:  # the body broke off
            raise _Retry(_describe(e)) from None
        finally:
            await response.aclose()

    def _check_range(self, response: httpx.Response, span: tuple[int, int], what: str) -> int:
        offset, count = span
        got = content_range(response.headers)
        if got is None or got[:2] != (offset, offset + count - 1):
            shown = response.headers.get("content-range", "no Content-Range")
            raise NBDError(errno.EIO, f"{self.name}: {what}: the server sent {shown!r}")
        return count

    async def _body(
        self, response: httpx.Response, what: str, count: int | None, limit: int
    ) -> bytes:
        """The whole body: exactly ``count`` bytes if given, else at most ``limit``."""
        encoding = response.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise NBDError(errno.EIO, f"{self.name}: {what}: the body is {encoding}-encoded")
        cap = limit if count is None else count
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit():
            n = int(declared)
            if count is not None and n != count:
                raise NBDError(
                    errno.EIO, f"{self.name}: {what}: the server sends {n} bytes for {count}"
                )
            if n > cap:
                raise NBDError(errno.EIO, f"{self.name}: {what}: a body of {n} bytes is too long")
        chunks = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > cap:
                raise NBDError(
                    errno.EIO, f"{self.name}: {what}: the body is longer than {cap} bytes"
                )
            chunks.append(chunk)
        if count is not None and size != count:
            raise NBDError(errno.EIO, f"{self.name}: {what}: short body: {size} bytes of {count}")
        return b"".join(chunks)

    async def _error_body(self, response: httpx.Response) -> bytes:
        """The first :data:`ERROR_BODY_LIMIT` bytes of an error answer's body."""
        chunks = []
        size = 0
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
            size += len(chunk)
            if size >= ERROR_BODY_LIMIT:
                break
        return b"".join(chunks)[:ERROR_BODY_LIMIT]
