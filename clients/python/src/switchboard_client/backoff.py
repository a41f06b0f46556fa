"""Reconnect pacing: full-jitter exponential backoff plus the server's retry advice.

The same rule as the JavaScript client: attempt *n* (from 0) waits a uniformly random
time in ``[0, min(cap, base·2ⁿ)]``; when the server advised a delay (``retry=MS`` in a
close reason, such as ``server draining; retry=1500``, or a ``Retry-After`` header on a
refused handshake), the next attempt waits at least that long, plus the jitter.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["Backoff", "parse_retry_hint", "parse_retry_after"]

_RETRY = re.compile(r"(?:^|[^a-z0-9_])retry=(\d+)", re.IGNORECASE)


def parse_retry_hint(reason: str | None) -> float | None:
    """Seconds advised by ``retry=<ms>`` in a close reason, or ``None``."""
    if not reason:
        return None
    m = _RETRY.search(reason)
    return int(m.group(1)) / 1000.0 if m else None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds of an HTTP ``Retry-After: SECONDS`` header, or ``None``."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class Backoff:
    """Delays between reconnect attempts."""

    def __init__(self, base: float, cap: float, random: Callable[[], float]) -> None:
        #: Delay ceiling of the first attempt, seconds.
        self.base = base
        #: Largest ceiling, seconds.
        self.cap = cap
        #: Source of the jitter in [0, 1).
        self.random = random
        #: Consecutive failed attempts since the last connection that opened.
        self.attempt = 0
        #: Seconds the server advised for the next attempt, if it did.
        self.hint: float | None = None

    def next_delay(self) -> float:
        """The delay before the next attempt; counts the attempt and consumes the hint."""
        ceiling = min(self.cap, self.base * (2.0 ** min(self.attempt, 30)))
        jitter = self.random() * ceiling
        self.attempt += 1
        hint, self.hint = self.hint, None
        return hint + jitter if hint is not None else jitter

    def reset(self) -> None:
        """A connection opened: start counting again."""
        self.attempt = 0
        self.hint = None
