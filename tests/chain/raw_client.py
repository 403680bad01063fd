"""A small blocking NBD client over a Unix socket, for checking exact option replies.

Built on the project's sans-IO ``ClientConnection``; used where real clients hide the
reply codes (which ``NBD_REP_ERR_*`` arrived, its message, whether the connection is
still usable afterwards).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from trionbd.protocol import wire
from trionbd.protocol.client import ClientConnection
from trionbd.protocol.constants import Cmd, Info, Opt, Rep
from trionbd.protocol.events import NEED_DATA, ExportNameReply, OptionReply, SimpleReply

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


class RawClient:
    """One connection: greeting and client flags are exchanged on construction."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.proto = ClientConnection()
        self._event()  # greeting
        self.sock.sendall(self.proto.client_flags())

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _event(self) -> object:
        while True:
            event = self.proto.next_event()
            if event is not NEED_DATA:
                return event
            self.proto.receive_data(self.sock.recv(1 << 16))

    def option(self, option: int, payload: bytes = b"") -> list[OptionReply]:
        """Send one option; return every reply up to and including the final one."""
        self.sock.sendall(self.proto.option(option, payload))
        replies: list[OptionReply] = []
        while True:
            event = self._event()
            assert isinstance(event, OptionReply), event
            replies.append(event)
            if event.reply == Rep.ACK or event.reply & (1 << 31):
                return replies

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
        if final.reply & (1 << 31):
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
        self.sock.sendall(self.proto.option(Opt.EXPORT_NAME, name.encode()))
        try:
            event = self._event()
        except Exception:
            return None
        return event if isinstance(event, ExportNameReply) else None

    def read(self, offset: int, length: int, cookie: int = 1) -> bytes:
        """A READ after GO (simple replies); raises on an error reply."""
        self.sock.sendall(self.proto.request(cookie, Cmd.READ, 0, offset, length))
        event = self._event()
        assert isinstance(event, SimpleReply), event
        assert event.error == 0, f"read failed with NBD error {event.error}"
        return event.data
