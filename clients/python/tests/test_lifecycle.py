"""Drain advice and authentication: what makes the client wait, and what makes it stop."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import tempfile
import time
from collections.abc import Iterator

import pytest

from switchboard_client import Client, StateChange, SwitchboardError, parse_retry_hint

from helpers import until
from sbserver import Server

SECRET = "python-client-test-secret-0123456789"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(claims: dict[str, object]) -> str:
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


@pytest.fixture
def auth_server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="sb-py-auth-") as tmp:
        secret = os.path.join(tmp, "secret")
        with open(secret, "w") as f:
            f.write(SECRET)
        server = Server(["--auth-hs256-secret-file", secret, "--auth-required", "true"])
        try:
            yield server
        finally:
            server.close()


async def test_a_drain_close_is_honoured_retry_advice_then_a_reconnect() -> None:
    server = Server(["--drain-timeout", "3s", "--drain-spread", "0s"])
    try:
        states: list[StateChange] = []
        async with Client(server.url, reconnect_base_delay=0.05, reconnect_max_delay=0.1) as client:
            client.on("state", states.append)
            stopping = asyncio.create_task(asyncio.to_thread(server.stop))
            await until(lambda: any(s.state == "reconnecting" for s in states), 10, "the drain close")
            first = next(s for s in states if s.state == "reconnecting")
            assert first.code == 1012
            hint = parse_retry_hint(first.reason)
            assert hint is not None, first.reason
            assert first.delay is not None and first.delay >= hint
            await stopping
            await asyncio.to_thread(server.start)
            await until(lambda: client.state == "open", 20, "back after the restart")
            await client.ping()
    finally:
        server.close()


async def test_a_token_in_the_url_authenticates(auth_server: Server, channel: str) -> None:
    token = hs256({"sub": "user-42", "exp": int(time.time()) + 600})
    async with Client(auth_server.url, token=token) as client:
        await client.subscribe(channel)
        presence = await client.presence(channel)
        assert [(m.client_id, m.user_id) for m in presence.members] == [(client.client_id, "user-42")]


async def test_a_refused_token_stops_the_client_with_its_code(auth_server: Server) -> None:
    expired = hs256({"sub": "user-42", "exp": int(time.time()) - 60})
    for token, codes in (("not-a-jwt", {"unauthorized"}), (expired, {"token_expired"})):
        with pytest.raises(SwitchboardError) as err:
            async with asyncio.timeout(10):
                async with Client(auth_server.url, token=token):
                    pass
        assert err.value.code in codes, err.value


async def test_a_frozen_server_is_detected_by_keepalive_and_the_client_comes_back() -> None:
    server = Server([])
    try:
        states: list[StateChange] = []
        client = Client(server.url, ping_interval=0.2, ping_timeout=0.3, reconnect_base_delay=0.05)
        async with client:
            client.on("state", states.append)
            server.pause()  # nothing answers, nothing closes
            with pytest.raises(SwitchboardError) as err:
                await client.ping()
            assert err.value.code in ("disconnected", "timeout")
            await until(lambda: client.state != "open", 10, "the dead connection noticed")
            server.resume()
            await until(lambda: client.state == "open", 20, "back")
            await client.ping()
            assert any(s.state == "reconnecting" for s in states)
    finally:
        server.close()


async def test_a_refused_handshake_s_retry_after_is_honoured() -> None:
    # One handshake per 2 s from this address, no burst beyond it.
    server = Server(["--handshake-rate-per-ip", "0.5", "--handshake-burst-per-ip", "1"])
    try:
        async with Client(server.url) as first:
            states: list[StateChange] = []
            second = Client(server.url, reconnect_base_delay=0.01, reconnect_max_delay=0.02)
            second.on("state", states.append)
            async with asyncio.timeout(20):
                await second.connect()  # refused with 429 + Retry-After first, then admitted
            try:
                refused = [s for s in states if s.state == "reconnecting"]
                assert refused, "the second handshake was refused"
                assert refused[0].reason == "HTTP 429"
                # The advice (whole seconds, at least 1) plus the jitter, not the 10 ms backoff.
                assert refused[0].delay is not None and refused[0].delay >= 1.0
                await second.ping()
                await first.ping()
            finally:
                await second.close()
    finally:
        server.close()
