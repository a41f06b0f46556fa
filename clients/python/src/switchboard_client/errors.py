"""Exceptions of the client: every failure the application sees carries a code.

A request the server refused raises :class:`SwitchboardError` with the wire code of
the server's ``error`` frame (``unknown_target``, ``bad_channel``, …; see
docs/protocol.md). The client's own failures use the codes listed on the class. A
subscription that could not recover what it missed raises :class:`RecoveryFailed`
from its iterator, at the place of the gap.
"""

from __future__ import annotations

from typing import Any

from .models import Frame, Position

__all__ = ["SwitchboardError", "RecoveryFailed"]


class SwitchboardError(Exception):
    """A request failed, or the client stopped.

    ``code`` is a protocol code from the server's ``error`` frame, or one of the
    client's own: ``timeout`` (no reply within ``request_timeout`` of being
    written), ``disconnected`` (the connection dropped while the request was in
    flight: it may or may not have been carried out, and is not resent),
    ``closed`` (the client was closed, or stopped reconnecting), ``queue_full``
    (made while disconnected with ``queue_while_disconnected`` requests already
    waiting), ``already_subscribed`` (this client already holds a subscription
    of the channel), ``unauthorized`` / ``token_expired`` (the server closed the
    connection with 4001 / 4003: the client stops, a new token is needed),
    ``recovery_failed`` (see :class:`RecoveryFailed`).
    """

    def __init__(self, code: str, message: str = "", frame: Frame | None = None) -> None:
        super().__init__(message or code)
        #: The wire code (or one of the client's codes above).
        self.code = code
        #: The human-readable message (the server's, when it sent one).
        self.message = message or code
        #: The server's ``error`` frame, when there was one.
        self.frame = frame
        #: The ``ref`` of the server's ``error`` frame (the request's ``id``).
        self.ref: Any = frame.get("ref") if frame is not None else None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class RecoveryFailed(SwitchboardError):
    """A resubscribe could not recover every missed publication (``recovered:false``).

    The history no longer held them (trimmed, disabled, or the stream was lost,
    e.g. an in-memory server restarted and the channel has a new epoch). Nothing
    partial was delivered: publications between ``previous`` and ``position``
    are missing. The subscription goes on live from ``position``; iterate it
    again to get them, and call ``client.history(channel)`` for what is still
    retained.
    """

    def __init__(self, channel: str, previous: Position, position: Position, frame: Frame) -> None:
        super().__init__(
            "recovery_failed",
            f"{channel}: publications after {previous.epoch}/{previous.offset} could not be "
            f"recovered; going on live from {position.epoch}/{position.offset}",
            frame,
        )
        #: The channel of the subscription.
        self.channel = channel
        #: The last position the subscription had delivered before the gap.
        self.previous = previous
        #: The stream's top when the subscription resumed (live delivery goes on after it).
        self.position = position
