"""Network adapters of a running machine: hot add, hot remove, link up and down.

Talks to the machine through its :class:`~hvstack.hypervisor.capabilities.Devices`
capability only, with the names :mod:`hvstack.hypervisor.spec` derives from an
adapter's MAC (device ``nic-<mac>``, netdev ``net-<mac>``), so an adapter added here is
the same adapter the next start puts in the command line.

- :func:`hot_add`: a switch port's tap descriptor goes to QEMU (``getfd``), then the
  netdev (``netdev_add``), then the device (``device_add``): on a Generation 2 (q35)
  machine on the first free spare root port (``hotplug-port-N``, see
  :meth:`~hvstack.hypervisor.spec.MachineSpec.root_ports`), on Generation 1 on the first
  free slot of the root bus among the adapters' slots
  (:data:`~hvstack.hypervisor.spec.NIC_SLOTS`; a slot any device holds is not free).
  An adapter in switch mode that is not connected gets its link down. The caller
  keeps its own copy of the tap descriptor and closes it afterwards, success or not.
- :func:`hot_remove`: ``device_del``, then wait (generously) for the guest to let go
  (``DEVICE_DELETED``), then ``netdev_del``. A guest that does not let go in time keeps
  the adapter: :class:`~hvstack.errors.OperationTimeout` says so and the netdev stays,
  as the adapter really is still there (the request stays pending in QEMU). When the
  guest lets go later, QEMU says so (``DEVICE_DELETED``, :func:`deleted_adapter`) and
  :func:`finish_removal` drops the netdev left behind.
- :func:`set_link`: cable in or out (``set_link``), for connect and disconnect.
- :func:`read_layout`: where a running machine's adapters sit (Generation 2: their
  root ports; Generation 1: their root-bus slots), for the machine that receives its
  saved state or migration (which must be built the same); :func:`save_layout` keeps
  it beside a saved state (always a file, with a format: a saved state without one is
  release 88d3ce2's), :func:`with_saved_layout` builds the restored machine from it
  (from that release's layout, ``legacy_nic_layout``, when there is none). A machine
  restored so has no room for hot plug until it next starts from Off
  (:func:`runs_legacy_layout`): hot add and remove are refused (Conflict).

A step that fails part-way undoes the steps before it, so the machine is left as it
was; the error says what failed. Cancellation undoes too, and is re-raised.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import replace
from pathlib import Path

from hvstack.compute.model import (
    SWITCH_MODE,
    Generation,
    NetworkAdapter,
    NicModel,
    VmConfig,
)
from hvstack.errors import (
    Conflict,
    HvError,
    HypervisorError,
    InsufficientResources,
    OperationTimeout,
)
from hvstack.hypervisor.capabilities import Devices, DeviceSpec, NetdevSpec
from hvstack.hypervisor.events import DeviceDeleted, QmpEvent
from hvstack.hypervisor.spec import (
    HOTPLUG_PORTS,
    NIC_SLOTS,
    MachineSpec,
    PortLayout,
    hotplug_port_id,
    nic_device_id,
    nic_netdev_id,
    slot_address,
)

log = logging.getLogger(__name__)

REMOVE_TIMEOUT = 120.0
"""Seconds a guest gets to let go of an adapter: a busy or slow (TCG) guest takes a
while to answer the PCIe attention button or the ACPI eject."""

_DRIVERS = {NicModel.E1000: "e1000", NicModel.VIRTIO: "virtio-net-pci"}


def link_up(nic: NetworkAdapter) -> bool:
    """Whether ``nic``'s cable is in: a switch port not connected to a switch is down."""
    return nic.mode != SWITCH_MODE or bool(nic.switch)


def fd_name(nic: NetworkAdapter) -> str:
    """The name the tap descriptor of ``nic`` is given in QEMU (``getfd``)."""
    return f"fd-{nic_netdev_id(nic.mac)}"


