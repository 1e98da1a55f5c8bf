"""The capability fakes refuse what QEMU refuses and hold what tests assert on."""

from __future__ import annotations

import asyncio

import pytest

from hvstack.errors import HypervisorError, OperationTimeout
from hvstack.hypervisor.capabilities import DeviceSpec, MigrationStats, NetdevSpec
from tests.functional.fake_capabilities import FakeDevices, FakeMigration


async def test_fake_devices_need_their_netdev_and_wait_for_the_guest() -> None:
    devices = FakeDevices(auto_release=False)
    with pytest.raises(HypervisorError, match="can't find value 'net1'"):
        await devices.add_device(DeviceSpec("virtio-net-pci", "nic1", {"netdev": "net1"}))
    await devices.add_netdev(NetdevSpec("net1", "user"))
    await devices.add_device(DeviceSpec("virtio-net-pci", "nic1", {"netdev": "net1"}))
    with pytest.raises(OperationTimeout):
        await devices.remove_device("nic1", timeout=0.05)
    removing = asyncio.create_task(devices.remove_device("nic1", timeout=30))
    await asyncio.sleep(0)
    devices.release("nic1")
    await removing
    assert devices.devices == {}


async def test_fake_migration_follows_its_script() -> None:
    migration = FakeMigration(script=[MigrationStats("active", ram_total=4, ram_transferred=1),
                                      MigrationStats("completed")])
    await migration.start("fd:x")
    assert (await migration.stats()).percent == 25.0
    assert (await migration.stats()).finished
    assert (await migration.stats()).status == "completed"
