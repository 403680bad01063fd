"""shared: all clients share one context of the layer below per export.

Without this filter every client connection opens its own context of the plugin (for
the ``nbd`` plugin: its own upstream connection). With it, each export has one context
of the layer below, opened through the lifetime nursery, and every client of that
export uses it; it is closed when the server exits, not when clients leave. The
default export's context is opened at start-up, before the first client (as nbdkit's
``nbd --shared`` connects at once): if that fails, the server does not start (exit
status 1, with the reason). Other exports' contexts are opened by the first client
asking for them. ``trionbd --filter=shared nbd socket=UPSTREAM`` therefore holds
exactly one upstream connection from start-up on, however many clients come and go.

Consequences:

* Requests of all clients meet in one context. The plugin's concurrency declaration
  applies to that context as it would to one client: a plugin that serializes requests
  per connection now serializes them across all clients.
* A FLUSH from any client flushes the shared context, so multi-conn is advertised.
* The context is opened with the server's read-only setting (``-r``); a client can
  never make it writable, and a read-only client of a writable context stays
  read-only.
* The default export is resolved once (the name of the layer below's default export
  does not change while clients share it).
* The metadata contexts of the layer below (a dirty bitmap, one the ``nbd`` plugin
  passes on from its upstream) are offered as they are: the data is the same.
* If opening another export fails, its next client tries again. If a shared context
  breaks (the upstream server of ``nbd`` dies), every client sees the errors until the
  server is restarted.

Example:
  trionbd --filter=shared nbd socket=/tmp/upstream.sock
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..chain import BuildOnce, Filter, Layer, NBDError, Next, StartupError

if TYPE_CHECKING:
    from ..nursery import Lifetime


class SharedFilter(Filter):
    """One context of the layer below per export, shared by every client."""

    name = "shared"
    process_safe = False  # one shared context per export lives in this process

    def __init__(self) -> None:
        self._lifetime: Lifetime | None = None
        self._below: Layer | None = None
        self._contexts: BuildOnce[str, Next] = BuildOnce(self._open_shared, remember_errors=False)
        self._defaults: BuildOnce[tuple[bool, bool], str] = BuildOnce(
            self._default_below, remember_errors=False
        )

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        self._lifetime = lifetime
        self._below = below
        try:
            name = await self._defaults.get((lifetime.readonly, False))
            await self._contexts.get(name)
        except (NBDError, OSError) as e:
            message = f"shared: cannot open the default export of {below.name}: {e}"
            raise StartupError(message) from e

    async def default_export(self, below: Layer, readonly: bool, is_tls: bool) -> str:
        return await self._defaults.get((readonly, is_tls))

    async def _default_below(self, key: tuple[bool, bool]) -> str:
        assert self._below is not None
        return await self._below.default_export(*key)

    async def meta_contexts(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> Sequence[str]:
        # The data is the layer below's, unmoved: its contexts (a dirty bitmap) hold.
        return await below.meta_contexts(readonly, export_name, is_tls)

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        return await self._contexts.get(export_name), None

    async def _open_shared(self, export_name: str) -> Next:
        if self._lifetime is None or self._below is None:
            raise NBDError(errno.EIO, "shared: opened before after_fork")
        lifetime = self._lifetime
        return await lifetime.open_context(self._below, export_name, lifetime.readonly)

    async def can_multi_conn(self, next: Next, h: Any) -> bool:
        return True


FILTER = SharedFilter
