"""A channel subscription: an async iterator of the channel's publications.

Made by ``Client.subscribe``; it lives until ``unsubscribe()`` or the client's close,
and the client resubscribes it after every reconnect with ``since`` = the position of
the last publication it received, so the server replays what was missed. Its state
changes only through the ``_…`` methods the client calls from its reader.

Delivery rules (the same as the JavaScript client's):

- every publication once, in offset order: a repeat (same epoch, offset not above the
  last received) is dropped before the application sees it;
- a resubscribe answered ``recovered:false`` is reported in the stream, at the place of
  the gap: the iterator raises :class:`RecoveryFailed` once, and iterating again goes
  on with the live publications;
- in an acknowledged namespace (``acked`` in the ``subscribed`` reply) a publication is
  acknowledged once the application has taken it: when the iterator yields it, or when
  the subscription's handler has returned. Acks are cumulative and sent at most every
  50 ms.

Publications wait in a buffer of ``max_buffered`` entries between the socket and the
application. When it is full the client stops reading the connection until the
application takes one, so a slow consumer is treated by the server as any slow client
(its namespace's ``slow_consumer`` policy), and recovery after the disconnect resumes
from the last buffered publication.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .errors import RecoveryFailed, SwitchboardError
from .models import Frame, Message, Position

if TYPE_CHECKING:
    from .client import Client

__all__ = ["Subscription", "MessageHandler"]

#: A subscription's handler: gets each Message, may be async.
MessageHandler = Callable[[Message], Awaitable[None] | None]

_Item = Message | RecoveryFailed


class _Inbox:
    """A bounded FIFO between the client's reader (put) and the iterator (get)."""

    def __init__(self, maxsize: int) -> None:
        self._items: deque[_Item] = deque()
        self._maxsize = max(1, maxsize)
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: _Item) -> None:
        while len(self._items) >= self._maxsize and not self._closed:
            self._writable.clear()
            await self._writable.wait()
        if self._closed:
            return
        self._items.append(item)
        self._readable.set()

    async def get(self) -> _Item:
        while not self._items:
            if self._closed:
                err, self._error = self._error, None
                if err is not None:
                    raise err
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._writable.set()
        return item

    def close(self, error: BaseException | None) -> None:
        """No more puts; gets drain what is buffered, then raise ``error`` once (or stop)."""
        if self._closed:
            return
        self._closed = True
        self._error = error
        self._readable.set()
        self._writable.set()


