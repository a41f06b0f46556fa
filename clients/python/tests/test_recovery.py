"""Reconnect and recovery: resume with since, recovered:false reported at the gap."""

from __future__ import annotations

import asyncio

import pytest

from switchboard_client import Client, Position, RecoveryFailed

from helpers import fast_client, take, until
from sbserver import Server


async def test_a_reconnect_resumes_with_since_every_message_once_in_order(server: Server, channel: str) -> None:
    total = 200
    async with fast_client(server.url) as consumer, Client(server.url) as publisher:
        sub = await consumer.subscribe(channel)
        first_id = consumer.client_id

        async def publish_all() -> None:
            for i in range(1, total + 1):
                await publisher.publish(channel, i)
                if i == 50:
                    await consumer.reconnect()  # mid-stream
                if i % 20 == 0:
                    await asyncio.sleep(0.01)

        publishing = asyncio.create_task(publish_all())
        got = await take(sub, total, timeout=30)
        await publishing
        assert [m.data for m in got] == list(range(1, total + 1))
        assert [m.offset for m in got] == list(range(1, total + 1))
        assert consumer.client_id != first_id, "a new connection"
        assert sub.recovered is True
        assert sub.recovery_failures == 0


async def test_recovered_false_on_an_epoch_change_is_raised_at_the_gap(server: Server, channel: str) -> None:
    gaps: list[RecoveryFailed] = []
    async with Client(server.url) as a:
        a.on("recovery-failed", gaps.append)
        await a.publish(channel, "old")
        # A position of another incarnation of the stream: history cannot fill it.
        stale = Position("not-this-epoch", 7)
        sub = await a.subscribe(channel, since=stale)
        with pytest.raises(RecoveryFailed) as gap:
            await take(sub, 1)
        assert gap.value.code == "recovery_failed"
        assert gap.value.channel == channel
        assert gap.value.previous == stale
        assert gap.value.position.epoch != "not-this-epoch"
        assert gap.value.position.offset == 1
        assert sub.recovered is False and sub.recovery_failures == 1
        assert gap.value.frame is not None and gap.value.frame["recovered"] is False
        # The subscription goes on live after the gap: iterate again.
        await a.publish(channel, "new")
        (msg,) = await take(sub, 1)
        assert (msg.data, msg.offset) == ("new", 2)
        await until(lambda: len(gaps) == 1, what="the recovery-failed event")
        assert gaps[0] is gap.value


async def test_a_subscribe_made_while_reconnecting_is_sent_on_the_next_connection(server: Server, channel: str) -> None:
    client = Client(server.url, reconnect_base_delay=0.5, random=lambda: 0.99)
    async with client, Client(server.url) as publisher:
        await client.reconnect()
        await until(lambda: client.state == "reconnecting", what="reconnecting")
        sub = await asyncio.wait_for(client.subscribe(channel), 10)
        assert sub.active
        await publisher.publish(channel, "hello")
        (msg,) = await take(sub, 1)
        assert msg.data == "hello"


async def test_a_full_buffer_holds_the_reader_back_and_loses_nothing(server: Server, channel: str) -> None:
    async with Client(server.url, max_buffered=2) as consumer, Client(server.url) as publisher:
        sub = await consumer.subscribe(channel)
        for i in range(1, 51):
            await publisher.publish(channel, i)
        await until(lambda: sub.buffered == 2, what="a full buffer")
        got = []
        async with asyncio.timeout(10):
            async for msg in sub:
                got.append(msg.data)
                assert sub.buffered <= 2
                if len(got) == 50:
                    break
        assert got == list(range(1, 51))
