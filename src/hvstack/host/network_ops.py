"""Virtual switches of the host: what the store keeps and what the backend realises.

:class:`NetworkOperations` creates, changes and deletes switches (each stored with
compare-and-swap, :class:`~hvstack.host.records.SwitchRecords`, and realised through a
:class:`~hvstack.network.backend.NetworkBackend` plan first: a refused or failed step
leaves neither a stored switch nor a kernel object), keeps NAT mappings, makes the
Default Switch on first start (unless ``--default-switch none`` or the backend lacks
privilege) and rebuilds everything at startup: stale devices removed, every switch
ensured, the ports of running VMs re-applied.

Every VM start and stop goes through :mod:`hvstack.host.port_hooks` (taps opened just
before a start, the host's copies closed after it, ports closed when the VM stops); VM
adapters themselves are :mod:`hvstack.host.adapter_ops`. Both plan ports here
(:meth:`NetworkOperations.port_plan`). The VMs' names in a NAT switch's DHCP and DNS
are :mod:`hvstack.host.switch_names`: in every switch plan, and pushed again after each
change of a VM.

Without privilege (no CAP_NET_ADMIN, or no backend) every switch operation and every
start of a VM with a switch-mode adapter is :class:`~hvstack.errors.NetworkUnavailable`;
new VMs get user-mode NAT adapters, which need none.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import uuid
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import (
    MAX_NOTES_LENGTH,
    SWITCH_MODE,
    Generation,
    NetworkAdapter,
    NicModel,
    ServiceStatus,
    VmConfig,
    VmState,
    is_id,
    validate_name,
)
from hvstack.errors import (
    AlreadyExists,
    Conflict,
    HvError,
    InvalidInput,
    NetworkUnavailable,
    NotFound,
)
from hvstack.host.adapter_ops import AdapterOperations, NicHotPlug
from hvstack.host.port_hooks import PortHooks
from hvstack.host.provisioning import NewVm
from hvstack.host.records import StoredSwitch, SwitchRecords
from hvstack.host.service import HostService
from hvstack.host.switch_names import SwitchNames
from hvstack.integration.rules import intrinsic_data, reachable_addresses
from hvstack.network import names, policy
from hvstack.network.backend import AclCounter, DhcpPlan, NetworkBackend, PortPlan, SwitchPlan
from hvstack.network.model import (
    MirrorMode,
    NatMapping,
    NatProtocol,
    Switch,
    SwitchType,
    check_port,
    parse_subnet,
)

log = logging.getLogger(__name__)

DEFAULT_SWITCH = "Default Switch"
DNS_DOMAIN = "hv.internal"  # VMs on a NAT switch resolve as NAME and NAME.hv.internal
AGENT_TIMEOUT = 5.0
NO_BACKEND = "its network backend could not be loaded"


class NetworkOperations:
    def __init__(self, service: HostService, backend: NetworkBackend | None,
                 hot_plug: NicHotPlug | None = None) -> None:
        self.service = service
        self.backend = backend
        self.tag = names.service_tag(str(service.config.data_dir))
        self.table = names.table_name(self.tag)
        self.pool = policy.MacPool.parse(service.config.mac_pool)
        self.records = SwitchRecords(service.store)
        self.unavailable: str | None = (NO_BACKEND if backend is None
                                        else backend.missing_privilege())
        self._switches: dict[str, StoredSwitch] = {}
        self._lock = asyncio.Lock()  # one switch change at a time
        self.ready = asyncio.Event()  # set once startup rebuilt the switches
        self.adapters = AdapterOperations(self, hot_plug)
        self.hooks = PortHooks(self)
        self.names = SwitchNames(self)
        service.start_hook = self.hooks
        service.registry.state_hooks.append(self.hooks.on_state)
        service.provisioning.choose_adapters = self.choose_adapters

    # -- lookups ------------------------------------------------------------------

    @property
    def lock(self) -> asyncio.Lock:
        """Held by every switch change (and by the names pushed to the switches)."""
        return self._lock

    @property
    def _backend(self) -> NetworkBackend:
        assert self.backend is not None  # callers checked require()
        return self.backend

    def require(self, doing: str) -> None:
        """NetworkUnavailable if this service cannot manage network devices."""
        if self.unavailable is not None:
            raise NetworkUnavailable(doing, self.unavailable)

    def backend_for(self, doing: str) -> NetworkBackend:
        self.require(doing)
        return self._backend

    def get(self, ref: str) -> Switch:
        return self._stored(ref).switch

    def _stored(self, ref: str) -> StoredSwitch:
        """The switch ``ref`` names: an id if it has the form of one, else a name."""
        if is_id(ref):
            found = self._switches.get(ref.lower())
            if found is None:
                raise NotFound(f"no switch with id {ref} exists on this host", switch=ref)
            return found
        for stored in self._switches.values():
            if stored.switch.name == ref:
                return stored
        raise NotFound(f"no switch named '{ref}' exists on this host", switch=ref)

    def all(self) -> list[Switch]:
        return sorted((s.switch for s in self._switches.values()), key=lambda s: s.name)

    def name_of(self, switch_id: str) -> str | None:
        stored = self._switches.get(switch_id)
        return stored.switch.name if stored else None

    def default_switch(self) -> Switch | None:
        return next((s.switch for s in self._switches.values() if s.switch.default), None)

    def ports_of(self, switch_id: str) -> list[tuple[VmController, NetworkAdapter]]:
        return [(vm, nic) for vm in self.service.list_vms()
                for nic in vm.record.config.network_adapters
                if nic.mode == SWITCH_MODE and nic.switch == switch_id]

    def macs(self, but_vm: str | None = None) -> dict[str, str]:
        """Every MAC of every VM of the host (but ``but_vm``): MAC -> VM name."""
        return {nic.mac: vm.record.name for vm in self.service.list_vms()
                if vm.record.id != but_vm for nic in vm.record.config.network_adapters}

    # -- plans --------------------------------------------------------------------

    def switch_plan(self, switch: Switch) -> SwitchPlan:
        interface = (ipaddress.IPv4Interface(switch.host_address)
                     if switch.host_address else None)
        dhcp = None
        if switch.type is SwitchType.NAT and interface is not None:
            first, last = policy.dhcp_range(interface)
            dhcp = DhcpPlan(first, last, DNS_DOMAIN,
                            self.service.config.data_dir / "network" / switch.id,
                            self.names.hosts(switch.id))
        return SwitchPlan(
            switch.id, switch.name, switch.type, names.bridge_name(self.tag, switch.id),
            self.table, adapter=switch.adapter, host_address=interface,
            subnet=(ipaddress.IPv4Network(switch.subnet) if switch.subnet else None),
            mappings=switch.mappings, dhcp=dhcp)

    def tap(self, vm_id: str, mac: str) -> str:
        return names.tap_name(self.tag, vm_id, mac)

    def port_plan(self, vm_id: str, vm_name: str, nic: NetworkAdapter) -> PortPlan:
        """The port of a switch-mode adapter; not connected when its switch is ""
        (or gone)."""
        stored = self._switches.get(nic.switch) if nic.switch else None
        if stored is None:
            return PortPlan(self.tap(vm_id, nic.mac), nic.mac, vm_name, nic.port, self.table)
        mirror_to = None
        if nic.port.mirror is MirrorMode.SOURCE:  # to the destination while its VM runs
            mirror_to = next((self.tap(vm.record.id, other.mac)
                              for vm, other in self.ports_of(nic.switch)
                              if other.port.mirror is MirrorMode.DESTINATION
                              and vm.machine_running), None)
        return PortPlan(self.tap(vm_id, nic.mac), nic.mac, vm_name, nic.port, self.table,
                        bridge=names.bridge_name(self.tag, nic.switch),
                        switch_type=stored.switch.type, mirror_to=mirror_to)

    # -- switches -----------------------------------------------------------------

    async def create(self, name: str, type_: str, *, adapter: str | None = None,
                     subnet: str | None = None, host_address: str | None = None,
                     notes: str = "", default: bool = False) -> Switch:
        self.require(f"create switch '{name}'")
        validate_name(name, what="switch name")
        _check_notes(notes)
        try:
            kind = SwitchType(type_)
        except ValueError:
            raise InvalidInput(f"switch type '{type_}' is not one of external, internal, "
                               "private, nat", value=type_) from None
        async with self._lock:
            self._check_free(name)
            switch = await self._new_switch(name, kind, adapter, subnet, host_address,
                                            notes, default)
            plan = self.switch_plan(switch)
            await self._backend.ensure_switch(plan)
            try:
                self._switches[switch.id] = await self.records.create(switch)
            except BaseException:
                await self._remove_quietly(plan)
                raise
        self.service.events.publish("switch.created", switch=name, id=switch.id)
        return switch

    def _check_free(self, name: str, but: str | None = None) -> None:
        if any(s.switch.name == name and s.switch.id != but for s in self._switches.values()):
            raise AlreadyExists(f"a switch named '{name}' already exists", switch=name)

    async def _new_switch(self, name: str, kind: SwitchType, adapter: str | None,
                          subnet: str | None, host_address: str | None, notes: str,
                          default: bool) -> Switch:
        switch_id = str(uuid.uuid4())
        if kind is SwitchType.EXTERNAL:
            if not adapter:
                raise InvalidInput("an external switch needs --adapter: the host's network "
                                   "interface it bridges")
            if subnet or host_address:
                raise InvalidInput("an external switch takes no --subnet or --host-address: "
                                   "the adapter keeps its own")
            policy.check_interface_name(adapter)
            info = await self._backend.interface(adapter)
            used = {s.switch.adapter: s.switch.name for s in self._switches.values()
                    if s.switch.adapter}
            policy.check_external_adapter(info, ours=names.is_ours(self.tag, adapter),
                                          used_by=used)
            return Switch(switch_id, name, kind, adapter=adapter, notes=notes)
        if adapter:
            raise InvalidInput(f"only an external switch takes --adapter, not a {kind.value} "
                               "switch")
        if kind is SwitchType.PRIVATE:
            if subnet or host_address:
                raise InvalidInput("a private switch connects VMs only: it takes no "
                                   "--subnet or --host-address")
            return Switch(switch_id, name, kind, notes=notes)
        net = await self._subnet(kind, subnet, host_address)
        if net is None:  # an internal switch without addresses: the host is linked only
            return Switch(switch_id, name, kind, notes=notes)
        interface = policy.host_interface(net, host_address)
        return Switch(switch_id, name, kind, subnet=str(net), host_address=str(interface),
                      notes=notes, default=default)

    async def _subnet(self, kind: SwitchType, subnet: str | None,
                      host_address: str | None) -> ipaddress.IPv4Network | None:
        others = {s.switch.name: ipaddress.IPv4Network(s.switch.subnet)
                  for s in self._switches.values() if s.switch.subnet}
        ours = set(others.values())
        host = [n for n in await self._backend.host_networks() if n not in ours]
        if subnet:
            net = parse_subnet(subnet)
        elif host_address and "/" in host_address:
            try:
                net = ipaddress.IPv4Interface(host_address.strip()).network
            except ValueError:
                raise InvalidInput(f"host address '{host_address}' is not an IPv4 "
                                   "address", value=host_address) from None
        elif kind is SwitchType.NAT:
            return policy.choose_subnet(host, others.values())
        elif host_address:
            raise InvalidInput("give --subnet with --host-address (or the address with its "
                               "prefix, e.g. 192.168.50.1/24)")
        else:
            return None
        policy.check_overlap(net, others)
        for network in host:
            if network.prefixlen > 0 and net.overlaps(network):
                raise Conflict(f"subnet {net} overlaps the host's network {network}",
                               subnet=str(net))
        return net

    async def _remove_quietly(self, plan: SwitchPlan) -> None:
        try:
            await self._backend.remove_switch(plan)
        except HvError as exc:
            log.error("switch %s: cannot remove it again: %s", plan.name, exc)

    async def change(self, ref: str, *, name: str | None = None, notes: str | None = None,
                     host_address: str | None = None) -> Switch:
        """Rename, change the notes or the host's address of a switch."""
        async with self._lock:
            old = self._stored(ref)
            new = old.switch
            if name is not None and name != new.name:
                validate_name(name, what="switch name")
                self._check_free(name, but=new.id)
                new = replace(new, name=name)
            if notes is not None:
                _check_notes(notes)
                new = replace(new, notes=notes)
            if host_address is not None:
                if new.subnet is None:
                    raise InvalidInput(f"switch '{new.name}' has no subnet: only internal "
                                       "and NAT switches with a subnet have a host address")
                interface = policy.host_interface(ipaddress.IPv4Network(new.subnet),
                                                  host_address)
                if any(m.internal_ip == str(interface.ip) for m in new.mappings):
                    raise Conflict(f"a NAT mapping of switch '{new.name}' points at "
                                   f"{interface.ip}")
                new = replace(new, host_address=str(interface))
            return await self._store_change(old, new)

    async def _store_change(self, old: StoredSwitch, new: Switch) -> Switch:
        """Realise ``new`` (when the kernel's side changes), then store it; the old
        plan is put back when storing fails."""
        realise = self.switch_plan(new) != replace(self.switch_plan(old.switch), name=new.name)
        if realise:
            self.require(f"change switch '{old.switch.name}'")
            await self._backend.ensure_switch(self.switch_plan(new))
        try:
            stored = await self.records.change(old, new)
        except BaseException:
            if realise:
                with contextlib.suppress(HvError):
                    await self._backend.ensure_switch(self.switch_plan(old.switch))
            raise
        self._switches[new.id] = stored
        self.service.events.publish("switch.changed", switch=new.name, id=new.id)
        return new

    async def add_mapping(self, ref: str, protocol: str, external_port: int,
                          internal_ip: str, internal_port: int) -> Switch:
        try:
            proto = NatProtocol(protocol)
        except ValueError:
            raise InvalidInput(f"protocol '{protocol}' is not tcp or udp",
                               value=protocol) from None
        mapping = NatMapping(proto, check_port(external_port, what="external port"),
                             internal_ip.strip(), check_port(internal_port,
                                                             what="internal port"))
        async with self._lock:
            old = self._stored(ref)
            if old.switch.type is not SwitchType.NAT or not old.switch.host_address:
                raise InvalidInput(f"switch '{old.switch.name}' is not a NAT switch: only "
                                   "NAT switches map ports")
            existing = {s.switch.name: s.switch.mappings for s in self._switches.values()}
            policy.check_mapping(mapping, ipaddress.IPv4Interface(old.switch.host_address),
                                 existing)
            new = replace(old.switch, mappings=(*old.switch.mappings, mapping))
            return await self._store_change(old, new)

    async def remove_mapping(self, ref: str, protocol: str, external_port: int) -> Switch:
        async with self._lock:
            old = self._stored(ref)
            left = tuple(m for m in old.switch.mappings
                         if (m.protocol.value, m.external_port) != (protocol, external_port))
            if len(left) == len(old.switch.mappings):
                raise NotFound(f"switch '{old.switch.name}' maps no {protocol} port "
                               f"{external_port}", switch=old.switch.name)
            return await self._store_change(old, replace(old.switch, mappings=left))

    async def delete(self, ref: str, force: bool = False) -> dict[str, Any]:
        """Delete a switch; one VMs use only with ``force``, which disconnects their
        adapters (they stay, not connected)."""
        async with self._lock:
            old = self._stored(ref)
            switch = old.switch
            ports = self.ports_of(switch.id)
            if ports and not force:
                users = sorted({vm.record.name for vm, _ in ports})
                raise Conflict(f"switch '{switch.name}' is in use by {len(ports)} adapter(s) "
                               f"of VM(s) {', '.join(repr(u) for u in users)}; --force "
                               "disconnects them", switch=switch.name, vms=users)
            disconnected = await self.adapters.disconnect_all(switch.id)
            if self.unavailable is None:
                await self._backend.remove_switch(self.switch_plan(switch))
            await self.records.delete(old)
            del self._switches[switch.id]
        self.service.events.publish("switch.deleted", switch=switch.name, id=switch.id)
        return {"deleted": switch.name, "disconnected": disconnected}

    # -- startup ------------------------------------------------------------------

    async def startup(self) -> None:
        """Load the switches; with privilege, make the Default Switch once, remove what
        a crash left, ensure every switch and re-apply the ports of running VMs."""
        try:
            self._switches = {s.switch.id: s for s in await self.records.load()}
            if self.unavailable is not None:
                log.warning("virtual switches are off: %s; new VMs get user-mode NAT "
                            "adapters", self.unavailable)
                return
            await self._make_default_switch()
            await self._rebuild()
            self.names.follow()
        finally:
            self.ready.set()

    async def _make_default_switch(self) -> None:
        if not self.service.config.default_switch or self.default_switch() is not None:
            return
        if await self.records.default_made():
            return  # the user deleted it: it stays deleted
        name = DEFAULT_SWITCH
        while any(s.switch.name == name for s in self._switches.values()):
            name += " (hvstack)"
        try:
            switch = await self.create(name, SwitchType.NAT.value, default=True)
        except HvError as exc:
            log.error("cannot make the Default Switch: %s; new VMs get user-mode NAT "
                      "adapters", exc)
            return
        log.info("made the Default Switch (%s, host address %s)", switch.subnet,
                 switch.host_address)

    async def _rebuild(self) -> None:
        running = [vm for vm in self.service.list_vms() if vm.machine_running]
        keep = {names.bridge_name(self.tag, sid) for sid in self._switches}
        keep |= {self.tap(vm.record.id, nic.mac) for vm in running
                 for nic in vm.record.config.network_adapters if nic.mode == SWITCH_MODE}
        try:
            await self._backend.cleanup(self.table, keep)
        except HvError as exc:
            log.error("cannot remove stale network devices: %s", exc)
        for stored in self._switches.values():
            try:
                await self._backend.ensure_switch(self.switch_plan(stored.switch))
            except HvError as exc:
                log.error("switch %s: cannot rebuild it: %s", stored.switch.name, exc)
        for vm in running:
            for nic in vm.record.config.network_adapters:
                if nic.mode != SWITCH_MODE:
                    continue
                plan = self.port_plan(vm.record.id, vm.record.name, nic)
                try:
                    if await self._backend.port_exists(plan.tap):
                        await self._backend.update_port(plan)
                except HvError as exc:
                    log.error("VM %s: cannot re-apply the port of %s: %s", vm.record.name,
                              nic.mac, exc)

    # -- new VMs ------------------------------------------------------------------

    async def choose_adapters(self, config: VmConfig, new: NewVm) -> tuple[NetworkAdapter, ...]:
        """A new VM's adapters: one per switch asked for, none with ``network``
        False, else one on the Default Switch, else one in user-mode NAT; each with a
        MAC of the pool."""
        if not new.network:
            if new.switches:
                raise InvalidInput("--no-network and --switch exclude each other")
            return ()
        model = NicModel.E1000 if config.generation is Generation.GEN1 else NicModel.VIRTIO
        used = set(self.macs())
        targets: list[str | None] = []
        if new.switches:
            self.require(f"connect VM '{config.name}' to a switch")
            targets = [self.get(ref).id for ref in new.switches]
        else:
            default = self.default_switch()
            targets = [default.id if default and self.unavailable is None else None]
        adapters = []
        for switch_id in targets:
            mac = policy.allocate_mac(self.pool, used)
            used.add(mac)
            adapters.append(NetworkAdapter(mac, model, SWITCH_MODE, switch_id, dynamic_mac=True)
                            if switch_id else NetworkAdapter(mac, model, dynamic_mac=True))
        return tuple(adapters)

    async def refresh_mirrors(self, switch_ids: Iterable[str]) -> None:
        """Plan the mirror source ports of running VMs on ``switch_ids`` again: their
        destination started, stopped, moved or changed."""
        if self.unavailable is not None:
            return
        for switch_id in set(switch_ids):
            for vm, nic in self.ports_of(switch_id):
                if nic.port.mirror is not MirrorMode.SOURCE or not vm.machine_running:
                    continue
                try:
                    await self._backend.update_port(
                        self.port_plan(vm.record.id, vm.record.name, nic))
                except HvError as exc:
                    log.error("VM %s: cannot mirror the port of %s again: %s",
                              vm.record.name, nic.mac, exc)

    async def close_ports(self, vm_id: str, macs: Iterable[str]) -> None:
        for mac in macs:
            try:
                await self._backend.close_port(self.tap(vm_id, mac), self.table)
            except HvError as exc:
                log.error("cannot remove the port of %s: %s", mac, exc)

    async def close(self) -> None:
        """Wait for the port work still under way (the service stops)."""
        await self.names.close()
        await self.hooks.close()

    async def acl_counters(self, vm: VmController, nic: NetworkAdapter
                           ) -> tuple[AclCounter, ...]:
        """What each ACL of a running VM's port matched (none otherwise)."""
        if (nic.mode != SWITCH_MODE or not nic.port.acls or not vm.machine_running
                or self.unavailable is not None):
            return ()
        try:
            return await self._backend.acl_counters(self.tap(vm.record.id, nic.mac),
                                                    self.table)
        except HvError as exc:
            log.warning("VM %s: cannot read the ACL counters of %s: %s", vm.record.name,
                        nic.mac, exc)
            return ()

    # -- guest addresses ------------------------------------------------------------

    async def guest_addresses(self, vm: VmController) -> dict[str, list[str]]:
        """The guest's reachable addresses by adapter MAC, from the guest agent; empty
        while it does not answer."""
        if vm.state is not VmState.RUNNING or vm.link.status is not ServiceStatus.OK:
            return {}
        try:
            answer = await vm.agent.call("guest-network-get-interfaces",
                                         timeout=AGENT_TIMEOUT)
        except HvError as exc:
            log.debug("VM %s: no addresses from the agent: %s", vm.record.name, exc)
            return {}
        found: dict[str, list[str]] = {}
        for info in intrinsic_data({"guest-network-get-interfaces": answer}, {}).adapters:
            if info.mac:
                found.setdefault(info.mac.lower(), []).extend(
                    reachable_addresses([info]))
        return found


def _check_notes(notes: str) -> None:
    if len(notes) > MAX_NOTES_LENGTH:
        raise InvalidInput(f"notes are longer than {MAX_NOTES_LENGTH} characters")
