"""Hot add, hot remove and link state of network adapters (compute/nics.py) against the
fake Devices capability: the steps sent, the ports chosen, and the undo of every step
before one that fails."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hvstack.compute import nics
from hvstack.compute.model import Generation, NetworkAdapter, NicModel
from hvstack.errors import (
    Conflict,
    HypervisorError,
    InsufficientResources,
    InvalidInput,
    OperationTimeout,
)
from hvstack.hypervisor.capabilities import DeviceSpec, NetdevSpec
from hvstack.hypervisor.events import QmpEvent
from hvstack.hypervisor.spec import HOTPLUG_PORTS, NIC_SLOTS, PortLayout, hotplug_port_id
from tests.functional.fake_capabilities import FakeDevices

MAC = "52:54:00:0a:0b:0c"
PORTS = {hotplug_port_id(i) for i in range(HOTPLUG_PORTS)} | {"port-525400000001"}
GEN2, GEN1 = Generation.GEN2, Generation.GEN1


def switched(mac: str = MAC, switch: str = "sw1") -> NetworkAdapter:
    return NetworkAdapter(mac, NicModel.VIRTIO, "switch", switch)


@pytest.fixture
def devices() -> Iterator[FakeDevices]:
    fake = FakeDevices(buses=set(PORTS))
    yield fake
    fake.close()


@pytest.fixture
def tap() -> Iterator[int]:
    """A descriptor standing in for an open tap (the test keeps the other end)."""
    read_end, write_end = os.pipe()
    yield write_end
    os.close(read_end)
    os.close(write_end)


async def test_a_switch_port_is_plugged_on_the_first_free_spare_port(
        devices: FakeDevices, tap: int) -> None:
    port = await nics.hot_add(devices, switched(), GEN2, tap_fd=tap)
    assert port == "hotplug-port-0"
    assert devices.netdevs["net-5254000a0b0c"] == NetdevSpec(
        "net-5254000a0b0c", "tap", {"fd": "fd-net-5254000a0b0c"})
    assert devices.devices["nic-5254000a0b0c"] == DeviceSpec(
        "virtio-net-pci", "nic-5254000a0b0c",
        {"netdev": "net-5254000a0b0c", "mac": MAC, "bus": "hotplug-port-0"})
    # the netdev owns the descriptor now; the caller still has its own copy
    assert devices.fds == {} and "net-5254000a0b0c" in devices.netdev_fds
    os.fstat(tap)
    assert devices.links["nic-5254000a0b0c"] is True
    other = await nics.hot_add(devices, NetworkAdapter("52:54:00:0a:0b:0d", NicModel.VIRTIO),
                               GEN2)
    assert other == "hotplug-port-1"


async def test_generation_1_plugs_on_the_first_free_adapter_slot_of_the_root_bus(
        devices: FakeDevices) -> None:
    # a machine started with an adapter on 0x10, and a device QEMU put on 0x11
    devices.fixed_slots |= {0x10: "nic-525400000001", 0x11: "disk-5f6a7b8c9d-dev"}
    nic = NetworkAdapter(MAC, NicModel.E1000)
    assert await nics.hot_add(devices, nic, GEN1) == "0x12"
    device = devices.devices["nic-5254000a0b0c"]
    assert device.driver == "e1000" and "bus" not in device.properties
    assert device.properties["addr"] == "0x12"
    assert devices.netdevs["net-5254000a0b0c"].type == "user"
    second = NetworkAdapter("52:54:00:0a:0b:0d", NicModel.E1000)
    assert await nics.hot_add(devices, second, GEN1) == "0x13"
    await nics.hot_remove(devices, nic, GEN1)
    # its slot is free again: the next adapter takes it
    third = NetworkAdapter("52:54:00:0a:0b:0e", NicModel.E1000)
    assert await nics.hot_add(devices, third, GEN1) == "0x12"
    assert await nics.read_layout(devices, generation=GEN1) == PortLayout(slots=(
        ("52:54:00:00:00:01", 0x10), ("52:54:00:0a:0b:0e", 0x12),
        ("52:54:00:0a:0b:0d", 0x13)))


async def test_generation_1_without_a_free_adapter_slot_leaves_nothing_behind(
        devices: FakeDevices) -> None:
    devices.fixed_slots |= {slot: f"other{slot}" for slot in NIC_SLOTS}
    with pytest.raises(InsufficientResources, match="room for 16"):
        await nics.hot_add(devices, NetworkAdapter(MAC, NicModel.E1000), GEN1)
    assert (devices.devices, devices.netdevs) == ({}, {})


async def test_a_port_not_connected_to_a_switch_comes_up_with_its_link_down(
        devices: FakeDevices, tap: int) -> None:
    await nics.hot_add(devices, switched(switch=""), GEN2, tap_fd=tap)
    assert devices.links["nic-5254000a0b0c"] is False
    await nics.set_link(devices, MAC, True)
    assert devices.links["nic-5254000a0b0c"] is True


async def test_apply_links_puts_down_the_ports_not_connected(devices: FakeDevices) -> None:
    for mac in ("52:54:00:00:00:0a", "52:54:00:00:00:0b"):
        await devices.add_netdev(NetdevSpec(f"net-{mac.replace(':', '')}", "user"))
        await devices.add_device(DeviceSpec("virtio-net-pci", f"nic-{mac.replace(':', '')}",
                                            {"netdev": f"net-{mac.replace(':', '')}"}))
    await nics.apply_links(devices, [switched("52:54:00:00:00:0a", ""),
                                     switched("52:54:00:00:00:0b", "sw1")])
    assert devices.links["nic-52540000000a"] is False
    assert devices.links["nic-52540000000b"] is True


async def test_a_switch_port_needs_its_tap_and_a_user_adapter_takes_none(
        devices: FakeDevices, tap: int) -> None:
    with pytest.raises(HypervisorError, match=f"adapter {MAC} is a switch port but no tap"):
        await nics.hot_add(devices, switched(), GEN2)
    with pytest.raises(HypervisorError, match="takes no tap device"):
        await nics.hot_add(devices, NetworkAdapter(MAC, NicModel.VIRTIO), GEN2, tap_fd=tap)
    assert (devices.devices, devices.netdevs, devices.fds) == ({}, {}, {})


async def test_when_every_spare_port_is_taken_nothing_is_left_behind(
        devices: FakeDevices, tap: int) -> None:
    for i in range(HOTPLUG_PORTS):
        await nics.hot_add(devices, NetworkAdapter(f"52:54:00:00:01:0{i}", NicModel.VIRTIO),
                           GEN2)
    before = (dict(devices.devices), dict(devices.netdevs))
    with pytest.raises(InsufficientResources, match="no free hot-plug port: 4 adapters"):
        await nics.hot_add(devices, switched(), GEN2, tap_fd=tap)
    assert (devices.devices, devices.netdevs) == before
    assert devices.fds == {} and devices.netdev_fds == {}


async def test_a_refused_netdev_gives_its_descriptor_back(devices: FakeDevices,
                                                          tap: int) -> None:
    await devices.add_netdev(NetdevSpec("net-5254000a0b0c", "user"))  # the id is taken
    with pytest.raises(HypervisorError, match="Duplicate ID"):
        await nics.hot_add(devices, switched(), GEN2, tap_fd=tap)
    assert devices.fds == {} and devices.devices == {}


async def test_a_port_qemu_does_not_have_takes_the_netdev_with_it(devices: FakeDevices,
                                                         tap: int) -> None:
    devices.buses = {"hotplug-port-0"}  # a machine with fewer ports than asked for
    await nics.hot_add(devices, NetworkAdapter("52:54:00:00:00:01", NicModel.VIRTIO), GEN2)
    with pytest.raises(HypervisorError, match="hotplug-port-1' does not exist"):
        await nics.hot_add(devices, switched(), GEN2, tap_fd=tap)
    assert set(devices.netdevs) == {"net-525400000001"}
    assert devices.netdev_fds == {} and devices.fds == {}


class HangingDevices(FakeDevices):
    """device_add never returns: the caller gives up (a cancelled job)."""

    async def add_device(self, device: DeviceSpec) -> None:
        await asyncio.Event().wait()


async def test_a_cancelled_hot_add_is_undone_and_stays_cancelled(tap: int) -> None:
    devices = HangingDevices(buses=set(PORTS))
    try:
        adding = asyncio.create_task(nics.hot_add(devices, switched(), GEN2, tap_fd=tap))
        while not devices.netdevs:
            await asyncio.sleep(0)
        adding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await adding
        assert devices.netdevs == {} and devices.netdev_fds == {} and devices.fds == {}
    finally:
        devices.close()


async def test_hot_remove_unplugs_then_drops_the_netdev(devices: FakeDevices,
                                                        tap: int) -> None:
    await nics.hot_add(devices, switched(), GEN2, tap_fd=tap)
    await nics.hot_remove(devices, switched(), GEN2)
    assert (devices.devices, devices.netdevs, devices.netdev_fds) == ({}, {}, {})
    # its port is free again
    assert await nics.hot_add(devices, switched(), GEN2, tap_fd=tap) == "hotplug-port-0"


async def test_a_guest_that_keeps_the_adapter_keeps_it_whole(devices: FakeDevices,
                                                             tap: int) -> None:
    await nics.hot_add(devices, switched(), GEN2, tap_fd=tap)
    devices.auto_release = False
    with pytest.raises(OperationTimeout, match=f"did not release network adapter {MAC} "
                                               r"within 0\.05 s; it is still plugged in"):
        await nics.hot_remove(devices, switched(), GEN2, timeout=0.05)
    assert "nic-5254000a0b0c" in devices.devices
    assert "net-5254000a0b0c" in devices.netdevs
    # its port stays taken: the next adapter goes elsewhere
    assert await nics.free_port(devices) == "hotplug-port-1"


async def test_a_removal_that_timed_out_is_finished_when_the_guest_lets_go(
        devices: FakeDevices, tap: int) -> None:
    deleted: list[str] = []
    devices.on_deleted = deleted.append
    await nics.hot_add(devices, switched(), GEN2, tap_fd=tap)
    devices.auto_release = False
    with pytest.raises(OperationTimeout):
        await nics.hot_remove(devices, switched(), GEN2, timeout=0.05)
    assert not await nics.finish_removal(devices, MAC)  # still plugged in: nothing to do
    devices.release("nic-5254000a0b0c")
    assert deleted == ["nic-5254000a0b0c"]
    event = QmpEvent("DEVICE_DELETED", {"device": deleted[0], "path": "/machine/x"})
    assert nics.deleted_adapter(event) == MAC
    assert nics.deleted_adapter(QmpEvent("DEVICE_DELETED", {"path": "/m/x"})) is None
    assert nics.deleted_adapter(QmpEvent("DEVICE_DELETED", {"device": "disk-a-dev"})) is None
    assert await nics.finish_removal(devices, MAC)
    assert devices.netdevs == {} and devices.netdev_fds == {}
    assert not await nics.finish_removal(devices, MAC)  # once


async def test_an_adapter_whose_device_left_already_loses_its_netdev(
        devices: FakeDevices) -> None:
    await devices.add_netdev(NetdevSpec("net-5254000a0b0c", "user"))
    await nics.hot_remove(devices, NetworkAdapter(MAC, NicModel.VIRTIO), GEN2)
    assert devices.netdevs == {}


class StickyNetdevs(FakeDevices):
    async def remove_netdev(self, netdev_id: str) -> None:
        raise HypervisorError("QEMU refused netdev_del: busy", qmp_class="GenericError")


async def test_a_netdev_that_will_not_go_gets_its_adapter_back() -> None:
    devices = StickyNetdevs(buses=set(PORTS))
    nic = NetworkAdapter(MAC, NicModel.VIRTIO)
    await nics.hot_add(devices, nic, GEN2)
    with pytest.raises(HypervisorError, match=f"adapter {MAC} could not be removed"):
        await nics.hot_remove(devices, nic, GEN2)
    assert devices.devices["nic-5254000a0b0c"].properties["netdev"] == "net-5254000a0b0c"


async def test_the_layout_is_read_off_the_running_machine(devices: FakeDevices) -> None:
    booted = NetworkAdapter("52:54:00:00:00:01", NicModel.VIRTIO)  # its own port-...
    await nics.hot_add(devices, NetworkAdapter(MAC, NicModel.VIRTIO), GEN2)
    layout = await nics.read_layout(devices)
    assert layout == PortLayout.at_launch([booted.mac]).plugged(MAC, "hotplug-port-0")
    await nics.hot_remove(devices, NetworkAdapter(MAC, NicModel.VIRTIO), GEN2)
    assert await nics.read_layout(devices) == PortLayout.at_launch([booted.mac])


def test_a_saved_layout_is_applied_when_there_is_one(tmp_path: Path) -> None:
    from tests.unit.test_argv import gen2_spec

    spec = gen2_spec()
    path = tmp_path / "saved-state.layout.json"
    # no file: a state the previous release saved, on that release's hardware
    assert nics.with_saved_layout(spec, path) == replace(spec, legacy_nic_layout=True)
    path.write_text(json.dumps({"format": nics.LAYOUT_FORMAT}))
    assert nics.with_saved_layout(spec, path) is spec  # the settings' own
    path.write_text(json.dumps({"format": nics.LAYOUT_FORMAT, "legacy_nic_layout": True}))
    assert nics.with_saved_layout(spec, path).legacy_nic_layout
    layout = PortLayout.at_launch([spec.net_devices[0].mac, MAC])
    path.write_text(json.dumps({"format": nics.LAYOUT_FORMAT, **layout.to_json()}))
    assert nics.with_saved_layout(spec, path).layout == layout
    path.write_text(json.dumps(layout.to_json()))  # written before files had a format
    assert nics.with_saved_layout(spec, path).layout == layout
    path.write_text("{not json")
    with pytest.raises(HypervisorError, match="layout kept with the saved state"):
        nics.with_saved_layout(spec, path)
    path.write_text(json.dumps({"own": [], "hotplugged": []}))  # no port for the adapter
    with pytest.raises(InvalidInput, match="has no port of its own"):
        nics.with_saved_layout(spec, path)


@pytest.mark.parametrize(("generation", "legacy", "expected"), [
    (GEN2, False, False), (GEN2, True, True), (GEN1, False, False), (GEN1, True, True)])
async def test_a_machine_on_the_previous_releases_layout_is_told_by_its_devices(
        generation: Generation, legacy: bool, expected: bool) -> None:
    from tests.unit.test_argv import gen1_spec, gen2_spec

    spec = replace(gen2_spec() if generation is GEN2 else gen1_spec(),
                   legacy_nic_layout=legacy)
    devices = FakeDevices.of_spec(spec)
    if legacy and generation is GEN1:  # QEMU placed the adapter itself, after the disks
        devices.fixed_slots[0x05] = spec.net_devices[0].id
    try:
        assert await nics.runs_legacy_layout(devices, generation) is expected
    finally:
        devices.close()


@pytest.mark.parametrize("generation", [GEN1, GEN2])
async def test_no_hot_plug_on_the_previous_releases_layout(generation: Generation) -> None:
    from tests.unit.test_argv import gen1_spec, gen2_spec

    spec = replace(gen2_spec() if generation is GEN2 else gen1_spec(), legacy_nic_layout=True)
    devices = FakeDevices.of_spec(spec)
    before = (dict(devices.devices), dict(devices.netdevs))
    booted = NetworkAdapter(spec.net_devices[0].mac, NicModel.VIRTIO)
    try:
        with pytest.raises(Conflict, match="restart the VM once"):
            await nics.hot_add(devices, NetworkAdapter(MAC, NicModel.VIRTIO), generation)
        with pytest.raises(Conflict, match="restart the VM once"):
            await nics.hot_remove(devices, booted, generation)
        assert (devices.devices, devices.netdevs) == before
    finally:
        devices.close()
