"""The values the client hands to the application: messages, history, presence.

Each is a frozen dataclass built from one server frame (see docs/protocol.md); the
raw frame stays available as ``frame`` where the protocol may add fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Frame",
    "Position",
    "Message",
    "Publication",
    "History",
    "Member",
    "Presence",
    "StateChange",
    "State",
]

#: One parsed JSON frame of the protocol.
Frame = dict[str, Any]

#: The client's connection state.
State = Literal["connecting", "open", "reconnecting", "closed"]


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Position:
    """A place in a channel's stream: what ``since`` resumes from."""

    #: The incarnation of the channel's stream.
    epoch: str
    #: The offset of a publication in it (0: before the first).
    offset: int

    def to_wire(self) -> Frame:
        return {"epoch": self.epoch, "offset": self.offset}


@dataclass(frozen=True)
class Message:
    """One channel publication (a ``message`` frame)."""

    channel: str
    #: Whatever JSON value the publisher sent (``None`` when it sent none).
    data: Any
    #: Its offset in the channel's stream (grows by one per publication).
    offset: int | None
    #: The stream's epoch the offset belongs to.
    epoch: str | None
    #: The publishing client's id, ``None`` for the server HTTP API.
    sender_id: str | None
    #: Milliseconds since the Unix epoch.
    timestamp: int | None
    #: The whole frame as received.
    frame: Frame = field(repr=False, compare=False)

    @classmethod
    def from_frame(cls, frame: Frame) -> Message:
        return cls(
            channel=str(frame.get("channel", "")),
            data=frame.get("data"),
            offset=_int_or_none(frame.get("offset")),
            epoch=_str_or_none(frame.get("epoch")),
            sender_id=_str_or_none(frame.get("senderId")),
            timestamp=_int_or_none(frame.get("timestamp")),
            frame=frame,
        )

    @property
    def position(self) -> Position | None:
        """Where this publication sits, for a later ``subscribe(since=…)``."""
        if self.epoch is None or self.offset is None:
            return None
        return Position(self.epoch, self.offset)


@dataclass(frozen=True)
class Publication:
    """One retained publication in a ``history`` reply."""

    offset: int
    data: Any
    sender_id: str | None
    timestamp: int | None


@dataclass(frozen=True)
class History:
    """A ``history`` reply: retained publications, oldest first, and the stream's top."""

    channel: str
    publications: list[Publication]
    #: The stream's current epoch; a ``since`` of another epoch got no publications.
    epoch: str
    #: The stream's current top offset.
    offset: int

    @classmethod
    def from_frame(cls, frame: Frame) -> History:
        pubs = [
            Publication(
                offset=int(p.get("offset", 0)),
                data=p.get("data"),
                sender_id=_str_or_none(p.get("senderId")),
                timestamp=_int_or_none(p.get("timestamp")),
            )
            for p in frame.get("publications") or []
            if isinstance(p, dict)
        ]
        return cls(
            channel=str(frame.get("channel", "")),
            publications=pubs,
            epoch=str(frame.get("epoch", "")),
            offset=int(frame.get("offset", 0)),
        )


@dataclass(frozen=True)
class Member:
    """One connection present in a channel."""

    client_id: str
    #: The ``sub`` of its token, ``None`` when anonymous.
    user_id: str | None


@dataclass(frozen=True)
class Presence:
    """A ``presence`` reply."""

    channel: str
    members: list[Member]
    count: int

    @classmethod
    def from_frame(cls, frame: Frame) -> Presence:
        members = [
            Member(client_id=str(m.get("clientId", "")), user_id=_str_or_none(m.get("userId")))
            for m in frame.get("members") or []
            if isinstance(m, dict)
        ]
        return cls(
            channel=str(frame.get("channel", "")),
            members=members,
            count=int(frame.get("count", len(members))),
        )


@dataclass(frozen=True)
class StateChange:
    """The argument of ``state`` event handlers."""

    state: State
    #: Consecutive failed attempts so far (reset once a connection opens).
    attempt: int = 0
    #: Seconds until the next attempt (``reconnecting`` only).
    delay: float | None = None
    #: Close code of the connection that ended, when there was one.
    code: int | None = None
    #: Close reason of the connection that ended.
    reason: str | None = None
