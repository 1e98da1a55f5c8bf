"""Switches in the store: names taken once, compare-and-swap on changes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hvstack.errors import AlreadyExists, StaleRevision
from hvstack.host.records import SwitchRecords
from hvstack.host.store import MemoryStore
from hvstack.network.model import NatMapping, NatProtocol, Switch, SwitchType

LAB = Switch("0c6f8a3e-1b7c-4d39-9e57-1f0a2b3c4d5e", "lab", SwitchType.NAT,
             subnet="10.1.0.0/24", host_address="10.1.0.1/24",
             mappings=(NatMapping(NatProtocol.TCP, 80, "10.1.0.9", 8080),))


async def test_create_load_change_delete() -> None:
    records = SwitchRecords(MemoryStore())
    stored = await records.create(LAB)
    assert [s.switch for s in await records.load()] == [LAB]
    assert not await records.default_made()
    renamed = await records.change(stored, replace(LAB, name="lab 2"))
    assert [s.switch.name for s in await records.load()] == ["lab 2"]
    # the old name is free again, the new one taken
    other = replace(LAB, id="1c6f8a3e-1b7c-4d39-9e57-1f0a2b3c4d5e")
    with pytest.raises(AlreadyExists):
        await records.create(replace(other, name="lab 2"))
    await records.create(other)
    await records.delete(renamed)
    assert [s.switch.name for s in await records.load()] == ["lab"]


async def test_a_stale_change_is_refused() -> None:
    records = SwitchRecords(MemoryStore())
    stored = await records.create(LAB)
    await records.change(stored, replace(LAB, notes="first"))
    with pytest.raises(StaleRevision, match="changed meanwhile"):
        await records.change(stored, replace(LAB, notes="second"))
    assert [s.switch.notes for s in await records.load()] == ["first"]


async def test_the_default_switch_is_remembered() -> None:
    records = SwitchRecords(MemoryStore())
    stored = await records.create(replace(LAB, default=True))
    await records.delete(stored)
    assert await records.default_made()
