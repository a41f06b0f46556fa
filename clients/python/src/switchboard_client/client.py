"""The Switchboard client: one WebSocket connection kept open, requests and channels.

Where it sits: ``Client`` is what the application uses. It owns the *connection loop*
task (connect, read the ``connected`` welcome, resubscribe, read every server frame,
reconnect for ever with full-jitter backoff, see backoff.py) and a Dispatcher
(events.py) that runs the application's ``on(type, handler)`` handlers in a task of
its own. Requests carry an increasing ``id`` and are settled by the reply with that
``ref`` (wire.py); channel state lives in subscription.py; the values handed to the
application are in models.py. The wire protocol is
docs/protocol.md; the behaviour mirrors the JavaScript client (clients/js).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random as _random
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from .backoff import Backoff, parse_retry_after, parse_retry_hint
from .errors import SwitchboardError
from .events import Dispatcher, Handler
from .models import Frame, History, Position, Presence, State, StateChange
from .subscription import MessageHandler, Subscription
from .wire import AUTH_CLOSES, REPLIES, Pending, parse_frame, with_token

__all__ = ["Client"]

log = logging.getLogger("switchboard_client")


class Client:
    """A connection to Switchboard that reconnects for ever; ``async with Client(url) as c``.

    See README.md beside the package for every option; times are in seconds.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        request_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        reconnect_base_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        max_reconnect_attempts: int | None = None,
        queue_while_disconnected: int = 100,
        max_buffered: int = 1000,
        max_message_size: int | None = 16 * 1024 * 1024,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        random: Callable[[], float] = _random.random,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        #: The server's URL, ``ws(s)://host/ws`` (the bare host works too).
        self.url = url
        #: Seconds a request waits for its reply, counted from when it is written.
        self.request_timeout = request_timeout
        #: Seconds one attempt may take to open and get the ``connected`` welcome.
        self.connect_timeout = connect_timeout
        #: Consecutive failed attempts before giving up (``None``: never).
        self.max_reconnect_attempts = max_reconnect_attempts
        #: Most requests waiting for a connection at once (beyond: ``queue_full``).
        self.queue_while_disconnected = queue_while_disconnected
        #: Per subscription (and for the handlers), entries received and not yet taken.
        self.max_buffered = max_buffered
        #: ``connecting`` | ``open`` | ``reconnecting`` | ``closed``.
        self.state: State = "closed"
        #: This connection's id (the ``connected`` welcome); a reconnect gets a new one.
        self.client_id: str | None = None
        #: The server instance of the current connection.
        self.instance_id: str | None = None
        #: The last ``connected`` welcome frame.
        self.welcome: Frame | None = None
        #: Channel name → its Subscription.
        self.subscriptions: dict[str, Subscription] = {}

        self._connect_url = with_token(url, token)
        self._ws_options: dict[str, Any] = {
            "max_size": max_message_size,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "close_timeout": 2.0,
            "open_timeout": None,  # the attempt as a whole is bounded by connect_timeout
        }
        self._backoff = Backoff(reconnect_base_delay, reconnect_max_delay, random)
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._ws: ClientConnection | None = None
        # Set while requests may be written (open, subscriptions re-sent) or once stopped.
        self._gate = asyncio.Event()
        self._waiting = 0
        self._task: asyncio.Task[None] | None = None
        self._events = Dispatcher(max_buffered)
        self._first_welcome: asyncio.Future[Frame] | None = None
        # Set once the client stopped (closed, or gave up): what requests then raise.
        self._error: SwitchboardError | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Client:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> Frame:
        """Start the connection loop; return the first ``connected`` welcome.

        Retries with backoff until a connection opens; raises only if the client is
        closed, the server refuses the token (4001/4003), or ``max_reconnect_attempts``
        runs out first. Wrap it in ``asyncio.timeout`` to bound the wait.
        """
        if self._error is not None:
            raise self._error
        if self._task is None:
            self._first_welcome = asyncio.get_running_loop().create_future()
            self._events.start()
            self._task = asyncio.create_task(self._run(), name="switchboard-connection")
        assert self._first_welcome is not None
        return await asyncio.shield(self._first_welcome)

    async def close(self) -> None:
        """Close for good: pending requests raise ``closed``, iterators end."""
        if self._closing:
            return
        self._closing = True
        ws = self._ws
        if self._error is None:
            self._stop(SwitchboardError("closed", "client closed"), None)
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        await self._set_state(StateChange("closed"))
        for t in list(self._tasks):
            t.cancel()
        await self._events.stop()

    async def reconnect(self) -> None:
        """Drop the current connection (close 4000) and reconnect, with recovery."""
        ws = self._ws
        if ws is not None:
            await ws.close(4000, "reconnect requested by the client")

    # ---------------------------------------------------------------- events

    def on(self, type: str, handler: Handler) -> None:
        """Call ``handler`` with every server frame of ``type`` (``broadcast``, ``direct``,
        ``message``, ``join``, ``error``, …) and with the client events ``state``
        (a StateChange) and ``recovery-failed`` (a RecoveryFailed). Sync or async;
        handlers run one at a time, in order, outside the reader.
        """
        self._events.on(type, handler)

    def off(self, type: str, handler: Handler | None = None) -> None:
        """Remove one handler of ``type``, or all of them."""
        self._events.off(type, handler)

    async def _set_state(self, change: StateChange) -> None:
        self.state = change.state
        await self._events.emit("state", change)

    # ---------------------------------------------------------------- connection loop

    async def _run(self) -> None:
        try:
            await self._connection_loop()
        except Exception as exc:
            # A bug of the client: fail loudly rather than hang every waiter.
            log.exception("switchboard: the connection loop failed")
            error = SwitchboardError("internal", f"the client's connection loop failed: {exc!r}")
            self._stop(error, error)
            self.state = "closed"

    async def _connection_loop(self) -> None:
        await self._set_state(StateChange("connecting"))
        while True:
            code, reason = await self._attempt()
            if code in AUTH_CLOSES:
                error = SwitchboardError(AUTH_CLOSES[code], reason or str(code))
                self._stop(error, error)
                await self._set_state(StateChange("closed", self._backoff.attempt, None, code, reason))
                return
            limit = self.max_reconnect_attempts
            if limit is not None and self._backoff.attempt >= limit:
                error = SwitchboardError("closed", f"gave up after {self._backoff.attempt} reconnect attempts")
                self._stop(error, error)
                await self._set_state(StateChange("closed", self._backoff.attempt, None, code, reason))
                return
            hint = parse_retry_hint(reason)
            if hint is not None:
                self._backoff.hint = hint
            delay = self._backoff.next_delay()
            await self._set_state(StateChange("reconnecting", self._backoff.attempt, delay, code, reason))
            await asyncio.sleep(delay)

    async def _attempt(self) -> tuple[int | None, str | None]:
        """One connection, from the handshake to its end: the close code and reason."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await connect(self._connect_url, **self._ws_options)
                try:
                    welcome = await self._read_welcome(ws)
                except BaseException:
                    ws.transport.abort()
                    raise
        except InvalidStatus as exc:
            status = exc.response.status_code
            self._backoff.hint = parse_retry_after(exc.response.headers.get("Retry-After"))
            log.warning("switchboard: %s refused the connection: HTTP %s", self.url, status)
            return None, f"HTTP {status}"
        except ConnectionClosed as exc:
            close = exc.rcvd
            log.warning("switchboard: %s closed the connection before the welcome: %s", self.url, exc)
            return (close.code, close.reason) if close is not None else (None, None)
        except (OSError, TimeoutError, WebSocketException) as exc:
            log.info("switchboard: cannot connect to %s: %r", self.url, exc)
            return None, None
        self._backoff.reset()
        await self._serve(ws, welcome)
        return ws.protocol.close_code, ws.protocol.close_reason

    async def _read_welcome(self, ws: ClientConnection) -> Frame:
        while True:
            msg = parse_frame(await ws.recv())
            if msg is not None and msg["type"] == "connected":
                return msg

    async def _serve(self, ws: ClientConnection, welcome: Frame) -> None:
        """Use an open connection until it ends."""
        self._ws = ws
        self.welcome = welcome
        self.client_id = welcome.get("clientId")
        self.instance_id = welcome.get("instanceId")
        try:
            await self._set_state(StateChange("open"))
            await self._events.emit("connected", welcome)
            for sub in list(self.subscriptions.values()):
                await self._send_subscribe(sub)
            self._gate.set()
            if self._first_welcome is not None and not self._first_welcome.done():
                self._first_welcome.set_result(welcome)
            async for raw in ws:
                msg = parse_frame(raw)
                if msg is not None:
                    await self._on_frame(msg)
        except (ConnectionClosed, SwitchboardError):
            pass  # the connection ended; the loop reconnects
        finally:
            if self._error is None:
                self._gate.clear()
            self._ws = None
            self.client_id = None
            for sub in self.subscriptions.values():
                sub._disconnected()
            code, reason = ws.protocol.close_code, ws.protocol.close_reason
            self._fail_pending(SwitchboardError("disconnected", f"connection closed ({code} {reason or ''})".strip()))

    def _stop(self, error: SwitchboardError, end_with: BaseException | None) -> None:
        """The client stops for good: requests raise ``error``; iterators end after what
        they hold, raising ``end_with`` (giving up) or simply stopping (``close()``)."""
        self._error = error
        self._gate.set()
        self._fail_pending(error)
        ended = list(self.subscriptions.values())
        self.subscriptions.clear()
        for sub in ended:
            sub._end(end_with)
        first = self._first_welcome
        if first is not None and not first.done():
            first.set_exception(error)
            first.exception()  # retrieved: connect() may not be waiting

    def _fail_pending(self, error: SwitchboardError) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        for p in pending:
            if p.timer is not None:
                p.timer.cancel()
            if p.future is not None and not p.future.done():
                p.future.set_exception(error)
            # A (re)subscribe is simply sent again on the next connection.

    # ---------------------------------------------------------------- reading

    async def _on_frame(self, msg: Frame) -> None:
        type_ = msg["type"]
        channel = msg.get("channel")
        sub = self.subscriptions.get(channel) if isinstance(channel, str) else None
        if type_ == "message" and sub is not None:
            message = sub._accept(msg)
            if message is None:
                return  # a repeat: the application never sees it twice
            await sub._deliver(message)
        elif type_ == "unsubscribed" and msg.get("ref") is None and sub is not None:
            # The server ended it (a refreshed token no longer grants it): not resubscribed.
            del self.subscriptions[sub.channel]
            sub._end()
        ref = msg.get("ref")
        if isinstance(ref, int) and not isinstance(ref, bool):
            await self._settle(msg, ref)
        await self._events.emit(type_, msg)

    async def _settle(self, msg: Frame, ref: int) -> None:
        p = self._pending.get(ref)
        if p is None or (msg["type"] != "error" and msg["type"] not in p.accepts):
            return
        del self._pending[ref]
        if p.timer is not None:
            p.timer.cancel()
        error = None
        if msg["type"] == "error":
            error = SwitchboardError(str(msg.get("code") or "error"), str(msg.get("message") or ""), msg)
        if p.sub is not None:
            sub = p.sub
            if self.subscriptions.get(sub.channel) is not sub:
                return  # unsubscribed meanwhile
            if error is not None:
                del self.subscriptions[sub.channel]
                sub._end(error)
                await self._events.emit("subscription-error", error)
                return
            gap = sub._confirmed(msg, p.since)
            if gap is not None:
                await sub._report(gap)
                await self._events.emit("recovery-failed", gap)
        elif p.future is not None and not p.future.done():
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(msg)

    # ---------------------------------------------------------------- writing

    def _connected(self) -> bool:
        return self._ws is not None and self._error is None and self._gate.is_set()

    async def _wait_connected(self) -> ClientConnection:
        """The open connection; waits (bounded by ``queue_while_disconnected``) while there is none."""
        if self._error is not None:
            raise self._error
        if self._task is None:
            raise SwitchboardError("closed", "not connected: use `async with Client(…)` or connect()")
        if not self._connected():
            if self._waiting >= self.queue_while_disconnected:
                raise SwitchboardError("queue_full", f"not connected and {self._waiting} requests already waiting")
            self._waiting += 1
            try:
                while not self._connected():
                    if self._error is not None:
                        raise self._error
                    await self._gate.wait()
            finally:
                self._waiting -= 1
        assert self._ws is not None
        return self._ws

    async def _write(self, ws: ClientConnection, frame: Frame) -> None:
        try:
            await ws.send(json.dumps(frame, separators=(",", ":")))
        except ConnectionClosed as exc:
            raise SwitchboardError("disconnected", f"connection closed ({exc})") from exc

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_quietly(self, ws: ClientConnection, frame: Frame) -> None:
        with contextlib.suppress(SwitchboardError):
            await self._write(ws, frame)

    def _send_ack(self, channel: str, offset: int) -> None:
        """A subscription's cumulative ack; dropped when not connected (the resubscribe covers it)."""
        if self._connected() and self._ws is not None:
            self._spawn(self._write_quietly(self._ws, {"type": "ack", "channel": channel, "offset": offset}))

    async def _request(self, frame: Frame, timeout: float | None = None) -> Frame:
        ws = await self._wait_connected()
        id_ = next(self._ids)
        type_ = frame["type"]
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[id_] = Pending(type_, REPLIES.get(type_, ()), future=future)
        try:
            await self._write(ws, {**frame, "id": id_})
            limit = self.request_timeout if timeout is None else timeout
            try:
                async with asyncio.timeout(limit):
                    return await future
            except TimeoutError:
                raise SwitchboardError("timeout", f"no reply to {type_} within {limit} s") from None
        finally:
            self._pending.pop(id_, None)

    async def _send_subscribe(self, sub: Subscription) -> None:
        """Send ``sub``'s (re)subscribe on the current connection, once per connection."""
        ws = self._ws
        if ws is None or sub._sent_on is ws:
            return
        sub._sent_on = ws
        id_ = next(self._ids)
        since = sub._subscribing()
        frame: Frame = {"type": "subscribe", "channel": sub.channel}
        if since is not None:
            frame["since"] = since.to_wire()
        frame["id"] = id_
        pending = Pending("subscribe", ("subscribed",), sub=sub, since=since)
        self._pending[id_] = pending
        pending.timer = asyncio.get_running_loop().call_later(self.request_timeout, self._subscribe_timed_out, id_)
        await self._write(ws, frame)

    def _subscribe_timed_out(self, id_: int) -> None:
        pending = self._pending.pop(id_, None)
        if pending is None or pending.sub is None:
            return
        sub = pending.sub
        if self.subscriptions.get(sub.channel) is not sub:
            return
        ws = self._ws
        if sub.state == "subscribed":
            # A resubscribe the server does not answer: the connection is not healthy.
            if ws is not None:
                self._spawn(ws.close(4000, "resubscribe timed out"))
            return
        del self.subscriptions[sub.channel]
        if ws is not None:
            # The server may still subscribe us: undo it, fire and forget.
            self._spawn(self._write_quietly(ws, {"type": "unsubscribe", "channel": sub.channel}))
        sub._end(SwitchboardError("timeout", f"no reply to subscribe {sub.channel} within {self.request_timeout} s"))

    # ---------------------------------------------------------------- API

    async def subscribe(
        self,
        channel: str,
        *,
        since: Position | None = None,
        handler: MessageHandler | None = None,
    ) -> Subscription:
        """Subscribe; returns once the server confirmed it.

        The Subscription is an async iterator of Messages, unless ``handler`` is given:
        then each Message is passed to it instead (sync or async, in order). ``since``
        resumes from a known position (one the application kept). Raises
        SwitchboardError with the server's code when refused. While disconnected the
        subscribe is sent when the connection opens.
        """
        if self._error is not None:
            raise self._error
        if channel in self.subscriptions:
            raise SwitchboardError("already_subscribed", f"this client is already subscribed to {channel}")
        sub = Subscription(self, channel, since, handler, self.max_buffered)
        self.subscriptions[channel] = sub
        if self._ws is not None and self._error is None:
            # (While a connection is being set up, whichever of this and its
            # resubscribe loop comes first sends it.)
            with contextlib.suppress(SwitchboardError):
                await self._send_subscribe(sub)  # if the connection dropped, it is resent
        try:
            await asyncio.shield(sub._first)
        except asyncio.CancelledError:
            if self.subscriptions.get(channel) is sub:
                self._spawn(self._unsubscribe_quietly(channel))
            raise
        return sub

    async def _unsubscribe_quietly(self, channel: str) -> None:
        with contextlib.suppress(SwitchboardError):
            await self.unsubscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``; its iterator ends after what is buffered."""
        sub = self.subscriptions.pop(channel, None)
        if sub is None:
            return
        was_active = sub.active
        in_flight = any(p.sub is sub for p in self._pending.values())
        sub._end()
        if not self._connected() or not (was_active or in_flight):
            return  # nothing to undo on the server
        try:
            await self._request({"type": "unsubscribe", "channel": channel})
        except SwitchboardError as err:
            if err.code not in ("not_subscribed", "disconnected"):
                raise

    async def publish(self, channel: str, data: Any = None) -> int:
        """Publish into ``channel``; returns the publication's offset."""
        ack = await self._request({"type": "publish", "channel": channel, "data": data})
        return int(ack.get("offset", 0))

    async def broadcast(self, data: Any = None) -> None:
        """Send ``data`` to every other connected client (the tutorial's ``broadcast``)."""
        await self._request({"type": "broadcast", "data": data})

    async def direct(self, target_id: str, data: Any = None) -> None:
        """Send ``data`` to one client; raises ``unknown_target`` if it is not connected."""
        await self._request({"type": "direct", "targetId": target_id, "data": data})

    async def direct_user(self, user_id: str, data: Any = None) -> None:
        """Send ``data`` to every connection of user ``user_id`` (needs a grant with auth on)."""
        await self._request({"type": "direct", "userId": user_id, "data": data})

    async def history(self, channel: str, *, since: Position | None = None, limit: int | None = None) -> History:
        """A channel's retained publications, oldest first."""
        frame: Frame = {"type": "history", "channel": channel}
        if since is not None:
            frame["since"] = since.to_wire()
        if limit is not None:
            frame["limit"] = limit
        return History.from_frame(await self._request(frame))

    async def presence(self, channel: str) -> Presence:
        """Who is subscribed to ``channel``."""
        return Presence.from_frame(await self._request({"type": "presence", "channel": channel}))

    async def ping(self) -> None:
        """An application-level round trip (``ping`` → ``pong``)."""
        await self._request({"type": "ping"})

    async def send(self, frame: Frame) -> None:
        """Write a raw frame (no ``id``, no reply awaited), e.g. the tutorial's own types."""
        ws = await self._wait_connected()
        await self._write(ws, frame)
