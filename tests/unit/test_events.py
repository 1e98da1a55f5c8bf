"""The event bus: fan-out to subscribers, bounded queues, and waiting with a timeout."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from hvstack.errors import NotFound
from hvstack.host import events as events_module
from hvstack.host.events import EventBus, Subscription, error_data


async def close(subscription: Subscription) -> None:
    await subscription.aclose()


async def test_publish_without_subscribers_numbers_events() -> None:
    bus = EventBus()
    first = bus.publish("vm.created", vm="a")
    second = bus.publish("vm.deleted", vm="a")
    assert (first.seq, second.seq) == (1, 2)
    assert first.type == "vm.created" and first.data == {"vm": "a"}


async def test_every_subscriber_gets_every_event() -> None:
    bus = EventBus()
    one, two = bus.subscribe(), bus.subscribe()
    waiting = [asyncio.ensure_future(anext(one)), asyncio.ensure_future(anext(two))]
    await asyncio.sleep(0)  # let both subscriptions register
    bus.publish("vm.state", vm="a", state="Running")
    got = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert [e.data["state"] for e in got] == ["Running", "Running"]
    await close(one)
    await close(two)


async def test_a_slow_subscriber_loses_the_oldest_events(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "QUEUE_SIZE", 3)
    bus = EventBus()
    sub = bus.subscribe()
    first = asyncio.ensure_future(anext(sub))
    await asyncio.sleep(0)
    bus.publish("e", n=0)
    assert (await asyncio.wait_for(first, 5)).data == {"n": 0}
    for n in range(1, 7):
        bus.publish("e", n=n)
    got = [(await asyncio.wait_for(anext(sub), 5)).data["n"] for _ in range(3)]
    assert got == [4, 5, 6]
    await close(sub)


async def test_closing_a_subscription_unsubscribes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "QUEUE_SIZE", 2)
    bus = EventBus()
    sub, other = bus.subscribe(), bus.subscribe()
    bus.publish("e", n=0)
    assert (await asyncio.wait_for(anext(sub), 5)).data == {"n": 0}
    await close(sub)
    for n in range(1, 5):  # more than its queue holds: nothing blocks or fails
        bus.publish("e", n=n)
    # The closed subscription ends instead of delivering what came after ...
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(sub), 5)
    # ... while the other one still gets everything its queue holds.
    got = [(await asyncio.wait_for(anext(other), 5)).data["n"] for _ in range(2)]
    assert got == [3, 4]
    await close(other)


async def test_a_subscription_survives_a_timed_out_wait() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(anext(sub), 0.01)
    bus.publish("vm.state", state="Running")
    event = await asyncio.wait_for(anext(sub), 1)
    assert event.data["state"] == "Running"


def test_error_data() -> None:
    assert error_data(NotFound("gone")) == {"error_type": "not-found", "error": "gone"}
