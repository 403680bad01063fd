"""exitlast: exit when the last client has gone.

The server runs until a client has opened an export; from then on, once no client has
an export open any more, it stops accepting clients and exits (status 0) as soon as
the clients still connected have disconnected. A server with this filter serves one
job and goes away, without anyone having to stop it: started by a superserver (socket
activation) it saves its resources while nobody uses it, started by a script it does
not outlive the client.

An export opened only to answer a question about it (``nbdinfo --list`` opens each)
counts too: ``nbdinfo --list`` alone ends the server, as with nbdkit.

See also the exitwhen filter (exit when an event occurs), ``--run`` (serve while a
command runs) and ``--exit-with-parent``.

Example:
  trionbd --filter=exitlast file disk.img
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..chain import Filter, Layer, Next

if TYPE_CHECKING:
    from ..nursery import Lifetime


class ExitlastFilter(Filter):
    """Asks the server to end once no export is open any more."""

    name = "exitlast"
    process_safe = False  # it counts the clients of this process only

    def __init__(self) -> None:
        self.lifetime: Lifetime | None = None
        self.open_contexts = 0

    async def after_fork(self, lifetime: Lifetime, below: Layer) -> None:
        self.lifetime = lifetime

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        ctx = await below.open(readonly, export_name, is_tls)
        self.open_contexts += 1
        return ctx, None

    async def close(self, next: Next, h: Any) -> None:
        self.open_contexts -= 1
        if self.open_contexts == 0 and self.lifetime is not None:
            self.lifetime.request_shutdown()


FILTER = ExitlastFilter