class Subscription:
    """One channel subscription; ``async for message in subscription``."""

    def __init__(
        self,
        client: Client,
        channel: str,
        since: Position | None,
        handler: MessageHandler | None,
        max_buffered: int,
    ) -> None:
        self._client = client
        #: The channel's name.
        self.channel = channel
        #: The stream's epoch of the position below (``None`` before the first ``subscribed``).
        self.epoch: str | None = since.epoch if since else None
        #: Offset of the last publication received (or the stream's top when subscribed).
        self.offset: int | None = since.offset if since else None
        #: ``pending`` until the first ``subscribed``, then ``subscribed``; ``unsubscribed`` at the end.
        self.state = "pending"
        #: Whether the subscription is confirmed on the live connection.
        self.active = False
        #: Whether the namespace uses acknowledged delivery (from the server's ``subscribed``).
        self.acked = False
        #: ``recovered`` of the last ``subscribed`` reply to a resume (``None``: not a resume).
        self.recovered: bool | None = None
        #: How many times a resume answered ``recovered:false``.
        self.recovery_failures = 0
        # Called with each publication instead of buffering it, when given.
        self._handler = handler
        self._inbox = _Inbox(max_buffered)
        # Resolved by the first `subscribed` (or failed by a refusal).
        self._first: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        # Position of the last publication the application has taken (acked namespaces).
        self._taken: Position | None = None
        # The pending cumulative ack, if one is scheduled.
        self._ack_timer: asyncio.TimerHandle | None = None
        # The connection the last (re)subscribe was sent on (sent once per connection).
        self._sent_on: object | None = None

    def __repr__(self) -> str:
        return f"<Subscription {self.channel} {self.state} at {self.epoch}/{self.offset}>"

    @property
    def position(self) -> Position | None:
        """Where a resume would start from: the last publication received."""
        if self.epoch is None or self.offset is None:
            return None
        return Position(self.epoch, self.offset)

    @property
    def buffered(self) -> int:
        """Publications received and not yet taken by the application."""
        return len(self._inbox)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        item = await self._inbox.get()
        if isinstance(item, RecoveryFailed):
            raise item
        self._took(item)
        return item

    async def unsubscribe(self) -> None:
        """Stop receiving the channel; the iterator ends after what is buffered."""
        await self._client.unsubscribe(self.channel)

    # ------------------------------------------------------------ used by the client

    def _took(self, msg: Message) -> None:
        """The application has taken ``msg``: acknowledge it (acked namespaces)."""
        if not self.acked or msg.position is None:
            return
        self._taken = msg.position
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(0.05, self._flush_ack)

    def _flush_ack(self) -> None:
        self._ack_timer = None
        taken = self._taken
        if taken is None or not self.active or taken.epoch != self.epoch:
            return
        self._client._send_ack(self.channel, taken.offset)

    def _accept(self, frame: Frame) -> Message | None:
        """A ``message`` of this channel: the Message to deliver, or None for a repeat."""
        msg = Message.from_frame(frame)
        epoch = msg.epoch if msg.epoch is not None else self.epoch
        if (
            msg.offset is not None
            and self.epoch is not None
            and self.offset is not None
            and epoch == self.epoch
            and msg.offset <= self.offset
        ):
            return None
        if msg.offset is not None:
            self.epoch = epoch
            self.offset = msg.offset
        return msg

    async def _deliver(self, msg: Message) -> None:
        """Hand ``msg`` on: to the handler (through the client's dispatcher) or the buffer."""
        if self._handler is not None:
            await self._client._events.dispatch([self._handler], msg, lambda: self._took(msg))
        else:
            await self._inbox.put(msg)

    def _subscribing(self) -> Position | None:
        """A (re)subscribe is being sent: the ``since`` to send with it."""
        return self.position

    def _confirmed(self, reply: Frame, since: Position | None) -> RecoveryFailed | None:
        """The server confirmed a (re)subscribe; returns the gap to report, if any."""
        epoch = reply.get("epoch")
        offset = reply.get("offset")
        recovered = reply.get("recovered")
        if isinstance(epoch, str) and isinstance(offset, int):
            if recovered is False or self.epoch != epoch or self.offset is None:
                self.epoch, self.offset = epoch, offset
            elif offset > self.offset:
                self.offset = offset
        self.state = "subscribed"
        self.active = True
        self.acked = reply.get("acked") is True
        self.recovered = None if since is None else recovered is not False
        if not self._first.done():
            self._first.set_result(reply)
        if since is None or recovered is not False or self.position is None:
            return None
        self.recovery_failures += 1
        return RecoveryFailed(self.channel, since, self.position, reply)

    async def _report(self, gap: RecoveryFailed) -> None:
        """Put a gap in the stream (iterating subscriptions only)."""
        if self._handler is None:
            await self._inbox.put(gap)

    def _disconnected(self) -> None:
        self.active = False

    def _end(self, error: BaseException | None = None) -> None:
        """The subscription is over; the iterator drains, then raises ``error`` or stops."""
        self.state = "unsubscribed"
        self.active = False
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if not self._first.done():
            self._first.set_exception(
                error
                if error is not None
                else SwitchboardError("unsubscribed", f"unsubscribed from {self.channel} before it was confirmed")
            )
            # Retrieve it, so an unawaited refusal is not reported as never retrieved.
            self._first.exception()
        self._inbox.close(error)
