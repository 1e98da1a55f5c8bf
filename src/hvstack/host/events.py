"""The event stream: every state change and job progress, fanned out to subscribers.

Subscribers get a bounded queue each; a subscriber that falls far behind loses the
oldest events rather than slowing the host service down (it sees a gap in ``seq``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hvstack.errors import HvError

QUEUE_SIZE = 1000


@dataclass(frozen=True)
class Event:
    seq: int
    type: str  # "vm.state", "vm.created", "vm.deleted", "job.progress", ...
    time: float
    data: dict[str, str | int | float | bool | None] = field(default_factory=dict)


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._seq = itertools.count(1)

    def publish(self, type_: str, **data: str | int | float | bool | None) -> Event:
        event = Event(next(self._seq), type_, time.time(), dict(data))
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)
        return event

    def subscribe(self) -> Subscription:
        """Start receiving events now (not at the first read)."""
        queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(queue)
        return Subscription(queue, self._subscribers)


class Subscription(AsyncIterator[Event]):
    """An async iterator of events; a read cancelled by a timeout leaves it usable."""

    def __init__(self, queue: asyncio.Queue[Event], registry: set[asyncio.Queue[Event]]) -> None:
        self._queue = queue
        self._registry = registry

    async def __anext__(self) -> Event:
        if self._queue not in self._registry:
            raise StopAsyncIteration
        return await self._queue.get()

    async def aclose(self) -> None:
        self._registry.discard(self._queue)


def error_data(exc: HvError) -> dict[str, str | int | float | bool | None]:
    return {"error_type": exc.slug, "error": exc.message}
