"""``Chain``: filters stacked on a plugin, as layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .filter import Filter
from .layer import Layer
from .plugin import Plugin
from .types import Concurrency

log = logging.getLogger(__name__)


class Chain:
    """Filters stacked on a plugin. ``filters[0]`` is closest to the client (as on
    nbdkit's command line); ``layers`` runs from the plugin upwards."""

    def __init__(self, plugin: Plugin, filters: Sequence[Filter] = ()):
        self.plugin = plugin
        self.filters = list(filters)
        layer = Layer(plugin, None)
        self.layers = [layer]
        for f in reversed(self.filters):
            layer.above = f.name
            layer = Layer(f, layer)
            self.layers.append(layer)
        self.top = layer
        self.ready = False
        """True between :meth:`get_ready` and :meth:`unload`."""

    def __repr__(self) -> str:
        return " -> ".join(layer.name for layer in reversed(self.layers))

    @property
    def concurrency(self) -> Concurrency:
        """The strictest concurrency any layer declares."""
        return min(layer.target.concurrency for layer in self.layers)

    @property
    def nonblocking(self) -> bool:
        """True if every layer's data callbacks finish without slow waits."""
        return all(layer.target.nonblocking for layer in self.layers)

    def not_process_safe(self) -> str | None:
        """The first layer (client side first) that is not process-safe, as "the NAME
        plugin" or "the NAME filter"; None when every layer is, so that several worker
        processes may serve this chain."""
        for layer in reversed(self.layers):
            if not layer.target.process_safe:
                kind = "plugin" if layer is self.layers[0] else "filter"
                return f"the {layer.name} {kind}"
        return None

    def worker_shares(self) -> list[object]:
        """Every layer's :meth:`~.plugin.Plugin.worker_share`, plugin first."""
        return [layer.target.worker_share() for layer in self.layers]

    def report_workers(self, shares: Sequence[Sequence[object]], final: bool) -> None:
        """Hand each layer the shares of every worker (``shares`` holds one
        :meth:`worker_shares` list per worker); a failure is logged and the other
        layers still report."""
        for i, layer in enumerate(self.layers):
            try:
                layer.target.report_workers([share[i] for share in shares], final)
            except Exception as e:
                log.error("%s: report failed: %s", layer.name, e)

    def get_ready(self) -> None:
        """Call every layer's ``get_ready``, plugin first; once: until :meth:`unload`,
        later calls do nothing."""
        if self.ready:
            return
        for layer in self.layers:
            layer.target.get_ready()
        self.ready = True

    async def report(self) -> None:
        """Call every layer's ``report``, client side first; a failure is logged and the
        other layers still report."""
        for layer in reversed(self.layers):
            try:
                await layer.report()
            except Exception as e:
                log.error("%s: report failed: %s", layer.name, e)

    def unload(self) -> None:
        """Call every layer's ``unload``, client side first."""
        self.ready = False
        for layer in reversed(self.layers):
            layer.target.unload()
