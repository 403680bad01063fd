"""blocksize-policy: advertise block size constraints; refuse requests breaking them.

NBD servers tell clients a minimum block size (requests should be multiples of it, at
offsets aligned to it), a preferred one (requests of this size go fastest) and a
maximum (no request carrying data should be larger). ``blocksize-minimum``,
``blocksize-preferred`` and ``blocksize-maximum`` set what this export advertises; a
value not given is the layer below's (for a layer that sets none: 1, 4096 and 32M).
The minimum must be a power of two up to 64K, the preferred one a power of two from
512 to 32M, the maximum a multiple of the minimum (or 4294967295); the three must not
decrease. ``nbdinfo`` shows what a server advertises.

Well-behaved clients obey the constraints; ``blocksize-error-policy`` says what happens
to requests that do not:

* ``allow`` (the default): they pass to the layer below, which may cope (split a large
  request, read-modify-write an unaligned write) or fail them.
* ``error``: they fail here with EINVAL, as the NBD protocol asks: a request smaller
  than the minimum, not a multiple of it, or at an offset not aligned to it (any
  command but flush), or a read or write larger than the maximum.

``blocksize-write-disconnect=SIZE`` drops a client at once, without a reply, when it
sends a write larger than SIZE, however the error policy is set (qemu-nbd disconnects
for writes over 32M; this emulates it). Without ``blocksize-maximum``, the advertised
maximum is then at most SIZE rounded down to the minimum. trionbd itself refuses reads
and writes over 64M with EINVAL before any filter sees them.

Put the blocksize filter (when there is one) below this one to make a layer that needs
aligned requests serve clients that ignore the advertised minimum.

Examples:
  trionbd --filter=blocksize-policy memory 1G blocksize-preferred=32K
  trionbd --filter=blocksize-policy file disk.img blocksize-minimum=4K \\
      blocksize-error-policy=error
  trionbd --filter=blocksize-policy file disk.img blocksize-write-disconnect=32M
"""

from __future__ import annotations

import errno

import trio

from ..chain import (
    BlockSize,
    ConfigError,
    DropConnection,
    Extent,
    Filter,
    Layer,
    NBDError,
    Next,
    Param,
    parse_choice,
    parse_size,
)

UINT32_MAX = 0xFFFFFFFF


