"""The real network backend: netlink (bridges, taps, VLANs, uplinks) composed with
nftables (guards, ACLs, NAT), tc (bandwidth, mirroring) and dnsmasq (a NAT switch's
DHCP and DNS).

Contract (see :mod:`.backend`): every operation is idempotent and works in the
network namespace of the calling process; ``ensure_switch`` repairs a switch whose
bridge is gone (after a reboot) or part-made; an operation that fails removes what it
created (bridge, uplink, rules, dnsmasq, tap) and raises the first error. The rules,
shaping and DHCP modules are :mod:`.nft`, :mod:`.tc` and :mod:`.dhcp` unless others
are given (tests inject failures that way).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from hvstack.errors import InvalidInput
from hvstack.network import dhcp, netlink, nft, tc, uplink, vlans
from hvstack.network.backend import AclCounter, InterfaceInfo, PortPlan, SwitchPlan
from hvstack.network.model import SwitchType
from hvstack.network.names import is_ours
from hvstack.network.netlink import write_sysctl
from hvstack.network.policy import host_interface

log = logging.getLogger(__name__)

PROC_SYS = Path("/proc/sys/net")


class Rules(Protocol):
    """:mod:`hvstack.network.nft`."""

    async def apply_switch(self, plan: SwitchPlan) -> None: ...
    async def remove_switch(self, plan: SwitchPlan) -> None: ...
    async def apply_port(self, plan: PortPlan) -> None: ...
    async def remove_port(self, tap: str, table: str) -> None: ...
    async def acl_counters(self, tap: str, table: str) -> tuple[AclCounter, ...]: ...
    async def remove_table(self, table: str) -> None: ...


class Shaping(Protocol):
    """:mod:`hvstack.network.tc`."""

    async def apply_port(self, plan: PortPlan) -> None: ...
    async def clear_port(self, tap: str) -> None: ...


class Dhcp(Protocol):
    """:mod:`hvstack.network.dhcp`."""

    async def start(self, plan: SwitchPlan) -> None: ...
    async def reload(self, plan: SwitchPlan) -> None: ...
    async def stop(self, plan: SwitchPlan) -> None: ...


def tag_of(table: str) -> str:
    """The service tag in a table name (``names.table_name``)."""
    return table.removeprefix("hvstack_")


def host_address(plan: SwitchPlan) -> ipaddress.IPv4Interface | None:
    """The host's address on an internal or NAT switch (the subnet's first address when
    the plan gives a subnet only)."""
    if plan.type not in (SwitchType.INTERNAL, SwitchType.NAT):
        return None
    if plan.host_address is not None:
        return plan.host_address
    return host_interface(plan.subnet) if plan.subnet is not None else None


class LinuxNetwork:
    """:class:`~hvstack.network.backend.NetworkBackend` on a Linux host."""

    def __init__(self, rules: Rules = nft, shaping: Shaping = tc, dhcp_server: Dhcp = dhcp,
                 proc_sys: Path = PROC_SYS) -> None:
        self.rules = rules
        self.shaping = shaping
        self.dhcp = dhcp_server
        self._proc_sys = proc_sys

    # -- host ------------------------------------------------------------------------

    def missing_privilege(self) -> str | None:
        return netlink.missing_privilege()

    async def host_networks(self) -> list[ipaddress.IPv4Network]:
        return await netlink.run(
            lambda ipr: netlink.host_networks(netlink.addresses(ipr), netlink.routes(ipr)))

    async def interface(self, name: str) -> InterfaceInfo:
        def look(ipr: Any) -> InterfaceInfo:
            link = netlink.find(ipr, name)
            if link is None:
                return InterfaceInfo(name, False)
            return InterfaceInfo(name, True, vlans.switch_of(ipr, link.master),
                                 link.kind == "bridge")
        return await netlink.run(look)

    # -- switches --------------------------------------------------------------------

    async def ensure_switch(self, plan: SwitchPlan) -> None:
        fresh = not await netlink.run(lambda ipr: netlink.find(ipr, plan.bridge) is not None)
        try:
            await netlink.run(lambda ipr: self._bridge(ipr, plan))
            if plan.type is SwitchType.PRIVATE:
                # The host is not on it: no address, no IPv6 link-local, and no ARP
                # answers for the host's addresses on other interfaces.
                conf = self._proc_sys / "ipv6/conf" / plan.bridge
                write_sysctl(conf / "disable_ipv6", "1", missing_ok=True)
                write_sysctl(self._proc_sys / "ipv4/conf" / plan.bridge / "arp_ignore", "8")
            if plan.type is SwitchType.NAT:
                write_sysctl(self._proc_sys / "ipv4/ip_forward", "1")
                await self.rules.apply_switch(plan)
                if plan.dhcp is not None:
                    await self.dhcp.start(plan)
        except BaseException:
            if fresh:
                await self._undo(f"switch '{plan.name}'", self._teardown(plan))
            raise

    def _bridge(self, ipr: Any, plan: SwitchPlan) -> None:
        if plan.type is SwitchType.EXTERNAL:
            if not plan.adapter:
                raise InvalidInput(f"external switch '{plan.name}' has no adapter")
            uplink.attach_uplink(ipr, plan.bridge, plan.adapter)
            return
        netlink.ensure_bridge(ipr, plan.bridge)
        address = host_address(plan)
        if address is not None:
            netlink.set_single_address(ipr, plan.bridge, address)

    async def update_hosts(self, plan: SwitchPlan) -> None:
        if plan.type is SwitchType.NAT and plan.dhcp is not None:
            await self.dhcp.reload(plan)

    async def remove_switch(self, plan: SwitchPlan) -> None:
        errors = await self._teardown(plan)
        if errors:
            raise errors[0]

    async def _teardown(self, plan: SwitchPlan) -> list[BaseException]:
        steps: list[Callable[[], Awaitable[None]]] = []
        if plan.type is SwitchType.NAT:
            steps += [lambda: self.dhcp.stop(plan), lambda: self.rules.remove_switch(plan)]
        if plan.type is SwitchType.EXTERNAL and plan.adapter:
            adapter = plan.adapter
            steps.append(lambda: netlink.run(
                lambda ipr: uplink.release_uplink(ipr, plan.bridge, adapter)))
        steps.append(lambda: netlink.run(lambda ipr: vlans.prune(
            ipr, tag_of(plan.table), plan.bridge, empty_only=False)))
        steps.append(lambda: netlink.run(lambda ipr: netlink.delete(ipr, plan.bridge)))
        return await _each(steps)

    async def _undo(self, what: str, undo: Awaitable[list[BaseException]]) -> None:
        for exc in await undo:
            log.error("cleaning up after a failed %s: %s", what, exc)

    # -- ports -----------------------------------------------------------------------

    async def open_port(self, plan: PortPlan) -> int:
        fd, joined = await netlink.run(lambda ipr: self._open_tap(ipr, plan))
        try:
            await self._apply_port(dataclasses.replace(plan, bridge=joined))
        except BaseException:
            os.close(fd)  # the last holder: the kernel removes the tap
            await self._undo(f"port of '{plan.vm_name}'", _each([
                lambda: self.rules.remove_port(plan.tap, plan.table),
                lambda: netlink.run(self._forget_tap(plan.tap, plan.table))]))
            raise
        return fd

    def _open_tap(self, ipr: Any, plan: PortPlan) -> tuple[int, str | None]:
        fd = netlink.open_tap(plan.tap)
        try:
            return fd, vlans.attach_port(ipr, plan, self._proc_sys)
        except BaseException:
            os.close(fd)
            vlans.prune(ipr, tag_of(plan.table))
            raise

    @staticmethod
    def _forget_tap(tap: str, table: str) -> Callable[[Any], None]:
        def forget(ipr: Any) -> None:
            netlink.delete(ipr, tap)
            vlans.prune(ipr, tag_of(table))
        return forget

    async def _apply_port(self, plan: PortPlan) -> None:
        """Rules and shaping; ``plan.bridge`` is the bridge the tap joined (its
        native VLAN's bridge: :mod:`.vlans`)."""
        if plan.bridge is None:
            await self.rules.remove_port(plan.tap, plan.table)
            await self.shaping.clear_port(plan.tap)
            return
        await self.rules.apply_port(plan)
        await self.shaping.apply_port(plan)

    async def update_port(self, plan: PortPlan) -> None:
        joined = await netlink.run(
            lambda ipr: vlans.attach_port(ipr, plan, self._proc_sys))
        await self._apply_port(dataclasses.replace(plan, bridge=joined))

    async def close_port(self, tap: str, table: str) -> None:
        exists = await self.port_exists(tap)
        steps: list[Callable[[], Awaitable[None]]] = [
            lambda: self.rules.remove_port(tap, table)]
        if exists:
            steps += [lambda: self.shaping.clear_port(tap),
                      lambda: netlink.run(self._forget_tap(tap, table))]
        errors = await _each(steps)
        if errors:
            raise errors[0]

    async def port_exists(self, tap: str) -> bool:
        return await netlink.run(lambda ipr: netlink.find(ipr, tap) is not None)

    async def acl_counters(self, tap: str, table: str) -> tuple[AclCounter, ...]:
        return await self.rules.acl_counters(tap, table)

    # -- after a crash ---------------------------------------------------------------

    async def cleanup(self, table: str, keep: set[str]) -> None:
        tag = tag_of(table)
        stale = await netlink.run(lambda ipr: [
            link for link in netlink.links(ipr) if is_ours(tag, link.name)
            and (vlans.parent_of(link) or link.name) not in keep])
        taps = [link.name for link in stale if link.kind not in ("bridge", "veth")]
        bridges = [link for link in stale if link.kind == "bridge"]
        steps: list[Callable[[], Awaitable[None]]] = []
        steps += [functools.partial(self.close_port, tap, table) for tap in taps]
        steps += [functools.partial(netlink.run, functools.partial(_release_bridge, name=b.name,
                                                                   tag=tag))
                  for b in bridges]
        steps.append(lambda: netlink.run(lambda ipr: vlans.prune(ipr, tag)))
        if not keep:
            steps.append(lambda: self.rules.remove_table(table))
        for exc in await _each(steps):
            log.error("cleaning up stale network objects: %s", exc)


def _release_bridge(ipr: Any, *, name: str, tag: str) -> None:
    """Delete a stale bridge; a host adapter in it (a left-over external switch) gets
    the bridge's addresses and routes back first."""
    index = netlink.need(ipr, name).index
    for link in netlink.links(ipr):
        if link.master == index and not is_ours(tag, link.name):
            uplink.release_uplink(ipr, name, link.name)
    netlink.delete(ipr, name)


async def _each(steps: list[Callable[[], Awaitable[None]]]) -> list[BaseException]:
    """Run every step, collecting errors (a cancellation is re-raised at once)."""
    errors: list[BaseException] = []
    for step in steps:
        try:
            await step()
        except Exception as exc:
            errors.append(exc)
    return errors

