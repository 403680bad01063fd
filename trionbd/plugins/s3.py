"""s3: objects of an S3 bucket as exports, or a writable disk made of objects (alias S3).

Works with AWS and S3-compatible stores (MinIO, Ceph RGW, R2, moto ...: give their
``endpoint-url``). Three modes:

* ``key=KEY``: that object, read-only, whatever export name a client asks for.
* ``prefix=P``, or neither key nor prefix (the whole bucket): every object under P is an
  export named by its key without P (``trionbd s3 bucket=b prefix=2026/`` lists
  ``a.tar`` for ``2026/a.tar``; keys ending in ``/``, folder markers, are left out). The
  list is streamed page by page (ListObjectsV2), so a bucket of 100 000 keys lists without
  holding them all; the default export is the first key. With ``--filter=tar`` every
  member of every archive under the prefix is an export, ``ARCHIVE/MEMBER``, read with
  range requests: nothing is downloaded whole.
* ``key=K size=N object-size=M``: a writable disk of N bytes stored in nbdkit's layout,
  so disks move between nbdkit's S3 plugin and trionbd: bytes ``[i*M, (i+1)*M)`` are
  object ``K/%016x`` of ``i``. A missing object reads as zeroes and is a hole in block
  status. A write to part of an object reads, modifies and puts it back; such writes to
  one object are serialised within this server (no update is lost between its clients).
  Trim and zero delete the objects they cover whole (zero rewrites the parts of objects
  it covers partly; trim leaves them). Every write is stored when its PUT returns, so
  FUA and flush cost nothing. ``size`` must be a multiple of ``object-size``.
  **Two servers writing the same disk at once are not safe**: each serialises only its
  own read-modify-writes, and neither knows what the other has in flight. Run one
  writer per disk; any number of servers may read a disk no one writes.

Reads are range GETs over a pool of keep-alive connections shared by all clients (so
multi-conn is advertised), signed with AWS Signature V4 (botocore's signer). Without
``access-key``/``secret-key``, credentials come from botocore's standard chain: the
AWS_* environment variables, the shared credentials and config files (``profile=`` or
AWS_PROFILE), container and instance metadata; with none found, requests go unsigned
(public buckets). The region is ``region=``, else the profile's or AWS_REGION, else
us-east-1. Addressing is path-style (``ENDPOINT/BUCKET/KEY``) when ``endpoint-url`` is
given, virtual-hosted (``BUCKET.s3.REGION.amazonaws.com/KEY``) otherwise;
``addressing=`` forces either.

Faults: as the http plugin (connection faults, timeouts, 5xx, 408 and 429 retried with
exponential backoff), plus S3's SlowDown and RequestTimeout answers; other errors are
final (EIO, logged with S3's error code).

The parameters have nbdkit's S3 names where it has them. Credentials on the command
line are visible to other users of the machine: prefer the environment or
``~/.aws/credentials``.

Examples:
  trionbd s3 bucket=images key=fedora.img
  trionbd s3 bucket=backups prefix=2026/ --filter=tar
  trionbd s3 endpoint-url=http://minio:9000 bucket=disks key=vm1 size=50G object-size=1M
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_plus, urlsplit

import botocore.exceptions
import botocore.session
import trio
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ..chain import (
    BlockSize,
    CacheMode,
    ConfigError,
    Export,
    ExportList,
    Extent,
    FuaMode,
    NBDError,
    Param,
    Plugin,
    Sparse,
    StartupError,
    ZeroMode,
    parse_choice,
    parse_size,
)
from ..protocol.constants import BLOCK_SIZE_MAX, UNALLOCATED, CmdFlag
from . import _http

if TYPE_CHECKING:
    from ..nursery import Lifetime

log = logging.getLogger(__name__)

PAGE_KEYS = 1000
"""Keys asked per ListObjectsV2 page (S3's maximum)."""
DELETE_BATCH = 1000
"""Keys per DeleteObjects request (S3's maximum)."""
RETRY_CODES = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
}
"""S3 error codes worth another try (besides every 5xx, 408 and 429)."""


# --- S3's XML ------------------------------------------------------------------------------


def _children(element: ET.Element) -> Iterator[tuple[str, ET.Element]]:
    """(tag without namespace, child) of each child."""
    for child in element:
        yield child.tag.rpartition("}")[2], child


