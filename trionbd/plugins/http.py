"""http: serve a file from an HTTP or HTTPS server, read with range requests (alias curl).

The URL is the magic parameter. At start-up its size comes from a HEAD request's
Content-Length; when HEAD fails or is refused (S3 presigned URLs answer HEAD with 403),
from the Content-Range of a ``GET`` with ``Range: bytes=0-0``. That range request is
always made: a server that ignores ranges (answering 200 with the whole body) is
refused at start-up, since serving 4 KiB would mean downloading everything. Redirects
are followed at start-up and the final URL is used from then on (``followlocation=false``
refuses them).

Each read is one range GET, sent over a pool of keep-alive connections shared by all
clients (``connections=``), so multi-conn is advertised. The export is read-only; block
status reports everything as data; cache requests are accepted and do nothing (nothing
below keeps data, so reading ahead would only cost a transfer).

Faults: refused, reset or dropped connections, bodies cut off, attempts longer than
``timeout=`` and 5xx, 408 and 429 answers are retried with exponential backoff
(``retries=`` times, the first after ``retry-delay=`` seconds). Any other error answer
(4xx) fails the read at once with EIO; the status is in the log. A body that is shorter
or longer than the range asked, or for another range, is an error, never data. A client
that disconnects cancels its reads in flight; the pool is closed at shutdown.

The parameters have nbdkit curl's names; ``password=-`` reads the password from the
terminal (or a line of stdin), ``password=+FILE`` from a file, and ``cookie=`` takes the
same forms.

Examples:
  trionbd http https://example.com/disk.img
  trionbd curl url=https://example.com/disk.img header="Authorization: Bearer TOKEN"
  trionbd http https://example.com/images.tar --filter=tar
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..chain import CacheMode, ConfigError, NBDError, Param, Plugin, StartupError, parse_bool
from . import _http

if TYPE_CHECKING:
    from ..nursery import Lifetime

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_header(text: str) -> tuple[str, str]:
    """``"Name: value"`` as (name, value)."""
    name, colon, value = text.partition(":")
    if not colon or not _TOKEN.match(name.strip()):
        raise ValueError(f"{text!r} is not a header (NAME: VALUE)")
    return name.strip(), value.strip()


class HttpPlugin(Plugin):
    """A file on an HTTP(S) server, read with range requests."""

    name = "http"
    process_safe = True  # each worker has its own connection pool to the same server
    params = (
        Param("url", "the file's http:// or https:// URL", required=True, metavar="URL"),
        Param(
            "header", "an extra request header", parse_header, repeat=True, metavar='"NAME: VALUE"'
        ),
        Param(
            "cookie",
            "the Cookie header (-: read from stdin, +FILE: from a file)",
            _http.parse_secret,
            metavar="COOKIE",
        ),
        Param("user", "user name for HTTP basic authentication"),
        Param(
            "password",
            "its password (-: read from the terminal or stdin, +FILE: from a file)",
            _http.parse_secret,
            metavar="PASSWORD",
        ),
        Param("user-agent", "the User-Agent header", default="trionbd/VERSION"),
        Param(
            "proxy",
            "the proxy's URL (default: http_proxy, https_proxy from the environment)",
            metavar="URL",
        ),
        Param(
            "unix-socket-path",
            "connect to this Unix socket instead of the URL's host",
            metavar="PATH",
        ),
        Param("followlocation", "false: refuse redirects at start-up", parse_bool, default="true"),
        *_http.PARAMS,
    )
    magic_param = "url"

    def __init__(
        self,
        url: str,
        header: list[tuple[str, str]] | None = None,
        cookie: str | None = None,
        user: str | None = None,
        password: str | None = None,
        user_agent: str | None = None,
        proxy: str | None = None,
        unix_socket_path: str | None = None,
        followlocation: bool = True,
        **connection: Any,
    ):
        """``connection`` takes the parameters of :data:`_http.PARAMS` (``connections``,
        ``retries``, ``retry_delay``, ``timeout``, ``sslverify``, ``cainfo``, ``capath``)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"http: {url!r} is not an http:// or https:// URL")
        if password is not None and user is None:
            raise ConfigError("http: password= needs user=")
        if proxy is not None and unix_socket_path is not None:
            raise ConfigError("http: proxy= and unix-socket-path= exclude each other")
        headers = list(header or [])
        if cookie is not None:
            headers.append(("Cookie", cookie))
        if user_agent is not None:
            headers.append(("User-Agent", user_agent))
        settings = _http.Settings.of(
            "http",
            proxy=proxy,
            unix_socket=unix_socket_path,
            headers=tuple(headers),
            auth=None if user is None else (user, password or ""),
            **connection,
        )
        self.url = url
        """The URL served; after start-up, the one that redirects led to."""
        self.follow = followlocation
        self.size = -1
        self.remote = _http.Remote("http", settings)

    async def after_fork(self, lifetime: Lifetime) -> None:
        await lifetime.nursery.start(self.remote.run)
        try:
            await self._locate()
        except NBDError as e:
            raise StartupError(e.message) from None

    async def _locate(self) -> None:
        """Find the final URL and the size, and check that the server serves ranges."""
        size = None
        try:
            head = await self.remote.fetch(
                "HEAD", self.url, ok=_http.ANY_STATUS, follow=self.follow, attempts=1, quiet=True
            )
        except NBDError as e:
            log.info("http: HEAD failed (%s); the size comes from a range request", e.message)
        else:
            if 300 <= head.status < 400:
                where = head.headers.get("location", "?")
                raise StartupError(
                    f"http: {self.url} redirects to {where} and followlocation=false refuses it"
                )
            length = head.headers.get("content-length", "")
            if head.status == 200 and length.isdigit():
                size = int(length)
                self.url = head.url
            else:
                log.info(
                    "http: HEAD %s answered %d %s; the size comes from a range request",
                    self.url, head.status, "without Content-Length" if head.status == 200 else "",
                )  # fmt: skip
        if size == 0:
            self.size = 0
            return
        probe = await self.remote.fetch(
            "GET", self.url, span=(0, 1), ok=(206,), follow=self.follow, quiet=True
        )
        total = _http.content_range(probe.headers)
        assert total is not None  # fetch checked the range
        if size is None:
            if total[2] is None:
                raise StartupError(
                    f"http: {self.url}: the server tells the size neither to HEAD nor with a range"
                )
            size = total[2]
        elif total[2] is not None and total[2] != size:
            raise StartupError(
                f"http: {self.url}: HEAD says {size} bytes but a range request says {total[2]}"
            )
        self.url = probe.url
        self.size = size
        log.debug("http: serving %s, %d bytes", self.url, size)

    # --- per connection ------------------------------------------------------------------

    async def get_size(self, h: Any) -> int:
        return self.size

    async def can_multi_conn(self, h: Any) -> bool:
        return True

    async def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        reply = await self.remote.fetch("GET", self.url, span=(offset, count), ok=(206,))
        return reply.body

    async def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass  # nothing below keeps data: reading now would only cost a transfer


PLUGIN = HttpPlugin
