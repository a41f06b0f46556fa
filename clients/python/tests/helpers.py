"""Test helpers: bounded waits on subscriptions and conditions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from switchboard_client import Client, Message, Subscription


async def take(sub: Subscription, n: int, timeout: float = 10.0) -> list[Message]:
    """The next ``n`` messages of ``sub``, within ``timeout`` seconds."""
    got: list[Message] = []
    async with asyncio.timeout(timeout):
        async for msg in sub:
            got.append(msg)
            if len(got) == n:
                break
    return got


async def until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``check()`` holds, within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def fast_client(url: str) -> Client:
    """A client that reconnects within a fraction of a second (tests only)."""
    return Client(url, reconnect_base_delay=0.05, reconnect_max_delay=0.3)