async def hot_add(devices: Devices, nic: NetworkAdapter, generation: Generation, *,
                  tap_fd: int | None = None,
                  hotplug_ports: int = HOTPLUG_PORTS) -> str | None:
    """Plug ``nic`` into the running machine; return where it sits: its root port
    (Generation 2) or its slot on the root bus (Generation 1, as ``0x11``).

    ``tap_fd``: the open tap of an adapter in switch mode (required there, refused for
    a user-mode adapter). InsufficientResources when every spare port (slot) is taken;
    HypervisorError when QEMU refuses a step (the earlier ones are undone); Conflict on
    a machine that runs the previous release's layout (:func:`runs_legacy_layout`).
    """
    await _refuse_on_legacy_layout(devices, nic, generation, "add")
    netdev = await _add_netdev(devices, nic, tap_fd)
    try:
        port = await _plug_device(devices, nic, generation, hotplug_ports)
    except BaseException:
        await _undo(devices.remove_netdev(netdev.id), "remove netdev", nic)
        raise
    if not link_up(nic):
        try:
            await devices.set_link(nic_device_id(nic.mac), False)
        except BaseException:
            await _undo(_unplug(devices, nic, REMOVE_TIMEOUT), "unplug", nic)
            raise
    log.info("network adapter %s plugged in%s", nic.mac, f" on {port}" if port else "")
    return port


async def hot_remove(devices: Devices, nic: NetworkAdapter, generation: Generation, *,
                     timeout: float = REMOVE_TIMEOUT,
                     hotplug_ports: int = HOTPLUG_PORTS) -> None:
    """Take ``nic`` out of the running machine once the guest lets go of it.

    OperationTimeout if the guest keeps it past ``timeout`` (it is then still plugged
    in, its host side too); HypervisorError if the guest refuses or QEMU does. An
    adapter whose device is already gone (a removal that finished late) only loses its
    netdev. Conflict on a machine that runs the previous release's layout.
    """
    await _refuse_on_legacy_layout(devices, nic, generation, "remove")
    device_id = nic_device_id(nic.mac)
    try:
        await devices.remove_device(device_id, timeout)
    except OperationTimeout:
        raise OperationTimeout(
            f"the guest did not release network adapter {nic.mac} within {timeout:g} s; "
            "it is still plugged in (the guest may still let go of it later)",
            mac=nic.mac, timeout=timeout) from None
    except HypervisorError as exc:
        if exc.data.get("qmp_class") != "DeviceNotFound":
            raise
        log.info("network adapter %s had left already; removing its netdev", nic.mac)
    try:
        await devices.remove_netdev(nic_netdev_id(nic.mac))
    except HypervisorError as exc:
        if exc.data.get("qmp_class") == "DeviceNotFound":
            return  # nothing left of it
        # Put the adapter back on its host side rather than leave a netdev dangling.
        await _undo(_plug_device(devices, nic, generation, hotplug_ports), "plug back", nic)
        raise HypervisorError(f"network adapter {nic.mac} could not be removed: {exc}",
                              mac=nic.mac) from exc


def deleted_adapter(event: QmpEvent) -> str | None:
    """The MAC of the adapter whose device QEMU deleted (``DEVICE_DELETED`` of a
    ``nic-<mac>`` device: the guest let go of it), else None."""
    deleted = DeviceDeleted.of(event)
    device = deleted.device if deleted is not None else None
    if device is None or not device.startswith("nic-"):
        return None
    return _mac_of(device.removeprefix("nic-"))


async def finish_removal(devices: Devices, mac: str) -> bool:
    """The guest let go of the adapter ``mac``: drop its netdev if a removal that gave
    up waiting (:func:`hot_remove`'s OperationTimeout) left it. True if there was one
    to drop: the adapter is gone only now. False when there was nothing left (a removal
    that finished, which drops its own netdev) or the adapter's device is there (plugged
    back after a failure)."""
    if nic_device_id(mac) in await devices.device_ids():
        return False
    try:
        await devices.remove_netdev(nic_netdev_id(mac))
    except HypervisorError as exc:
        if exc.data.get("qmp_class") == "DeviceNotFound":
            return False
        raise
    log.info("network adapter %s: the guest let go of it late; its netdev is gone too", mac)
    return True


async def set_link(devices: Devices, mac: str, up: bool) -> None:
    """Put the link of the adapter with MAC ``mac`` up (connect) or down (disconnect)."""
    await devices.set_link(nic_device_id(mac), up)


