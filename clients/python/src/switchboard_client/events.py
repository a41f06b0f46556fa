"""The application's handlers: ``on(type, handler)``, run one at a time, in order.

Where it sits: the client's reader and connection loop hand events to the
``Dispatcher`` (``emit``/``dispatch``, which wait while ``max_buffered`` events are
queued); its own task calls the handlers, so a slow or awaiting handler never stalls
the reader and may itself await requests of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Dispatcher", "Handler"]

log = logging.getLogger("switchboard_client")

#: An ``on(type, handler)`` handler: gets the frame (or client event), may be async.
Handler = Callable[[Any], Awaitable[None] | None]

_Event = tuple[list[Handler], Any, Callable[[], None] | None]


class Dispatcher:
    """Handlers by event type, and the task that runs them."""

    def __init__(self, max_queued: int) -> None:
        #: Event type → its handlers, in the order they were added.
        self.handlers: dict[str, list[Handler]] = {}
        # Events waiting for the task; None stops it.
        self._queue: asyncio.Queue[_Event | None] = asyncio.Queue(max(1, max_queued))
        self._task: asyncio.Task[None] | None = None

    def on(self, type: str, handler: Handler) -> None:
        self.handlers.setdefault(type, []).append(handler)

    def off(self, type: str, handler: Handler | None) -> None:
        handlers = self.handlers.get(type)
        if handlers is None:
            return
        if handler is None:
            del self.handlers[type]
        elif handler in handlers:
            handlers.remove(handler)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="switchboard-handlers")

    async def emit(self, type: str, arg: Any) -> None:
        """Queue ``arg`` for the handlers of ``type`` (nothing if there are none)."""
        handlers = self.handlers.get(type)
        if handlers:
            await self.dispatch(list(handlers), arg, None)

    async def dispatch(self, handlers: list[Handler], arg: Any, after: Callable[[], None] | None) -> None:
        """Queue a call of each of ``handlers`` with ``arg``, then of ``after()``."""
        await self._queue.put((handlers, arg, after))

    async def stop(self) -> None:
        """Run what is queued (for at most 2 s), then stop. From a handler: stop after it."""
        task = self._task
        if task is None:
            return
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            task.cancel()
        if task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 2.0)

    async def _run(self) -> None:
        while (event := await self._queue.get()) is not None:
            handlers, arg, after = event
            for handler in handlers:
                try:
                    result = handler(arg)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    # One faulty handler must not stop the others or the client.
                    log.exception("switchboard: a handler raised")
            if after is not None:
                after()