def parse_u32_size(text: str) -> int:
    value = parse_size(text)
    if value > UINT32_MAX:
        raise ValueError(f"{text!r} is larger than {UINT32_MAX}")
    return value


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class BlocksizePolicyFilter(Filter):
    """Sets the advertised block size constraints and enforces them if asked."""

    name = "blocksize-policy"
    process_safe = True
    params = (
        Param(
            "blocksize-error-policy",
            "allow: pass requests that break the constraints down; error: fail them with EINVAL",
            parse_choice("allow", "error"),
            default="allow",
        ),
        Param(
            "blocksize-minimum",
            "advertised minimum block size: a power of two up to 64K",
            parse_u32_size,
            metavar="SIZE",
        ),
        Param(
            "blocksize-preferred",
            "advertised preferred block size: a power of two from 512 to 32M",
            parse_u32_size,
            metavar="SIZE",
        ),
        Param(
            "blocksize-maximum", "advertised maximum request size", parse_u32_size, metavar="SIZE"
        ),
        Param(
            "blocksize-write-disconnect",
            "drop a client at once when it writes more than this in one request",
            parse_u32_size,
            metavar="SIZE",
        ),
    )

    def __init__(
        self,
        blocksize_error_policy: str = "allow",
        blocksize_minimum: int | None = None,
        blocksize_preferred: int | None = None,
        blocksize_maximum: int | None = None,
        blocksize_write_disconnect: int | None = None,
    ):
        minimum, preferred, maximum = blocksize_minimum, blocksize_preferred, blocksize_maximum
        disconnect = blocksize_write_disconnect
        problems = []
        if minimum is not None and not (_power_of_two(minimum) and minimum <= 65536):
            problems.append(f"blocksize-minimum={minimum} is not a power of two up to 64K")
        if preferred is not None and not (
            _power_of_two(preferred) and 512 <= preferred <= 32 << 20
        ):
            problems.append(
                f"blocksize-preferred={preferred} is not a power of two from 512 to 32M"
            )
        if minimum and maximum and maximum != UINT32_MAX and maximum % minimum:
            problems.append(f"blocksize-maximum={maximum} is not a multiple of the minimum")
        if minimum and preferred and minimum > preferred:
            problems.append("blocksize-minimum is larger than blocksize-preferred")
        if preferred and maximum is not None and preferred > maximum:
            problems.append("blocksize-preferred is larger than blocksize-maximum")
        if minimum and disconnect is not None and disconnect <= minimum:
            problems.append("blocksize-write-disconnect must be larger than blocksize-minimum")
        if problems:
            raise ConfigError(f"blocksize-policy: {'; '.join(problems)}")
        self.error = blocksize_error_policy == "error"
        self.minimum = minimum
        self.preferred = preferred
        self.maximum = maximum
        self.disconnect = disconnect

    def constraints(self, below: BlockSize) -> BlockSize:
        """What is advertised, given the layer below's constraints."""
        minimum = self.minimum or below.minimum
        preferred = self.preferred or below.preferred
        maximum = self.maximum
        if maximum is None:
            maximum = below.maximum
            if self.disconnect is not None:
                maximum = min(maximum, self.disconnect - self.disconnect % minimum)
        return BlockSize(minimum, preferred, maximum)

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, BlockSize]:
        next = await below.open(readonly, export_name, is_tls)
        sizes = self.constraints(await next.block_size())
        if not sizes.minimum <= sizes.preferred <= sizes.maximum:
            with trio.CancelScope(shield=True):
                await next.close()
            raise NBDError(
                errno.EINVAL,
                f"blocksize-policy: block sizes minimum {sizes.minimum}, preferred "
                f"{sizes.preferred}, maximum {sizes.maximum} (with {next.name}'s) "
                "do not increase",
            )
        return next, sizes

    async def block_size(self, next: Next, h: BlockSize) -> BlockSize:
        return h

    def _check(self, h: BlockSize, what: str, count: int, offset: int, data: bool) -> None:
        """EINVAL for a request breaking the constraints, with the error policy on;
        ``data``: a read or write, which the maximum also limits."""
        if not self.error:
            return
        minimum = h.minimum
        if count < minimum:
            problem = f"{count} bytes is less than the minimum block size {minimum}"
        elif data and count > h.maximum:
            problem = f"{count} bytes is more than the maximum block size {h.maximum}"
        elif count % minimum:
            problem = f"{count} bytes is not a multiple of the minimum block size {minimum}"
        elif offset % minimum:
            problem = f"offset {offset} is not aligned to the minimum block size {minimum}"
        else:
            return
        raise NBDError(errno.EINVAL, f"blocksize-policy: {what} refused: {problem}")

    async def pread(self, next: Next, h: BlockSize, count: int, offset: int, flags: int) -> bytes:
        self._check(h, "read", count, offset, True)
        return await next.pread(count, offset, flags)

    async def pwrite(self, next: Next, h: BlockSize, buf: bytes, offset: int, flags: int) -> None:
        if self.disconnect is not None and len(buf) > self.disconnect:
            raise DropConnection(
                f"blocksize-policy: a write of {len(buf)} bytes is over "
                f"blocksize-write-disconnect={self.disconnect}"
            )
        self._check(h, "write", len(buf), offset, True)
        await next.pwrite(buf, offset, flags)

    async def trim(self, next: Next, h: BlockSize, count: int, offset: int, flags: int) -> None:
        self._check(h, "trim", count, offset, False)
        await next.trim(count, offset, flags)

    async def zero(self, next: Next, h: BlockSize, count: int, offset: int, flags: int) -> None:
        self._check(h, "zero", count, offset, False)
        await next.zero(count, offset, flags)

    async def cache(self, next: Next, h: BlockSize, count: int, offset: int, flags: int) -> None:
        self._check(h, "cache", count, offset, False)
        await next.cache(count, offset, flags)

    async def extents(
        self, next: Next, h: BlockSize, count: int, offset: int, flags: int
    ) -> list[Extent]:
        self._check(h, "block status", count, offset, False)
        return await next.extents(count, offset, flags)


FILTER = BlocksizePolicyFilter