async def read_layout(devices: Devices, hotplug_ports: int = HOTPLUG_PORTS, *,
                      generation: Generation = Generation.GEN2) -> PortLayout:
    """Where the adapters of a running machine sit, read from the machine itself
    (Generation 2: the adapters' own ports it was started with, and the adapter on each
    spare port; Generation 1: the root-bus slot of each adapter). The host keeps it with
    a saved state (or sends it with a migration) and gives it to
    :func:`~hvstack.compute.machine.machine_spec` for the machine that receives that
    state, which must have the same hardware."""
    if generation is Generation.GEN1:
        slots = await devices.root_bus_slots()
        return PortLayout(slots=tuple(
            (mac, slot) for slot, device in sorted(slots.items())
            if device.startswith("nic-") and (mac := _mac_of(device.removeprefix("nic-")))
        ))
    own = [_mac_of(i.removeprefix("port-")) for i in await devices.device_ids()
           if i.startswith("port-")]
    layout = PortLayout.at_launch(m for m in own if m)
    for index in range(hotplug_ports):
        port = hotplug_port_id(index)
        for device in await devices.devices_on(port):
            mac = _mac_of(device.removeprefix("nic-")) if device.startswith("nic-") else None
            if mac:
                layout = layout.plugged(mac, port)
    return layout


LAYOUT_FORMAT = 2
"""The ``format`` of the layout file every save of this release writes. Release 88d3ce2
(before adapters had root ports and fixed slots) wrote none: a saved state without one
is that release's, restored on its hardware (``legacy_nic_layout``)."""


async def runs_legacy_layout(devices: Devices, generation: Generation) -> bool:
    """Whether the running machine has its adapters where release 88d3ce2 put them (it
    was restored from a state that release saved): Generation 2 without any root port
    of an adapter or for hot plug, Generation 1 with an adapter on a slot outside
    :data:`~hvstack.hypervisor.spec.NIC_SLOTS`. Such a machine has no place for hot
    plug; it gets this release's layout when it next starts from Off."""
    ids = await devices.device_ids()
    if generation is Generation.GEN2:
        return not any(i.startswith(("port-", "hotplug-port-")) for i in ids)
    on_slots = {device for slot, device in (await devices.root_bus_slots()).items()
                if slot in NIC_SLOTS}
    return any(i.startswith("nic-") and i not in on_slots for i in ids)


async def save_layout(devices: Devices, config: VmConfig, path: Path) -> None:
    """Before a machine's state is saved: keep in ``path`` how its adapters sit, always
    (its ``format`` tells a state this release saved from one of release 88d3ce2): the
    layout when hot plug moved them from where the settings put them, that the machine
    runs the previous release's layout (restored from its state, not restarted since),
    or nothing more (the settings build the same machine)."""
    path.unlink(missing_ok=True)
    kept: dict[str, object] = {"format": LAYOUT_FORMAT}
    if await runs_legacy_layout(devices, config.generation):
        kept["legacy_nic_layout"] = True
    else:
        macs = [n.mac for n in config.network_adapters]
        layout = await read_layout(devices, generation=config.generation)
        planned = (PortLayout.slotted(macs) if config.generation is Generation.GEN1
                   else PortLayout.at_launch(macs))
        if layout != planned:
            kept |= layout.to_json()
    path.write_text(json.dumps(kept))


