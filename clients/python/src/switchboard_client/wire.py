"""Frames on the wire: parsing, the token in the URL, and requests awaiting replies.

Where it sits: helpers of client.py for what the protocol (docs/protocol.md) fixes: which
reply settles which request, which close codes end a session for good, how a request in
flight is remembered until the frame with its ``ref`` arrives.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .models import Frame, Position

if TYPE_CHECKING:
    from .subscription import Subscription

__all__ = ["REPLIES", "AUTH_CLOSES", "Pending", "with_token", "parse_frame"]

#: The reply types that settle each kind of request (besides ``error``).
REPLIES: dict[str, tuple[str, ...]] = {
    "broadcast": ("ack",),
    "direct": ("ack",),
    "publish": ("ack",),
    "subscribe": ("subscribed",),
    "unsubscribe": ("unsubscribed",),
    "presence": ("presence",),
    "history": ("history",),
    "ping": ("pong",),
}

#: Close codes after which reconnecting with the same token is pointless → error code.
AUTH_CLOSES = {4001: "unauthorized", 4003: "token_expired"}


@dataclass
class Pending:
    """A request written and waiting for its reply."""

    type: str
    #: The reply types that settle it (besides ``error``).
    accepts: tuple[str, ...]
    #: Settled with the reply (ordinary requests).
    future: asyncio.Future[Frame] | None = None
    #: The subscription a (re)subscribe is for; its reply is handled in the reader.
    sub: Subscription | None = None
    #: The ``since`` the (re)subscribe asked to resume from.
    since: Position | None = None
    #: A (re)subscribe's timeout.
    timer: asyncio.TimerHandle | None = None


def with_token(url: str, token: str | None) -> str:
    """``url`` with ``?token=`` set (replacing one already there)."""
    if token is None:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    query.append(("token", token))
    return urlunsplit(parts._replace(query=urlencode(query)))


def parse_frame(raw: str | bytes) -> Frame | None:
    """A server frame, or None for anything that is not a JSON object with a string ``type``."""
    if not isinstance(raw, str):
        return None  # binary frames are not part of the protocol
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        return None
    return msg