def _error_code(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 error body, or empty strings."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    fields = {tag: child.text or "" for tag, child in _children(root)}
    return fields.get("Code", ""), fields.get("Message", "")


def retryable(status: int, body: bytes) -> bool:
    return _http.retryable_status(status, body) or _error_code(body)[0] in RETRY_CODES


def explain(body: bytes) -> str:
    code, message = _error_code(body)
    return f"{code}: {message}" if code else ""


@dataclass(frozen=True)
class Page:
    """One page of a ListObjectsV2 answer."""

    objects: list[tuple[str, int]]
    """(key, size) in key order."""
    next_token: str | None


def parse_page(body: bytes) -> Page:
    root = ET.fromstring(body)
    encoded = False
    truncated = False
    token = None
    objects = []
    for tag, child in _children(root):
        if tag == "Contents":
            fields = {t: c.text or "" for t, c in _children(child)}
            objects.append((fields["Key"], int(fields.get("Size") or 0)))
        elif tag == "IsTruncated":
            truncated = child.text == "true"
        elif tag == "NextContinuationToken":
            token = child.text
        elif tag == "EncodingType":
            encoded = child.text == "url"
    if encoded:
        objects = [(unquote_plus(k), size) for k, size in objects]
    return Page(objects, token if truncated else None)


def delete_body(keys: list[str]) -> bytes:
    root = ET.Element("Delete")
    ET.SubElement(root, "Quiet").text = "true"
    for key in keys:
        ET.SubElement(ET.SubElement(root, "Object"), "Key").text = key
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def quote_key(key: str) -> str:
    """A key as a URL path: every segment percent-encoded, and ``.``/``..`` segments too
    (HTTP clients would otherwise fold them away)."""
    return "/".join(
        "%2E" * len(s) if s in (".", "..") else quote(s, safe="") for s in key.split("/")
    )


# --- the disk made of objects ----------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """The part of a request that falls into one object."""

    index: int
    start: int
    """Offset in the object."""
    length: int
    pos: int
    """Offset in the request."""
    whole: bool


def pieces(offset: int, count: int, object_size: int) -> Iterator[Piece]:
    pos = 0
    while pos < count:
        piece = _piece(offset, pos, count, object_size)
        yield piece
        pos += piece.length


def _piece(offset: int, pos: int, count: int, object_size: int) -> Piece:
    """The piece of the request ``[offset, offset + count)`` that starts at ``pos``."""
    index, start = divmod(offset + pos, object_size)
    length = min(object_size - start, count - pos)
    return Piece(index, start, length, pos, length == object_size)


def partial_pieces(offset: int, count: int, object_size: int) -> list[Piece]:
    """The pieces of a request that cover their objects only in part: the first and the
    last, or neither (found without walking the ones between)."""
    if not count:
        return []
    first = _piece(offset, 0, count, object_size)
    out = [] if first.whole else [first]
    tail = (offset + count) % object_size
    if tail and count - tail >= first.length:  # not the same piece as the first
        out.append(_piece(offset, count - tail, count, object_size))
    return out


class ObjectLocks:
    """One lock per object index, existing while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[trio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, index: int) -> AsyncIterator[None]:
        lock, users = self._locks.get(index, (trio.Lock(), 0))
        self._locks[index] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[index]
            if users == 1:
                del self._locks[index]
            else:
                self._locks[index] = (lock, users - 1)


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


async def each(
    fn: Callable[[Piece], Awaitable[None]], items: Iterable[Piece], workers: int
) -> None:
    """``fn`` for every item, ``workers`` at a time; the first ``NBDError`` is raised as
    it is (the others are cancelled)."""
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await fn(item)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        errors, rest = group.split(NBDError)
        if errors is not None and rest is None:
            raise _first_error(errors) from None
        raise


# --- the plugin --------------------------------------------------------------------------


@dataclass(frozen=True)
class Object:
    """An open object (key and prefix modes)."""

    key: str
    size: int


class S3Plugin(Plugin):
    """Objects of an S3 bucket, or a writable disk made of objects."""

    name = "s3"
    params = (
        Param("bucket", "the bucket", required=True, metavar="BUCKET"),
        Param(
            "key", "one object; with size= and object-size=, the disk's key prefix", metavar="KEY"
        ),
        Param("prefix", "serve every object whose key starts with this", metavar="PREFIX"),
        Param("size", "size of the writable disk made of objects", parse_size),
        Param("object-size", "bytes per object of that disk", parse_size),
        Param("endpoint-url", "URL of an S3-compatible service", metavar="URL"),
        Param(
            "region",
            "the bucket's region",
            metavar="REGION",
            default="from the profile, else us-east-1",
        ),
        Param(
            "addressing",
            "how URLs name the bucket",
            parse_choice("path", "virtual"),
            default="path with endpoint-url, else virtual",
        ),
        Param("access-key", "AWS access key id", metavar="ID"),
        Param("secret-key", "AWS secret access key", metavar="SECRET"),
        Param("session-token", "AWS session token", metavar="TOKEN"),
        Param("profile", "profile of the shared AWS config and credentials files", metavar="NAME"),
        *_http.PARAMS,
    )

    def __init__(
        self,
        bucket: str,
        key: str | None = None,
        prefix: str | None = None,
        size: int | None = None,
        object_size: int | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        **connection: Any,
    ):
        """``connection`` takes the parameters of :data:`_http.PARAMS`."""
        if not bucket or "/" in bucket:
            raise ConfigError(f"s3: {bucket!r} is not a bucket name")
        if key is not None and prefix is not None:
            raise ConfigError("s3: give key= or prefix=, not both")
        if (size is None) != (object_size is None):
            raise ConfigError("s3: size= and object-size= go together")
        if object_size is not None:
            assert size is not None
            if not key:
                raise ConfigError("s3: a disk made of objects (size=, object-size=) needs key=")
            if object_size <= 0 or size <= 0:
                raise ConfigError("s3: size= and object-size= must not be 0")
            if size % object_size:
                raise ConfigError(f"s3: size={size} is not a multiple of object-size={object_size}")
        if (access_key is None) != (secret_key is None):
            raise ConfigError("s3: access-key= and secret-key= go together")
        if session_token is not None and access_key is None:
            raise ConfigError("s3: session-token= needs access-key= and secret-key=")
        if endpoint_url is not None:
            parts = urlsplit(endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"s3: {endpoint_url!r} is not an http:// or https:// URL")
        self.bucket = bucket
        self.key = key
        self.prefix = prefix or ""
        self.size = size
        self.object_size = object_size
        self.endpoint_url = endpoint_url
        self.region = region
        self.addressing = addressing or ("path" if endpoint_url else "virtual")
        self._static = None if access_key is None else (access_key, secret_key, session_token)
        self.profile = profile
        self.credentials: Any = None
        """botocore credentials (static or refreshable), or None: unsigned requests."""
        self._base = ""
        """The URL of the bucket, ending in ``/`` (set by ``get_ready``)."""
        self.remote = _http.Remote(
            "s3", _http.Settings.of("s3", **connection), retryable=retryable, explain=explain
        )
        self.locks = ObjectLocks()
        # A disk made of objects serialises the read-modify-writes of one object in this
        # process only: two workers could each write part of the same object and lose
        # one update. Reading objects is safe from any number of processes.
        self.process_safe = not self.sharded

    @property
    def sharded(self) -> bool:
        return self.object_size is not None

    # --- start-up ------------------------------------------------------------------------

    def get_ready(self) -> None:
        """Resolve the credentials and the region (files, environment, metadata)."""
        try:
            session = botocore.session.Session(profile=self.profile)
            if self._static is not None:
                self.credentials = Credentials(*self._static)
            else:
                self.credentials = session.get_credentials()
            region = self.region or session.get_config_variable("region")
        except botocore.exceptions.ProfileNotFound as e:
            raise ConfigError(f"s3: {e}") from None
        except botocore.exceptions.BotoCoreError as e:
            raise StartupError(f"s3: finding credentials failed: {e}") from None
        self.region = region or "us-east-1"
        if self.credentials is None:
            log.warning("s3: no AWS credentials found: requests go unsigned (public buckets)")
        if self.endpoint_url is None:
            base = f"https://s3.{self.region}.amazonaws.com"
        else:
            base = self.endpoint_url.rstrip("/")
        parts = urlsplit(base)
        if self.addressing == "virtual" and "." not in self.bucket:
            self._base = f"{parts.scheme}://{self.bucket}.{parts.netloc}{parts.path}/"
        else:  # path-style (names with dots do not fit a wildcard certificate)
            self._base = f"{base}/{quote(self.bucket, safe='')}/"

    async def after_fork(self, lifetime: Lifetime) -> None:
        await lifetime.nursery.start(self.remote.run)
        try:
            if self.key is not None and not self.sharded:
                await self._head(self.key, quiet=True)
            else:  # the bucket exists and we may list it
                async with aclosing(self._keys(self._disk_prefix(), limit=1, quiet=True)) as keys:
                    async for _ in keys:
                        break
        except NBDError as e:
            raise StartupError(e.message) from None

    # --- requests ------------------------------------------------------------------------

    def _url(self, key: str = "", query: str = "") -> str:
        return self._base + quote_key(key) + (f"?{query}" if query else "")

    async def _sign(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> dict[str, str]:
        creds = self.credentials
        if creds is None:
            return headers
        if getattr(creds, "refresh_needed", lambda: False)():
            frozen = await trio.to_thread.run_sync(creds.get_frozen_credentials)
        else:
            frozen = creds.get_frozen_credentials()
        request = AWSRequest(method=method, url=url, headers=headers, data=body)
        S3SigV4Auth(frozen, "s3", self.region).add_auth(request)
        return dict(request.headers.items())

    async def _head(self, key: str, quiet: bool = False) -> int:
        """The size of object ``key``; ENOENT if there is none, EACCES if forbidden."""
        try:
            reply = await self.remote.fetch("HEAD", self._url(key), sign=self._sign, quiet=quiet)
        except _http.HttpError as e:
            what = f"s3: object {key!r} in bucket {self.bucket!r}"
            if e.status == 404:
                raise NBDError(errno.ENOENT, f"{what} does not exist (HTTP 404)") from None
            if e.status == 403:
                raise NBDError(errno.EACCES, f"{what}: access denied (HTTP 403)") from None
            raise
        return int(reply.headers.get("content-length", "0"))

    async def _keys(
        self, prefix: str, start_after: str = "", limit: int = PAGE_KEYS, quiet: bool = False
    ) -> AsyncGenerator[tuple[str, int]]:
        """(key, size) of every object under ``prefix`` after ``start_after``, in key
        order, one ListObjectsV2 page at a time."""
        params = {
            "list-type": "2",
            "prefix": prefix,
            "max-keys": str(limit),
            "encoding-type": "url",
        }
        if start_after:
            params["start-after"] = start_after
        while True:
            query = "&".join(f"{k}={quote(v, safe='')}" for k, v in sorted(params.items()))
            reply = await self.remote.fetch(
                "GET", self._url(query=query), sign=self._sign, quiet=quiet
            )
            try:
                page = parse_page(reply.body)
            except (ET.ParseError, KeyError, ValueError) as e:
                raise NBDError(
                    errno.EIO, f"s3: a ListObjectsV2 answer makes no sense: {e}"
                ) from None
            for item in page.objects:
                yield item
            if page.next_token is None:
                return
            params["continuation-token"] = page.next_token

    # --- exports -------------------------------------------------------------------------

    @property
    def listing(self) -> bool:
        return self.key is None

    async def list_exports(self, readonly: bool, is_tls: bool) -> ExportList:
        if not self.listing:
            return [Export("")]
        return self._exports()

    async def _exports(self) -> AsyncGenerator[Export]:
        cut = len(self.prefix)
        async for key, size in self._keys(self.prefix):
            if not key.endswith("/"):
                yield Export(key[cut:], f"object, {size} bytes")

    async def default_export(self, readonly: bool, is_tls: bool) -> str:
        if self.listing:
            async with aclosing(self._exports()) as exports:
                async for export in exports:
                    return export.name
        return ""

    def _disk_prefix(self) -> str:
        return f"{self.key}/" if self.sharded else self.prefix

    # --- per connection ------------------------------------------------------------------

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> Object | None:
        if self.sharded:
            return None
        if self.key is not None:
            return Object(self.key, await self._head(self.key))
        if not export_name:
            raise NBDError(errno.ENOENT, f"s3: no objects under {self.prefix!r} in {self.bucket!r}")
        key = self.prefix + export_name
        return Object(key, await self._head(key, quiet=True))

    async def get_size(self, h: Object | None) -> int:
        if h is None:
            assert self.size is not None
            return self.size
        return h.size

    async def export_description(self, h: Object | None) -> str | None:
        return None if h is None or not self.listing else f"object, {h.size} bytes"

    async def block_size(self, h: Object | None) -> BlockSize | None:
        size = self.object_size
        if size is None or size & (size - 1) or not 4096 <= size <= BLOCK_SIZE_MAX:
            return None
        return BlockSize(preferred=size)

    async def can_write(self, h: Object | None) -> bool:
        return self.sharded

    async def can_flush(self, h: Object | None) -> bool:
        return self.sharded

    async def can_fua(self, h: Object | None) -> FuaMode:
        return FuaMode.NATIVE if self.sharded else FuaMode.NONE

    async def can_trim(self, h: Object | None) -> bool:
        return self.sharded

    async def can_zero(self, h: Object | None) -> ZeroMode:
        return ZeroMode.NATIVE if self.sharded else ZeroMode.NONE

    async def can_fast_zero(self, h: Object | None) -> bool:
        return self.sharded

    async def can_extents(self, h: Object | None) -> bool:
        return self.sharded

    async def can_multi_conn(self, h: Object | None) -> bool:
        return True

    async def can_cache(self, h: Object | None) -> CacheMode:
        return CacheMode.NATIVE

    async def cache(self, h: Object | None, count: int, offset: int, flags: int) -> None:
        pass  # nothing below keeps data: reading now would only cost a transfer

    # --- reads ---------------------------------------------------------------------------

    async def pread(self, h: Object | None, count: int, offset: int, flags: int) -> bytes:
        if h is not None:
            return await self._get(h.key, offset, count)
        assert self.object_size is not None
        parts = list(pieces(offset, count, self.object_size))
        if len(parts) == 1:
            data = await self._get_piece(parts[0])
            return data if data is not None else Sparse(bytes(count), ((0, count),))
        out = bytearray(count)
        holes: list[tuple[int, int]] = []

        async def read(p: Piece) -> None:
            data = await self._get_piece(p)
            if data is None:
                holes.append((p.pos, p.length))
            else:
                out[p.pos : p.pos + p.length] = data

        await each(read, parts, self.remote.settings.connections)
        return Sparse(bytes(out), tuple(sorted(holes))) if holes else bytes(out)

    async def _get(self, key: str, offset: int, count: int) -> bytes:
        reply = await self.remote.fetch(
            "GET", self._url(key), span=(offset, count), ok=(206,), sign=self._sign
        )
        return reply.body

    def _object_key(self, index: int) -> str:
        return f"{self.key}/{index:016x}"

    async def _get_piece(self, p: Piece) -> bytes | None:
        """The piece's bytes; None if its object does not exist (zeroes, a hole)."""
        key = self._object_key(p.index)
        reply = await self.remote.fetch(
            "GET", self._url(key), span=(p.start, p.length), ok=(206, 404), sign=self._sign
        )
        if reply.status == 404:
            self._check_missing(key, reply)
            return None
        return reply.body

    def _check_missing(self, key: str, reply: _http.Reply) -> None:
        """A 404 is a missing object only if S3 says so (not a missing bucket)."""
        code, message = _error_code(reply.body)
        if code != "NoSuchKey":
            raise NBDError(errno.EIO, f"s3: GET {key}: HTTP 404 {code}: {message}")

    async def _get_object(self, index: int) -> bytearray | None:
        """A whole object of the disk, checked for its size; None if it does not exist."""
        assert self.object_size is not None
        key = self._object_key(index)
        reply = await self.remote.fetch(
            "GET", self._url(key), ok=(200, 404), sign=self._sign, limit=self.object_size
        )
        if reply.status == 404:
            self._check_missing(key, reply)
            return None
        if len(reply.body) != self.object_size:
            raise NBDError(
                errno.EIO,
                f"s3: object {key} is {len(reply.body)} bytes, not object-size {self.object_size}",
            )
        return bytearray(reply.body)

    async def _put(self, index: int, data: bytes) -> None:
        url = self._url(self._object_key(index))
        await self.remote.fetch("PUT", url, content=data, sign=self._sign)

    # --- writes --------------------------------------------------------------------------

    async def pwrite(self, h: Object | None, buf: bytes, offset: int, flags: int) -> None:
        assert self.object_size is not None
        view = memoryview(buf)

        async def write(p: Piece) -> None:
            data = view[p.pos : p.pos + p.length]
            if p.whole:
                await self._put(p.index, bytes(data))
            else:
                await self._modify(p, data)

        await each(
            write, pieces(offset, len(buf), self.object_size), self.remote.settings.connections
        )

    async def _modify(self, p: Piece, data: bytes | memoryview) -> None:
        """Read, modify and put back one object; one at a time per object."""
        async with self.locks.hold(p.index):
            current = await self._get_object(p.index)
            if current is None:
                if not any(data):
                    return  # zeroes into a missing object: nothing changes
                assert self.object_size is not None
                current = bytearray(self.object_size)
            current[p.start : p.start + p.length] = data
            await self._put(p.index, bytes(current))

    async def flush(self, h: Object | None, flags: int) -> None:
        pass  # every write was stored when its PUT returned

    async def trim(self, h: Object | None, count: int, offset: int, flags: int) -> None:
        await self._delete_whole(offset, count)

    async def zero(self, h: Object | None, count: int, offset: int, flags: int) -> None:
        assert self.object_size is not None
        partial = partial_pieces(offset, count, self.object_size)
        if flags & CmdFlag.FAST_ZERO and (partial or flags & CmdFlag.NO_HOLE):
            raise NBDError(errno.ENOTSUP, "s3: zeroing part of an object is a write")
        if flags & CmdFlag.NO_HOLE:  # keep the objects: write zeroes
            zeroes = bytes(self.object_size)

            async def write(p: Piece) -> None:
                if p.whole:
                    await self._put(p.index, zeroes)
                else:
                    await self._modify(p, zeroes[: p.length])

            await each(
                write, pieces(offset, count, self.object_size), self.remote.settings.connections
            )
            return
        await each(lambda p: self._modify(p, bytes(p.length)), partial, len(partial) or 1)
        await self._delete_whole(offset, count)

    async def _delete_whole(self, offset: int, count: int) -> None:
        """Delete the objects that ``[offset, offset + count)`` covers whole."""
        assert self.object_size is not None
        first = -(-offset // self.object_size)
        end = (offset + count) // self.object_size
        if first >= end:
            return
        start_after = self._object_key(first - 1) if first else ""
        last_key = self._object_key(end - 1)
        batch: list[str] = []
        async with aclosing(self._keys(f"{self.key}/", start_after)) as keys:
            async for key, _ in keys:
                if key > last_key:
                    break
                if _index(key, self.key or "") is None:
                    continue
                batch.append(key)
                if len(batch) == DELETE_BATCH:
                    await self._delete(batch)
                    batch = []
        if batch:
            await self._delete(batch)

    async def _delete(self, keys: list[str]) -> None:
        body = delete_body(keys)
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        reply = await self.remote.fetch(
            "POST", self._url(query="delete"), content=body, sign=self._sign,
            headers={"Content-MD5": md5, "Content-Type": "application/xml"},
        )  # fmt: skip
        failed = [
            {t: c.text for t, c in _children(error)}
            for tag, error in _children(ET.fromstring(reply.body))
            if tag == "Error"
        ]
        if failed:
            f = failed[0]
            raise NBDError(
                errno.EIO,
                f"s3: deleting {len(failed)} of {len(keys)} objects failed, first "
                f"{f.get('Key')}: {f.get('Code')}: {f.get('Message')}",
            )

    # --- block status --------------------------------------------------------------------

    async def extents(self, h: Object | None, count: int, offset: int, flags: int) -> list[Extent]:
        """Objects that exist are data, missing ones holes: one page of the listing (the
        client asks again for what lies beyond)."""
        assert self.object_size is not None
        size = self.object_size
        first = offset // size
        end = -(-(offset + count) // size)
        start_after = self._object_key(first - 1) if first else ""
        last_key = self._object_key(end - 1)
        stop = offset + count
        present: list[int] = []
        async with aclosing(self._keys(f"{self.key}/", start_after)) as keys:
            async for key, _ in keys:
                if key > last_key:
                    break
                index = _index(key, self.key or "")
                if index is not None:
                    present.append(index)
                    if len(present) == PAGE_KEYS:
                        stop = min(stop, (index + 1) * size)
                        break
        out: list[Extent] = []
        pos = offset
        for index in present:
            begin = max(index * size, offset)
            if begin > pos:
                out.append(Extent(pos, begin - pos, UNALLOCATED))
            finish = min((index + 1) * size, stop)
            out.append(Extent(begin, finish - begin, 0))
            pos = finish
        if pos < stop:
            out.append(Extent(pos, stop - pos, UNALLOCATED))
        return out


def _index(key: str, disk: str) -> int | None:
    """The object index of a key of the disk ``disk`` (``DISK/%016x``), or None."""
    suffix = key[len(disk) + 1 :]
    if len(suffix) != 16 or not all(c in "0123456789abcdef" for c in suffix):
        return None
    return int(suffix, 16)


PLUGIN = S3Plugin
