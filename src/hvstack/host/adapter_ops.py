"""A VM's network adapters: add, change, remove, on a stopped or a running VM.

:class:`AdapterOperations` works in the VM's lock and stores the result through the
VM's settings (compare-and-swap, :meth:`Provisioning.store_config`). A stopped VM's
adapters change in its settings only. On a running (or paused) VM an adapter is hot
added or removed (:class:`NicHotPlug`: the tap opened here, its descriptor handed to
QEMU, the host's copy closed), a connect, disconnect or switch change is the port
re-planned (``update_port``) plus the guest's link set up or down, and a port setting
(VLAN, guards, ACLs, bandwidth, mirroring) is ``update_port`` alone. A step that fails
is undone before the error is raised: the VM keeps the adapters it really has.

A hot remove the guest does not answer in time fails (OperationTimeout) and the
adapter stays in the settings, as it stays in the machine. If the guest lets go of it
later, the VM's controller drops its netdev and calls :meth:`AdapterOperations.gone_late`:
the adapter leaves the settings then (and its port closes), so the settings again say
what the VM has, and a ``vm.adapter-removed`` event tells the user who was told it
timed out.

MACs are unique on the host: a given one is refused when any adapter of any VM has it;
``dynamic`` (or none) takes a free one from the host's pool.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from hvstack.compute import nics
from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import (
    SWITCH_MODE,
    USER_MODE,
    Generation,
    NetworkAdapter,
    NicModel,
    VmState,
)
from hvstack.errors import Conflict, HvError, InvalidInput, InvalidState, NotFound
from hvstack.hypervisor.driver import Machine
from hvstack.network import policy
from hvstack.network.model import MirrorMode, PortAcl, PortSettings, Vlan, parse_mac

if TYPE_CHECKING:
    from hvstack.host.network_ops import NetworkOperations

log = logging.getLogger(__name__)

_STOPPED = (VmState.OFF,)
_RUNNING = (VmState.RUNNING, VmState.PAUSED)


class NicHotPlug(Protocol):
    """Adding and removing a NIC of a running machine (compute/nics.py)."""

    async def add(self, machine: Machine, nic: NetworkAdapter, generation: Generation,
                  tap_fd: int | None) -> None: ...

    async def remove(self, machine: Machine, nic: NetworkAdapter,
                     generation: Generation) -> None: ...

    async def set_link(self, machine: Machine, nic: NetworkAdapter, up: bool) -> None: ...


class MachineHotPlug:
    """Through the machine's Devices capability (:mod:`hvstack.compute.nics`);
    ``remove_timeout``: how long a guest gets to let go of an adapter."""

    def __init__(self, remove_timeout: float = nics.REMOVE_TIMEOUT) -> None:
        self.remove_timeout = remove_timeout

    async def add(self, machine: Machine, nic: NetworkAdapter, generation: Generation,
                  tap_fd: int | None) -> None:
        await nics.hot_add(machine.devices, nic, generation, tap_fd=tap_fd)

    async def remove(self, machine: Machine, nic: NetworkAdapter,
                     generation: Generation) -> None:
        await nics.hot_remove(machine.devices, nic, generation,
                              timeout=self.remove_timeout)

    async def set_link(self, machine: Machine, nic: NetworkAdapter, up: bool) -> None:
        await nics.set_link(machine.devices, nic.mac, up)


@dataclass(frozen=True)
class AdapterChange:
    """What a request changes of an adapter; None leaves a field as it is.

    ``switch``: a switch's name or id, "" for not connected; ``mode`` "user" puts
    the adapter in user-mode NAT; ``mac`` an address or "dynamic"; a rate of 0
    removes that limit."""

    switch: str | None = None
    mode: str | None = None
    mac: str | None = None
    model: NicModel | None = None
    vlan: Vlan | None = None
    mac_spoofing: bool | None = None
    dhcp_guard: bool | None = None
    router_guard: bool | None = None
    acls: tuple[PortAcl, ...] | None = None
    bandwidth_max: int | None = None
    bandwidth_min: int | None = None
    mirror: MirrorMode | None = None

    def port(self, settings: PortSettings) -> PortSettings:
        changes = {k: getattr(self, k) for k in (
            "vlan", "mac_spoofing", "dhcp_guard", "router_guard", "acls", "mirror")
            if getattr(self, k) is not None}
        for rate in ("bandwidth_max", "bandwidth_min"):
            value = getattr(self, rate)
            if value is not None:
                changes[rate] = value or None
        new = replace(settings, **changes)
        if new.bandwidth_max and new.bandwidth_min and new.bandwidth_min > new.bandwidth_max:
            raise InvalidInput("minimum bandwidth is above the maximum bandwidth")
        return new

    @property
    def touches_port(self) -> bool:
        return any(getattr(self, k) is not None for k in (
            "vlan", "mac_spoofing", "dhcp_guard", "router_guard", "acls", "bandwidth_max",
            "bandwidth_min", "mirror"))


class AdapterOperations:
    def __init__(self, network: NetworkOperations, hot_plug: NicHotPlug | None) -> None:
        self.network = network
        self.hot_plug: NicHotPlug = hot_plug or MachineHotPlug()

    def of(self, ref: str) -> tuple[VmController, tuple[NetworkAdapter, ...]]:
        vm = self.network.service.get_vm(ref)
        return vm, vm.record.config.network_adapters

    @staticmethod
    def find(vm: VmController, mac: str) -> NetworkAdapter:
        wanted = mac.strip().lower().replace("-", ":")
        for nic in vm.record.config.network_adapters:
            if nic.mac == wanted:
                return nic
        raise NotFound(f"VM '{vm.record.name}' has no network adapter with MAC '{mac}'",
                       vm=vm.record.name, mac=mac)

    def _mac(self, wanted: str | None) -> tuple[str, bool]:
        """The MAC to give: a free one of the pool for None or "dynamic", else the
        one given, if no adapter of the host has it."""
        owners = self.network.macs()
        if wanted is None or wanted.strip().lower() == "dynamic":
            return policy.allocate_mac(self.network.pool, set(owners)), True
        mac = parse_mac(wanted)
        if mac in owners:
            raise Conflict(f"MAC address {mac} is already used by VM '{owners[mac]}'",
                           mac=mac)
        return mac, False

    def _connection(self, vm: VmController, change: AdapterChange,
                    current: NetworkAdapter | None) -> tuple[str, str]:
        """(mode, switch id) after ``change``."""
        if change.mode not in (None, USER_MODE, SWITCH_MODE):
            raise InvalidInput(f"adapter mode '{change.mode}' is not user or switch")
        if change.mode == USER_MODE:
            if change.switch:
                raise InvalidInput("a user-mode NAT adapter is connected to no switch")
            return USER_MODE, ""
        if change.switch is not None:
            if change.switch == "":  # a running VM's port: _apply_port requires it
                return SWITCH_MODE, ""
            self.network.require(f"connect VM '{vm.record.name}' to a switch")
            return SWITCH_MODE, self.network.get(change.switch).id
        if change.mode == SWITCH_MODE:
            self.network.require(f"give VM '{vm.record.name}' an adapter on a switch")
            return SWITCH_MODE, current.switch if current else ""
        if current is not None:
            return current.mode, current.switch
        default = self.network.default_switch()
        if default is not None and self.network.unavailable is None:
            return SWITCH_MODE, default.id
        return USER_MODE, ""

    def _check_mirror(self, vm: VmController, nic: NetworkAdapter) -> None:
        if nic.port.mirror is not MirrorMode.DESTINATION or not nic.switch:
            return
        for other_vm, other in self.network.ports_of(nic.switch):
            if other.mac != nic.mac and other.port.mirror is MirrorMode.DESTINATION:
                raise Conflict(f"switch '{self.network.name_of(nic.switch)}' already has "
                               f"a mirror destination: adapter {other.mac} of VM "
                               f"'{other_vm.record.name}'")

    def _build(self, vm: VmController, change: AdapterChange,
               current: NetworkAdapter | None) -> NetworkAdapter:
        mode, switch = self._connection(vm, change, current)
        port = change.port(current.port if current else PortSettings())
        if mode == USER_MODE and port != PortSettings():
            raise InvalidInput("port settings (VLAN, guards, ACLs, bandwidth, mirroring) "
                               "apply to an adapter on a switch; this one is in user-mode "
                               "NAT")
        gen1 = vm.record.config.generation is Generation.GEN1
        model = change.model or (current.model if current else
                                 NicModel.E1000 if gen1 else NicModel.VIRTIO)
        if current is not None and change.mac is None:
            mac, dynamic = current.mac, current.dynamic_mac
        elif current is not None and parse_mac_or_dynamic(change.mac or "") == current.mac:
            mac, dynamic = current.mac, False
        else:
            mac, dynamic = self._mac(change.mac)
        nic = NetworkAdapter(mac, model, mode, switch, port, dynamic)
        self._check_mirror(vm, nic)
        return nic

    # -- operations ---------------------------------------------------------------

    async def add(self, ref: str, change: AdapterChange) -> tuple[VmController, NetworkAdapter]:
        vm = self.network.service.get_vm(ref)
        async with vm.lock:
            self._require_state(vm, "add a network adapter to", _STOPPED + _RUNNING)
            nic = self._build(vm, change, None)
            config = vm.record.config
            new = replace(config, network_adapters=(*config.network_adapters, nic))
            self.network.service.provisioning.validate(new)
            running = vm.state in _RUNNING
            if running:
                await self._hot_add(vm, nic)
            try:
                await self.network.service.provisioning.store_config(vm, new)
            except BaseException:
                if running:
                    await self._undo(self._hot_remove(vm, nic), vm, "remove the new adapter")
                raise
            if running and nic.switch and nic.port.mirror is MirrorMode.DESTINATION:
                await self.network.refresh_mirrors([nic.switch])
        return vm, nic

    async def change(self, ref: str, mac: str,
                     change: AdapterChange) -> tuple[VmController, NetworkAdapter]:
        vm = self.network.service.get_vm(ref)
        async with vm.lock:
            old = self.find(vm, mac)
            hardware = (change.mac is not None and parse_mac_or_dynamic(change.mac) != old.mac) \
                or (change.model is not None and change.model is not old.model)
            self._require_state(vm, "change the MAC or model of a network adapter of"
                                if hardware else "change a network adapter of",
                                _STOPPED if hardware else _STOPPED + _RUNNING + (VmState.SAVED,))
            moves = (change.mode not in (None, old.mode)
                     or (old.mode == USER_MODE and change.switch is not None))
            if vm.state in _RUNNING and moves:
                raise InvalidState(vm.record.name, vm.state.value,
                                   "move an adapter between user-mode NAT and a switch on",
                                   ["Off"], advice="stop it, or remove the adapter and add "
                                   "another")
            nic = self._build(vm, change, old)
            config = vm.record.config
            new = replace(config, network_adapters=tuple(
                nic if n.mac == old.mac else n for n in config.network_adapters))
            self.network.service.provisioning.validate(new)
            running = vm.state in _RUNNING and nic.mode == SWITCH_MODE and nic != old
            if running:
                await self._apply_port(vm, old, nic)
            try:
                await self.network.service.provisioning.store_config(vm, new)
            except BaseException:
                if running:
                    await self._undo(self._apply_port(vm, nic, old), vm, "restore the port")
                raise
            if vm.machine_running and MirrorMode.DESTINATION in (old.port.mirror,
                                                                 nic.port.mirror):
                await self.network.refresh_mirrors(s for s in (old.switch, nic.switch) if s)
        return vm, nic

    async def remove(self, ref: str, mac: str) -> VmController:
        vm = self.network.service.get_vm(ref)
        async with vm.lock:
            old = self.find(vm, mac)
            self._require_state(vm, "remove a network adapter of", _STOPPED + _RUNNING)
            config = vm.record.config
            new = replace(config, network_adapters=tuple(
                n for n in config.network_adapters if n.mac != old.mac))
            if vm.state in _RUNNING:
                await self._hot_remove(vm, old)
            await self.network.service.provisioning.store_config(vm, new)
            if old.switch and old.port.mirror is MirrorMode.DESTINATION:
                await self.network.refresh_mirrors([old.switch])
        return vm

    async def gone_late(self, vm: VmController, mac: str) -> None:
        """The guest of ``vm`` let go of adapter ``mac`` after its hot remove (or the
        undo of a hot add) gave up waiting; the caller holds ``vm.lock`` and has dropped
        its netdev. The adapter leaves the settings, its port closes."""
        config = vm.record.config
        nic = next((n for n in config.network_adapters if n.mac == mac), None)
        if nic is not None:
            await self.network.service.provisioning.store_config(vm, replace(
                config, network_adapters=tuple(n for n in config.network_adapters
                                               if n.mac != mac)))
            log.info("VM %s: network adapter %s was let go of late and is removed",
                     vm.record.name, mac)
            self.network.service.events.publish("vm.adapter-removed", vm=vm.record.name,
                                                id=vm.record.id, mac=mac, late=True)
        # A hot add undone after a failure never reached the settings: its port may be
        # open all the same.
        if (nic is None or nic.mode == SWITCH_MODE) and self.network.unavailable is None:
            await self.network.close_ports(vm.record.id, [mac])
        if nic is not None and nic.switch and nic.port.mirror is MirrorMode.DESTINATION:
            await self.network.refresh_mirrors([nic.switch])

    async def disconnect_all(self, switch_id: str) -> list[dict[str, str]]:
        """Disconnect every adapter on ``switch_id`` (a switch deleted with force)."""
        done = []
        for vm, nic in self.network.ports_of(switch_id):
            await self.change(vm.record.id, nic.mac, AdapterChange(switch=""))
            done.append({"vm": vm.record.name, "mac": nic.mac})
        return done

    # -- steps --------------------------------------------------------------------

    @staticmethod
    def _require_state(vm: VmController, doing: str, allowed: tuple[VmState, ...]) -> None:
        if vm.state not in allowed:
            raise InvalidState(vm.record.name, vm.state.value, doing,
                               [s.value for s in allowed])

    async def _hot_add(self, vm: VmController, nic: NetworkAdapter) -> None:
        machine = vm.running_machine()
        if nic.mode != SWITCH_MODE:
            await self.hot_plug.add(machine, nic, vm.record.config.generation, None)
            return
        plan = self.network.port_plan(vm.record.id, vm.record.name, nic)
        fd = await self.network.backend_for("hot add an adapter").open_port(plan)
        try:
            await self.hot_plug.add(machine, nic, vm.record.config.generation, fd)
        except BaseException:
            await self.network.close_ports(vm.record.id, [nic.mac])
            raise
        finally:
            os.close(fd)  # QEMU has its own copy now (or never will)

    async def _hot_remove(self, vm: VmController, nic: NetworkAdapter) -> None:
        await self.hot_plug.remove(vm.running_machine(), nic, vm.record.config.generation)
        if nic.mode == SWITCH_MODE:
            await self.network.close_ports(vm.record.id, [nic.mac])

    async def _apply_port(self, vm: VmController, old: NetworkAdapter,
                          new: NetworkAdapter) -> None:
        backend = self.network.backend_for(f"change the port of VM '{vm.record.name}'")
        await backend.update_port(self.network.port_plan(vm.record.id, vm.record.name, new))
        if bool(old.switch) != bool(new.switch):
            try:
                await self.hot_plug.set_link(vm.running_machine(), new, bool(new.switch))
            except BaseException:
                with contextlib.suppress(HvError):
                    await backend.update_port(
                        self.network.port_plan(vm.record.id, vm.record.name, old))
                raise

    @staticmethod
    async def _undo(step: Awaitable[None], vm: VmController, what: str) -> None:
        try:
            await step
        except HvError as exc:
            log.error("VM %s: cannot %s after a failure: %s", vm.record.name, what, exc)


def parse_mac_or_dynamic(text: str) -> str:
    return "dynamic" if text.strip().lower() == "dynamic" else parse_mac(text)
