"""The capability fakes refuse what QEMU refuses and hold what tests assert on."""

from __future__ import annotations

import asyncio
import os

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


async def test_fake_devices_hand_a_named_descriptor_to_its_netdev_and_hold_ports() -> None:
    devices = FakeDevices(buses={"hotplug-port-0"})
    read_end, write_end = os.pipe()
    try:
        await devices.pass_fd(write_end, "fd-net1")
        await devices.add_netdev(NetdevSpec("net1", "tap", {"fd": "fd-net1"}))
        assert devices.fds == {} and "net1" in devices.netdev_fds  # used up, as in QEMU
        with pytest.raises(HypervisorError, match="Bus 'nowhere' not found"):
            await devices.add_device(DeviceSpec("virtio-net-pci", "nic1",
                                                {"netdev": "net1", "bus": "nowhere"}))
        await devices.add_device(DeviceSpec("virtio-net-pci", "nic1",
                                            {"netdev": "net1", "bus": "hotplug-port-0"}))
        assert await devices.devices_on("hotplug-port-0") == ("nic1",)
        await devices.add_netdev(NetdevSpec("net2", "user"))
        with pytest.raises(HypervisorError, match="not available"):
            await devices.add_device(DeviceSpec("virtio-net-pci", "nic2",
                                                {"netdev": "net2", "bus": "hotplug-port-0"}))
        await devices.set_link("nic1", False)
        assert devices.links["nic1"] is False
        with pytest.raises(HypervisorError, match="not found"):
            await devices.set_link("nic9", True)
        await devices.remove_device("nic1", timeout=1)
        await devices.remove_netdev("net1")
        assert devices.netdev_fds == {}
    finally:
        devices.close()
        os.close(read_end)
        os.close(write_end)
