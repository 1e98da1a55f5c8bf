"""Network adapters of a running machine: hot add, hot remove, link up and down.

Talks to the machine through its :class:`~hvstack.hypervisor.capabilities.Devices`
capability only, with the names :mod:`hvstack.hypervisor.spec` derives from an
adapter's MAC (device ``nic-<mac>``, netdev ``net-<mac>``), so an adapter added here is
the same adapter the next start puts in the command line.

- :func:`hot_add`: a switch port's tap descriptor goes to QEMU (``getfd``), then the
  netdev (``netdev_add``), then the device (``device_add``): on a Generation 2 (q35)
  machine on the first free spare root port (``hotplug-port-N``, see
  :meth:`~hvstack.hypervisor.spec.MachineSpec.root_ports`), on Generation 1 on the root
  bus. An adapter in switch mode that is not connected gets its link down. The caller
  keeps its own copy of the tap descriptor and closes it afterwards, success or not.
- :func:`hot_remove`: ``device_del``, then wait (generously) for the guest to let go
  (``DEVICE_DELETED``), then ``netdev_del``. A guest that does not let go in time keeps
  the adapter: :class:`~hvstack.errors.OperationTimeout` says so and the netdev stays,
  as the adapter really is still there (the request stays pending in QEMU).
- :func:`set_link`: cable in or out (``set_link``), for connect and disconnect.
- :func:`read_layout`: where a running Generation 2 machine's adapters sit, for the
  machine that receives its saved state or migration (which must be built the same);
  :func:`save_layout` keeps it beside a saved state, :func:`with_saved_layout` builds
  the restored machine from it.

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
    HvError,
    HypervisorError,
    InsufficientResources,
    OperationTimeout,
)
from hvstack.hypervisor.capabilities import Devices, DeviceSpec, NetdevSpec
from hvstack.hypervisor.spec import (
    HOTPLUG_PORTS,
    MachineSpec,
    PortLayout,
    hotplug_port_id,
    nic_device_id,
    nic_netdev_id,
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
    """Plug ``nic`` into the running machine; return the root port it sits on
    (Generation 2) or None (Generation 1: the root bus).

    ``tap_fd``: the open tap of an adapter in switch mode (required there, refused for
    a user-mode adapter). InsufficientResources when every spare port is taken;
    HypervisorError when QEMU refuses a step (the earlier ones are undone).
    """
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
    netdev.
    """
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


async def set_link(devices: Devices, mac: str, up: bool) -> None:
    """Put the link of the adapter with MAC ``mac`` up (connect) or down (disconnect)."""
    await devices.set_link(nic_device_id(mac), up)


async def read_layout(devices: Devices,
                      hotplug_ports: int = HOTPLUG_PORTS) -> PortLayout:
    """Where the adapters of a running Generation 2 machine sit, read from the machine
    itself: the adapters' own ports it was started with, and the adapter on each spare
    port. The host keeps it with a saved state (or sends it with a migration) and gives
    it to :func:`~hvstack.compute.machine.machine_spec` for the machine that receives
    that state, which must have the same hardware."""
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


async def save_layout(devices: Devices, config: VmConfig, path: Path) -> None:
    """Before a Generation 2 machine's state is saved: keep in ``path`` where its
    adapters sit, if hot plug moved them from where the settings put them (nothing is
    kept otherwise: the settings build the same machine)."""
    path.unlink(missing_ok=True)
    if config.generation is not Generation.GEN2:
        return
    layout = await read_layout(devices)
    if layout != PortLayout.at_launch(n.mac for n in config.network_adapters):
        path.write_text(json.dumps(layout.to_json()))


def with_saved_layout(spec: MachineSpec, path: Path) -> MachineSpec:
    """``spec`` laid out as the machine whose state was saved beside ``path`` was
    (``spec`` itself when nothing was kept). InvalidInput when the layout has no port
    for an adapter of the settings (adapters changed while the VM was saved)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return spec
    try:
        layout = PortLayout.from_json(json.loads(text))
    except (ValueError, TypeError, AttributeError) as exc:
        raise HypervisorError(f"the adapter layout kept with the saved state ({path.name}) "
                              f"is unreadable: {exc}") from exc
    return replace(spec, layout=layout)


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
    port = None
    if generation is Generation.GEN2:
        port = await free_port(devices, hotplug_ports)
        properties["bus"] = port
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

