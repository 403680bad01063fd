"""STARTTLS in process, option by option: the modes (off, on, require), what TLS resets,
``is_tls`` reaching ``open``/``list_exports``, and handshake failures (one client lost,
the server serving on). Certificates come from trustme; the client side is
``trio.SSLStream`` over an in-memory stream."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from tests.server.nbdclient import Client
from trionbd.chain import Chain, Export, NBDError, Plugin
from trionbd.protocol import Opt, Rep, wire
from trionbd.server import Server, ServerConfig, serve
from trionbd.server.tls import TLSMode

CA = trustme.CA()
SERVER_CERT = CA.issue_cert("localhost")


def server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    SERVER_CERT.configure_cert(context)
    return context


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    CA.configure_trust(context)
    return context


class Secrets(Plugin):
    """Lists and opens "secret" only for TLS clients: what a plugin sees of ``is_tls``."""

    name = "secrets"

    async def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        return [Export("public"), *([Export("secret")] if is_tls else [])]

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> str:
        if export_name == "secret" and not is_tls:
            raise NBDError(13, "secret is for TLS clients only")  # EACCES
        return export_name

    async def get_size(self, h: Any) -> int:
        return 4096

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        return h.encode().ljust(count, b"\0")[:count]  # type: ignore[no-any-return]


@asynccontextmanager
async def connected(mode: TLSMode) -> AsyncIterator[tuple[Server, Client]]:
    config = ServerConfig(tls=mode, tls_context=None if mode is TLSMode.OFF else server_context())
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, Chain(Secrets()), [], config)
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, server_end)
        client = Client(client_end)
        await client.handshake()
        yield server, client
        nursery.cancel_scope.cancel()


async def start_tls(client: Client) -> None:
    [ack] = await client.option(Opt.STARTTLS)
    assert ack.reply == Rep.ACK
    stream = trio.SSLStream(client.stream, client_context(), server_hostname="localhost")
    await stream.do_handshake()
    client.stream = stream


async def go(client: Client, name: str) -> int:
    """GO after the handshake (``Client.go`` does the handshake itself); the flags."""
    replies = await client.option(Opt.GO, wire.name_and_infos(name, []))
    assert replies[-1].reply == Rep.ACK, replies
    return int.from_bytes(replies[0].payload[10:12], "big")


async def listed(client: Client) -> list[str]:
    replies = await client.option(Opt.LIST)
    assert replies[-1].reply == Rep.ACK
    return [r.payload[4:].decode() for r in replies[:-1]]


async def test_require_refuses_every_option_but_starttls_and_abort_until_tls() -> None:
    async with connected(TLSMode.REQUIRE) as (_, client):
        for option, payload in [
            (Opt.LIST, b""),
            (Opt.STRUCTURED_REPLY, b""),
            (Opt.INFO, wire.name_and_infos("public", [])),
            (Opt.GO, wire.name_and_infos("public", [])),
            (Opt.LIST_META_CONTEXT, wire.name_and_queries("public", [])),
            (4242, b"payload of an unknown option"),
        ]:
            [err] = await client.option(option, payload)
            assert (err.reply, err.payload) == (
                Rep.ERR_TLS_REQD,
                b"TLS is required: send STARTTLS first",
            ), option
        await start_tls(client)
        assert await listed(client) == ["public", "secret"]
        assert [r.reply for r in await client.option(Opt.STRUCTURED_REPLY)] == [Rep.ACK]
        await go(client, "secret")
        assert await client.read(0, 6) == b"secret"


async def test_require_closes_on_export_name_before_tls() -> None:
    async with connected(TLSMode.REQUIRE) as (_, client):
        await client.stream.send_all(client.proto.option(Opt.EXPORT_NAME, b"public"))
        assert await client.eof()


async def test_abort_before_tls_is_acked_under_require() -> None:
    async with connected(TLSMode.REQUIRE) as (_, client):
        [ack] = await client.option(Opt.ABORT)
        assert ack.reply == Rep.ACK


async def test_on_lets_plain_clients_in_and_is_tls_reaches_the_plugin() -> None:
    async with connected(TLSMode.ON) as (_, client):
        assert await listed(client) == ["public"]
        [err] = await client.option(Opt.GO, wire.name_and_infos("secret", []))
        assert err.reply == Rep.ERR_POLICY
        await start_tls(client)
        assert await listed(client) == ["public", "secret"]


async def test_starttls_forgets_what_was_negotiated_before() -> None:
    async with connected(TLSMode.ON) as (_, client):
        assert [r.reply for r in await client.option(Opt.STRUCTURED_REPLY)] == [Rep.ACK]
        await start_tls(client)
        # Structured replies were negotiated in plaintext: gone after STARTTLS, so GO
        # enters transmission with simple replies (SEND_DF is not advertised).
        flags = await go(client, "public")
        assert not flags & (1 << 7)  # NBD_FLAG_SEND_DF
        assert await client.read(0, 6) == b"public"


async def test_starttls_twice_or_with_a_payload_is_invalid() -> None:
    async with connected(TLSMode.ON) as (_, client):
        [err] = await client.option(Opt.STARTTLS, b"x")
        assert err.reply == Rep.ERR_INVALID
        await start_tls(client)
        [err] = await client.option(Opt.STARTTLS)
        assert (err.reply, err.payload) == (Rep.ERR_INVALID, b"TLS is already active")


async def test_off_refuses_starttls_with_err_policy() -> None:
    async with connected(TLSMode.OFF) as (_, client):
        [err] = await client.option(Opt.STARTTLS)
        assert (err.reply, err.payload) == (Rep.ERR_POLICY, b"TLS is off on this server")
        assert await listed(client) == ["public"]


@pytest.mark.parametrize("garbage", [b"", b"this is not a TLS ClientHello" * 10])
async def test_a_failed_handshake_closes_that_client_only(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServerConfig(tls=TLSMode.REQUIRE, tls_context=server_context())
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, Chain(Secrets()), [], config)
        bad_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, server_end)
        bad = Client(bad_end)
        await bad.handshake()
        [ack] = await bad.option(Opt.STARTTLS)
        assert ack.reply == Rep.ACK
        if garbage:
            await bad.stream.send_all(garbage)
        else:
            await bad.stream.send_eof()  # type: ignore[attr-defined]
        with trio.fail_after(5):
            while await bad.stream.receive_some(65536):
                pass  # whatever the server says (a TLS alert), then EOF
        # Another client still gets through.
        good_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, server_end)
        good = Client(good_end)
        await good.handshake()
        await start_tls(good)
        await go(good, "secret")
        nursery.cancel_scope.cancel()
    assert "TLS handshake failed" in caplog.text
