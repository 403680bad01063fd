"""noextents: report the whole export as allocated data.

Block status requests are answered without asking the layer below: every byte is data,
never a hole or zeroes, as if the layer below had no extents support. Clients that copy
(nbdcopy, qemu-img convert) then read and write every byte instead of skipping holes.
Useful over a layer whose block status is slow or wrong (a file on tmpfs, where seeking
for holes is slow), and for testing how clients behave without sparseness information.
Reads and writes are unchanged.

``base:allocation`` stays negotiable, as in nbdkit: clients get their block status
answers, all saying data. To keep clients from asking at all, start the server with
``--no-sr`` (no structured replies) or ``--no-mc`` (no meta contexts).

Example:
  trionbd --filter=noextents file /dev/shm/disk.img
"""

from __future__ import annotations

from typing import Any

from ..chain import Filter, Next


class NoExtentsFilter(Filter):
    """Hides the layer below's extents: everything reads as allocated data."""

    name = "noextents"
    process_safe = True

    async def can_extents(self, next: Next, h: Any) -> bool:
        return False


FILTER = NoExtentsFilter
