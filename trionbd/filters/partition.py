"""partition: serve one partition of a partitioned disk.

The layer below is a disk with an MBR or GPT partition table; the export is partition
number N of it, like ``qemu-nbd -P N``. Requests are shifted as by the offset filter
(reads, writes, trim, zero, cache, and block status reported relative to the partition).

Numbering (as nbdkit's): with an MBR, 1-4 are the primary slots and 5 and up the
logical partitions in the order of the extended partition's EBR chain; the extended
partition itself cannot be served (it is a container, not a file system). With a GPT,
N is the index in the partition entry array (unused entries have no number).

The table is read (by ``trionbd.formats.partition``) each time a client opens the
export, through that client's own context of the layer below, so every export of the
layer below has its own table and a table changed by a writer is seen by the next
client. Nothing is read at start-up: a disk without a valid table, or without
partition N, does not stop the server. The client that asks for it gets an error reply
carrying the reason (no table found, a damaged GPT, a partition that lies outside the
disk or overlaps another, partition N missing with the list of those that exist), and
the server keeps serving other clients.

Example:
  trionbd --filter=partition file disk.img partition=1
"""

from __future__ import annotations

import errno

from ..chain import ConfigError, NBDError, Next, Param, parse_int
from ..formats import FormatError
from ..formats.partition import read_partition_table
from . import _formats
from .offset import Window, WindowFilter


class PartitionFilter(WindowFilter):
    """Serve partition N of the disk below."""

    name = "partition"
    process_safe = True
    params = (
        Param("partition", "the partition to serve, counting from 1", parse_int, required=True),
    )

    def __init__(self, partition: int):
        if partition < 1:
            raise ConfigError(f"partition: partition={partition}: partitions count from 1")
        self.partition = partition

    async def window(self, next: Next) -> Window:
        size = await next.get_size()
        what = f"partition: {next.name} export {next.export_name!r}"
        try:
            part = (await read_partition_table(_formats.reader(next), size)).get(self.partition)
        except FormatError as e:
            raise NBDError(errno.EIO, f"{what}: {e}") from None
        if part.is_extended:
            raise NBDError(
                errno.EIO,
                f"{what}: partition {self.partition} is the MBR extended partition (type "
                f"{part.type}), a container of the logical partitions 5 and up; serve one "
                "of those instead",
            )
        return Window(part.offset, part.length)


FILTER = PartitionFilter