def with_saved_layout(spec: MachineSpec, path: Path) -> MachineSpec:
    """``spec`` laid out as the machine whose state was saved beside ``path`` was: with
    the layout kept there, or ``spec`` itself when the file says the settings build it;
    with ``legacy_nic_layout`` when there is no file (a state release 88d3ce2 saved) or
    the file says so. InvalidInput when the layout has no port for an adapter of the
    settings (adapters changed while the VM was saved)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        log.info("VM %s: its saved state has no layout file (saved by the previous "
                 "release); restoring it on that release's hardware", spec.vm_id)
        return replace(spec, legacy_nic_layout=True)
    try:
        raw = json.loads(text)
        if raw.get("legacy_nic_layout") is True:
            return replace(spec, legacy_nic_layout=True)
        if not raw.keys() & {"own", "hotplugged", "slots"}:
            return spec
        layout = PortLayout.from_json(raw)
    except (ValueError, TypeError, AttributeError) as exc:
        raise HypervisorError(f"the adapter layout kept with the saved state ({path.name}) "
                              f"is unreadable: {exc}") from exc
    return replace(spec, layout=layout)


async def _refuse_on_legacy_layout(devices: Devices, nic: NetworkAdapter,
                                   generation: Generation, doing: str) -> None:
    if await runs_legacy_layout(devices, generation):
        raise Conflict(
            f"cannot {doing} network adapter {nic.mac} while the VM runs: it was restored "
            "from a state saved by the previous release and keeps that release's hardware, "
            "which has no room for hot plug; restart the VM once (shut it down and start "
            "it) to enable hot plug", mac=nic.mac)


def _mac_of(digits: str) -> str | None:
    """``525400aabbcc`` as ``52:54:00:aa:bb:cc`` (None: not twelve hex digits)."""
    if len(digits) != 12 or any(c not in "0123456789abcdef" for c in digits):
        return None
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


async def apply_links(devices: Devices, adapters: Iterable[NetworkAdapter]) -> None:
    """Put down the link of every adapter that is not connected: a machine starts with
    every cable in (QEMU has no option for it), so the host calls this after a start."""
    for nic in adapters:
        if not link_up(nic):
            await set_link(devices, nic.mac, False)


# -- steps ------------------------------------------------------------------------------


async def _add_netdev(devices: Devices, nic: NetworkAdapter, tap_fd: int | None) -> NetdevSpec:
    netdev_id = nic_netdev_id(nic.mac)
    if nic.mode != SWITCH_MODE:
        if tap_fd is not None:
            raise HypervisorError(f"network adapter {nic.mac} is a user-mode NAT adapter; "
                                  "it takes no tap device", mac=nic.mac)
        netdev = NetdevSpec(netdev_id, "user")
        await devices.add_netdev(netdev)
        return netdev
    if tap_fd is None:
        raise HypervisorError(f"network adapter {nic.mac} is a switch port but no tap "
                              "device was opened for it", mac=nic.mac)
    name = fd_name(nic)
    await devices.pass_fd(tap_fd, name)
    netdev = NetdevSpec(netdev_id, "tap", {"fd": name})  # QEMU asks the tap for vnet_hdr
    try:
        await devices.add_netdev(netdev)  # takes the named descriptor over
    except BaseException:
        await _undo(devices.close_fd(name), "close the tap descriptor", nic)
        raise
    return netdev


async def _plug_device(devices: Devices, nic: NetworkAdapter, generation: Generation,
                       hotplug_ports: int) -> str | None:
    properties: dict[str, str | int | float | bool] = {
        "netdev": nic_netdev_id(nic.mac), "mac": nic.mac}
    if generation is Generation.GEN2:
        port = properties["bus"] = await free_port(devices, hotplug_ports)
    else:
        port = properties["addr"] = slot_address(await free_slot(devices))
    await devices.add_device(DeviceSpec(_DRIVERS[nic.model], nic_device_id(nic.mac),
                                        properties))
    return port


async def free_port(devices: Devices, hotplug_ports: int = HOTPLUG_PORTS) -> str:
    """The first spare root port with nothing on it (a device whose removal is still
    pending keeps its port). InsufficientResources when there is none."""
    for index in range(hotplug_ports):
        port = hotplug_port_id(index)
        if not await devices.devices_on(port):
            return port
    raise InsufficientResources(
        f"the VM has no free hot-plug port: {hotplug_ports} adapters can be added while "
        "it runs; restart it to give the added adapters ports of their own",
        ports=hotplug_ports)


async def free_slot(devices: Devices) -> int:
    """Generation 1: the first of the adapters' root-bus slots that no device holds (a
    device whose removal is still pending holds its slot). InsufficientResources when
    there is none."""
    taken = await devices.root_bus_slots()
    for slot in NIC_SLOTS:
        if slot not in taken:
            return slot
    raise InsufficientResources(
        f"the VM has no free slot for another network adapter: a Generation 1 VM has "
        f"room for {len(NIC_SLOTS)}", slots=len(NIC_SLOTS))


async def _unplug(devices: Devices, nic: NetworkAdapter, timeout: float) -> None:
    await devices.remove_device(nic_device_id(nic.mac), timeout)
    await devices.remove_netdev(nic_netdev_id(nic.mac))


async def _undo(step: Awaitable[object], what: str, nic: NetworkAdapter) -> None:
    """Run an undo step after a failure; its own failure is logged, not raised (the
    first error is the one the caller needs), and never hides a cancellation."""
    try:
        await step
    except HvError as exc:
        log.warning("network adapter %s: could not %s after a failure: %s",
                    nic.mac, what, exc)

