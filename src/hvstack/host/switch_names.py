"""The VMs' names in the DHCP and DNS of the host's NAT switches.

A NAT switch's dnsmasq gives each VM on it the VM's own name (as a DNS label,
:mod:`hvstack.network.hostnames`) for its lease and in DNS, whatever name the guest
sends. :meth:`SwitchNames.hosts` is that list for one switch, from the VMs' settings:
:class:`~hvstack.host.network_ops.NetworkOperations` puts it in every switch plan (so
creating, changing and rebuilding a switch at startup apply it), and
:class:`SwitchNames` follows the service's events to push it again whenever a VM is
created, deleted or changed (a rename, an adapter added, removed, connected, moved):
each NAT switch's plan goes to the backend's ``update_hosts``, which tells dnsmasq only
when its names changed. A failure is logged; the next change pushes the whole list.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from hvstack.compute.model import SWITCH_MODE
from hvstack.errors import HvError
from hvstack.host.events import Subscription
from hvstack.network.hostnames import VmPorts, switch_hosts

if TYPE_CHECKING:
    from hvstack.host.network_ops import NetworkOperations

log = logging.getLogger(__name__)

WATCHED = frozenset({"vm.created", "vm.changed", "vm.deleted"})


class SwitchNames:
    def __init__(self, network: NetworkOperations) -> None:
        self.network = network
        self._task: asyncio.Task[None] | None = None

    def hosts(self, switch_id: str) -> tuple[tuple[str, str], ...]:
        """``(MAC, label)`` of the VMs on ``switch_id`` (see
        :func:`~hvstack.network.hostnames.switch_hosts`)."""
        vms = []
        for vm in self.network.service.list_vms():
            record = vm.record
            macs = tuple(n.mac for n in record.config.network_adapters
                         if n.mode == SWITCH_MODE and n.switch == switch_id)
            if macs:
                vms.append(VmPorts(record.name, record.created_at, record.id, macs))
        return switch_hosts(vms)

    def follow(self) -> None:
        """Push the names again after each change of a VM, from now until
        :meth:`close`."""
        if self._task is None:
            events = self.network.service.events.subscribe()
            self._task = asyncio.get_running_loop().create_task(
                self._follow(events), name="switch-names")

    async def _follow(self, events: Subscription) -> None:
        try:
            async for event in events:
                if event.type not in WATCHED:
                    continue
                try:
                    await self.refresh()
                except Exception:  # the next change pushes every name again
                    log.exception("cannot give the NAT switches the VMs' names")
        finally:
            await events.aclose()

    async def refresh(self) -> None:
        """Push the names of every NAT switch with DHCP to the backend."""
        if self.network.unavailable is not None:
            return
        async with self.network.lock:
            for switch in self.network.all():
                plan = self.network.switch_plan(switch)
                if plan.dhcp is None:
                    continue
                try:
                    await self.network.backend_for("name VMs").update_hosts(plan)
                except HvError as exc:
                    log.error("switch %s: cannot give its DHCP and DNS the VMs' names: %s",
                              switch.name, exc)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
