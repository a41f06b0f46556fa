"""The API calls against a real server: welcome, channels, tutorial messages, errors."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from switchboard_client import Client, Message, Position, StateChange, SwitchboardError, parse_retry_hint
from switchboard_client.backoff import Backoff, parse_retry_after

from helpers import take, until
from sbserver import Server


async def test_the_context_manager_waits_for_the_welcome(server: Server) -> None:
    states: list[str] = []
    client = Client(server.url)
    client.on("state", lambda change: states.append(change.state))
    welcomes: list[dict[str, Any]] = []
    client.on("connected", welcomes.append)
    async with client as c:
        assert c.state == "open"
        assert c.client_id is not None and c.client_id.startswith("client-")
        assert c.instance_id
        assert c.welcome is not None and c.welcome["type"] == "connected"
        await c.ping()
    final_state: str = c.state  # (mypy narrowed c.state to "open" above)
    assert final_state == "closed"
    assert c.client_id is None
    await until(lambda: states[-1:] == ["closed"], what="the closed event")
    assert [w["clientId"] for w in welcomes] == [c.welcome["clientId"]]
    assert states[:2] == ["connecting", "open"]
    with pytest.raises(SwitchboardError) as err:
        await c.publish("chat:x", 1)
    assert err.value.code == "closed"


async def test_subscribe_publish_and_iterate(server: Server, channel: str) -> None:
    async with Client(server.url) as a, Client(server.url) as b:
        sub = await a.subscribe(channel)
        assert sub.state == "subscribed" and sub.acked is False
        assert sub.offset == 0 and sub.epoch
        assert await b.publish(channel, {"text": "hi"}) == 1
        assert await b.publish(channel, "two") == 2
        first, second = await take(sub, 2)
        assert isinstance(first, Message)
        assert first.channel == channel
        assert first.data == {"text": "hi"}
        assert (first.offset, second.offset) == (1, 2)
        assert first.epoch == sub.epoch
        assert first.sender_id == b.client_id
        assert isinstance(first.timestamp, int)
        assert second.data == "two"
        assert sub.position == Position(sub.epoch, 2)


async def test_a_handler_subscription_gets_each_message_in_order(server: Server, channel: str) -> None:
    got: list[Any] = []

    async def handler(msg: Message) -> None:
        await asyncio.sleep(0)
        got.append(msg.data)

    async with Client(server.url) as a:
        await a.subscribe(channel, handler=handler)
        for i in range(20):
            await a.publish(channel, i)  # channel_echo: the publisher gets its own
        await until(lambda: len(got) == 20, what="20 messages")
        assert got == list(range(20))


async def test_broadcast_and_direct_reach_on_handlers(server: Server) -> None:
    broadcasts: list[dict[str, Any]] = []
    directs: list[dict[str, Any]] = []

    async def on_direct(frame: dict[str, Any]) -> None:
        directs.append(frame)

    async with Client(server.url) as a, Client(server.url) as b:
        b.on("broadcast", broadcasts.append)
        b.on("direct", on_direct)
        a_broadcasts: list[dict[str, Any]] = []
        a.on("broadcast", a_broadcasts.append)
        await a.broadcast({"text": "hi all"})
        assert b.client_id is not None
        await a.direct(b.client_id, "psst")
        await until(lambda: len(directs) == 1 and any(f["data"] == {"text": "hi all"} for f in broadcasts))
        assert directs[0]["senderId"] == a.client_id
        assert directs[0]["data"] == "psst"
        mine = [f for f in broadcasts if f["data"] == {"text": "hi all"}]
        assert mine[0]["senderId"] == a.client_id
        await b.ping()  # anything for a would have arrived by now
        assert not [f for f in a_broadcasts if f["senderId"] == a.client_id], "the sender gets no copy"


async def test_history_and_presence(server: Server, channel: str) -> None:
    async with Client(server.url) as a, Client(server.url) as b:
        sub = await a.subscribe(channel)
        await b.subscribe(channel)
        for i in range(1, 6):
            await a.publish(channel, i)
        assert sub.epoch is not None
        hist = await b.history(channel, limit=3)
        assert len(hist.publications) == 3
        offsets = [p.offset for p in hist.publications]
        assert offsets == sorted(offsets) and set(offsets) <= {1, 2, 3, 4, 5}
        assert (hist.epoch, hist.offset) == (sub.epoch, 5)
        since = await b.history(channel, since=Position(sub.epoch, 2))
        assert [(p.offset, p.data) for p in since.publications] == [(3, 3), (4, 4), (5, 5)]
        assert since.publications[0].sender_id == a.client_id
        presence = await a.presence(channel)
        assert presence.count == 2
        assert {m.client_id for m in presence.members} == {a.client_id, b.client_id}
        assert all(m.user_id is None for m in presence.members)


async def test_errors_are_exceptions_with_the_wire_code(server: Server, channel: str) -> None:
    async with Client(server.url) as a:
        errors: list[dict[str, Any]] = []
        a.on("error", errors.append)
        with pytest.raises(SwitchboardError) as err:
            await a.direct("client-0-nobody", "hello?")
        assert err.value.code == "unknown_target"
        assert err.value.frame is not None and err.value.frame["type"] == "error"
        assert isinstance(err.value.ref, int)

        with pytest.raises(SwitchboardError) as err:
            await a.subscribe("bad channel!")
        assert err.value.code == "bad_channel"
        assert "bad channel!" not in a.subscriptions

        with pytest.raises(SwitchboardError) as err:
            await a.history("quiet:" + channel)
        assert err.value.code == "history_disabled"
        with pytest.raises(SwitchboardError) as err:
            await a.presence("quiet:" + channel)
        assert err.value.code == "presence_disabled"
        with pytest.raises(SwitchboardError) as err:
            await a.publish("readonly:" + channel, 1)
        assert err.value.code == "publish_not_allowed"

        await a.subscribe(channel)
        with pytest.raises(SwitchboardError) as err:
            await a.subscribe(channel)
        assert err.value.code == "already_subscribed"

        # A raw frame of an unknown type: the server's error reaches on("error").
        await a.send({"type": "no-such-type"})
        await until(lambda: any(e.get("code") == "unknown_type" for e in errors), what="unknown_type")
        await a.ping()  # the connection carries on
        assert a.state == "open"


async def test_unsubscribe_ends_the_iteration(server: Server, channel: str) -> None:
    async with Client(server.url) as a:
        sub = await a.subscribe(channel)
        await a.publish(channel, "last")

        async def drain() -> list[Any]:
            return [m.data async for m in sub]

        reader = asyncio.create_task(drain())
        await until(lambda: sub.buffered == 0 and sub.offset == 1, what="the message taken")
        await sub.unsubscribe()
        assert await asyncio.wait_for(reader, 5) == ["last"]
        assert channel not in a.subscriptions
        presence = await a.presence(channel)
        assert presence.count == 0


async def test_requests_wait_for_the_connection_and_respect_the_queue_bound(server: Server) -> None:
    client = Client(server.url, queue_while_disconnected=1, reconnect_base_delay=1.0, random=lambda: 0.99)
    with pytest.raises(SwitchboardError) as err:
        await client.ping()
    assert err.value.code == "closed"  # never connected
    async with client:
        old_id = client.client_id
        await client.reconnect()
        await until(lambda: client.state == "reconnecting", what="reconnecting")
        first = asyncio.create_task(client.ping())  # waits for the next connection
        await asyncio.sleep(0)
        with pytest.raises(SwitchboardError) as err:
            await client.ping()
        assert err.value.code == "queue_full"
        await asyncio.wait_for(first, 10)
        assert client.state == "open"
        assert client.client_id != old_id


def test_a_url_that_is_not_a_websocket_url_is_refused_at_once() -> None:
    with pytest.raises(ValueError):
        Client("http://localhost:8080/")


def test_retry_advice_and_full_jitter_backoff() -> None:
    assert parse_retry_hint("server draining; retry=1500") == 1.5
    assert parse_retry_hint("resubscribe: bus gap") is None
    assert parse_retry_hint("noretry=5") is None
    assert parse_retry_hint(None) is None
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("soon") is None

    backoff = Backoff(0.5, 4.0, lambda: 0.999)
    delays = [backoff.next_delay() for _ in range(6)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert delays[3] > 3.9  # the cap, reached
    backoff.hint = 1.5
    assert 1.5 <= backoff.next_delay() <= 5.5  # the hint, plus jitter
    assert backoff.hint is None  # consumed
    backoff.reset()
    rng = random.Random(7)
    jittered = Backoff(0.5, 30.0, rng.random)
    assert len({jittered.next_delay() for _ in range(5)}) == 5  # full jitter: spread out
    assert StateChange("open").state == "open"
