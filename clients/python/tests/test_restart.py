"""A server killed with SIGKILL and restarted on the same port.

Memory bus: the history died with the process, so ``recovered:false`` is the honest
answer. Redis bus (a private redis-server): the history survives, and every message
published while the consumer's instance was down is received once, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from switchboard_client import Client, RecoveryFailed, StateChange

from helpers import fast_client, take, until
from sbserver import PrivateRedis, Server


@pytest.fixture
def redis() -> Iterator[PrivateRedis]:
    r = PrivateRedis()
    try:
        yield r
    finally:
        r.kill()


async def test_memory_bus_kill_and_restart_reports_recovered_false(channel: str) -> None:
    server = Server([])
    try:
        states: list[StateChange] = []
        async with fast_client(server.url) as consumer, fast_client(server.url) as publisher:
            consumer.on("state", states.append)
            sub = await consumer.subscribe(channel)
            await publisher.publish(channel, "before")
            (before,) = await take(sub, 1)
            old_epoch, old_id = before.epoch, consumer.client_id
            assert old_epoch is not None

            server.kill()
            await until(lambda: consumer.state == "reconnecting", what="reconnecting")
            queued = asyncio.create_task(publisher.publish(channel, "queued while down"))
            await asyncio.to_thread(server.start)
            await until(lambda: consumer.state == "open", 20, "reconnected")
            assert consumer.client_id != old_id

            with pytest.raises(RecoveryFailed) as gap:
                await take(sub, 1, timeout=20)
            assert gap.value.previous.epoch == old_epoch
            assert gap.value.previous.offset == 1
            assert gap.value.position.epoch != old_epoch
            # The request made while the server was down was sent on the new connection.
            assert await asyncio.wait_for(queued, 20) >= 1
            await publisher.publish(channel, "after")
            # "queued while down" arrives too if it was published after the resubscribe.
            async with asyncio.timeout(10):
                live: list[str] = []
                async for msg in sub:
                    live.append(msg.data)
                    if msg.data == "after":
                        break
            assert live in (["after"], ["queued while down", "after"])
            assert any(s.state == "reconnecting" and s.delay is not None for s in states)
    finally:
        server.close()


async def test_redis_bus_kill_and_restart_recovers_every_missed_message_once_in_order(
    redis: PrivateRedis, channel: str
) -> None:
    args = ["--bus", redis.url, "--bus-prefix", f"sbpy{time.time_ns()}"]
    a, b = Server(args), Server(args)
    try:
        async with fast_client(a.url) as consumer, Client(b.url) as publisher:
            sub = await consumer.subscribe(channel)
            for i in range(1, 6):
                await publisher.publish(channel, i)
            got = [m.data for m in await take(sub, 5)]

            a.kill()  # the consumer's instance crashes
            await until(lambda: consumer.state == "reconnecting", what="reconnecting")
            for i in range(6, 31):  # published while it is down, through the other instance
                await publisher.publish(channel, i)
            await asyncio.to_thread(a.start)
            await until(lambda: consumer.state == "open", 20, "reconnected")
            for i in range(31, 41):
                await publisher.publish(channel, i)

            got += [m.data for m in await take(sub, 35, timeout=20)]
            assert got == list(range(1, 41))
            assert sub.recovered is True
            assert sub.recovery_failures == 0
            assert sub.buffered == 0
    finally:
        a.close()
        b.close()
