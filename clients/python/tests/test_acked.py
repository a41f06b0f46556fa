"""Acknowledged delivery: acks follow what the application took; nothing lost or twice."""

from __future__ import annotations

import asyncio

from switchboard_client import Client, Message

from helpers import take, until
from sbserver import Server


def orders(channel: str) -> str:
    return "orders:" + channel.split(":", 1)[1]


async def redeliveries(server: Server) -> int:
    count: int = (await asyncio.to_thread(server.metrics))["redeliveries"]
    return count


async def resends_stop(server: Server) -> None:
    """The server's resends stop: none during a second (> 3 ack timeouts), within 15 s."""
    async with asyncio.timeout(15):
        while True:
            before = await redeliveries(server)
            await asyncio.sleep(1.0)
            if await redeliveries(server) == before:
                return


async def test_a_publication_is_acknowledged_once_the_application_took_it(server: Server, channel: str) -> None:
    ch = orders(channel)
    async with Client(server.url) as consumer, Client(server.url) as publisher:
        sub = await consumer.subscribe(ch)
        assert sub.acked is True
        for i in range(1, 6):
            await publisher.publish(ch, i)
        await until(lambda: sub.buffered == 5, what="5 buffered")
        # Not taken: the server resends them after ack_timeout (300 ms); the client
        # drops the repeats, so the application still has each once.
        before = await redeliveries(server)
        async with asyncio.timeout(10):
            while await redeliveries(server) < before + 5:
                await asyncio.sleep(0.05)
        assert sub.buffered == 5
        got = await take(sub, 5)
        assert [m.data for m in got] == [1, 2, 3, 4, 5]
        # Taken: acknowledged, so the resends stop.
        await resends_stop(server)
        assert sub.buffered == 0


async def test_a_handler_acknowledges_after_it_returns(server: Server, channel: str) -> None:
    ch = orders(channel)
    seen: list[int] = []
    before = await redeliveries(server)

    async def handler(msg: Message) -> None:
        # Busy until the server has resent it: it was not acknowledged meanwhile.
        async with asyncio.timeout(10):
            while await redeliveries(server) == before:
                await asyncio.sleep(0.05)
        seen.append(msg.data)

    async with Client(server.url) as consumer, Client(server.url) as publisher:
        await consumer.subscribe(ch, handler=handler)
        await publisher.publish(ch, 1)
        await until(lambda: seen == [1], 15, "the handler done")
        await resends_stop(server)
        assert seen == [1], "the resend was not handed over twice"


async def test_acked_delivery_survives_a_forced_disconnect_mid_stream(server: Server, channel: str) -> None:
    ch = orders(channel)
    total = 300
    async with Client(server.url, reconnect_base_delay=0.05) as consumer, Client(server.url) as publisher:
        sub = await consumer.subscribe(ch)

        async def publish_all() -> None:
            for i in range(1, total + 1):
                await publisher.publish(ch, i)
                if i == 120:
                    await consumer.reconnect()
                if i % 25 == 0:
                    await asyncio.sleep(0.005)

        publishing = asyncio.create_task(publish_all())
        got: list[int] = []
        async with asyncio.timeout(30):
            async for msg in sub:
                got.append(msg.data)
                if len(got) % 50 == 0:
                    await asyncio.sleep(0.1)  # a slow consumer now and then
                if len(got) == total:
                    break
        await publishing
        assert got == list(range(1, total + 1))
