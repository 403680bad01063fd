"""A small blocking NBD client over a Unix socket, for checking exact option replies.

The raw client of tests/reliability/raw.py, greeted on construction, with a few
conveniences; used where real clients hide the reply codes (which ``NBD_REP_ERR_*``
arrived, its message, whether the connection is still usable afterwards).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tests.reliability import raw
from trionbd.protocol import wire
from trionbd.protocol.constants import REP_FLAG_ERROR, Cmd, Info, Opt, Rep
from trionbd.protocol.events import ExportNameReply, SimpleReply

TIMEOUT = 60.0


@dataclass
class InfoResult:
    """What INFO/GO answered: the final reply code, its message, and the infos."""

    reply: int
    message: str = ""
    size: int | None = None
    flags: int | None = None
    name: str | None = None
    description: str | None = None


class RawClient(raw.RawClient):
    """One connection: greeting and client flags are exchanged on construction."""

    def __init__(self, path: str):
        super().__init__(path, TIMEOUT)
        self.greeting()

    def list_names(self) -> tuple[int, list[str]]:
        """``NBD_OPT_LIST``: the final reply code and the names listed."""
        replies = self.option(Opt.LIST)
        names = []
        for r in replies[:-1]:
            assert r.reply == Rep.SERVER, r
            (n,) = struct.unpack_from(">I", r.payload)
            names.append(r.payload[4 : 4 + n].decode())
        return replies[-1].reply, names

    def info(self, name: str, option: int = Opt.INFO) -> InfoResult:
        """INFO (or GO) for ``name``, asking for its name and description."""
        payload = wire.name_and_infos(name, (Info.NAME, Info.DESCRIPTION))
        replies = self.option(option, payload)
        final = replies[-1]
        result = InfoResult(final.reply)
        if final.reply & REP_FLAG_ERROR:
            result.message = final.payload.decode("utf-8", "replace")
            return result
        for r in replies[:-1]:
            assert r.reply == Rep.INFO, r
            (kind,) = struct.unpack_from(">H", r.payload)
            if kind == Info.EXPORT:
                result.size, result.flags = struct.unpack_from(">QH", r.payload, 2)
            elif kind == Info.NAME:
                result.name = r.payload[2:].decode()
            elif kind == Info.DESCRIPTION:
                result.description = r.payload[2:].decode()
        return result

    def export_name(self, name: str) -> ExportNameReply | None:
        """The old EXPORT_NAME option: the reply, or None if the server hung up."""
        self.send(self.proto.option(Opt.EXPORT_NAME, name.encode()))
        try:
            event = self.event()
        except Exception:
            return None
        return event if isinstance(event, ExportNameReply) else None

    def read(self, offset: int, length: int, cookie: int = 1) -> bytes:
        """A READ after GO (simple replies); raises on an error reply."""
        self.send(self.request(cookie, Cmd.READ, offset, length))
        event = self.event()
        assert isinstance(event, SimpleReply), event
        assert event.error == 0, f"read failed with NBD error {event.error}"
        return event.data
