"""A fake :class:`~hvstack.network.backend.NetworkBackend` for the functional tests.

It keeps what a real host would have (bridges by plan, taps with their port plans,
the host's interfaces and networks) and records every call. It can report missing
privilege (``FakeNetwork(privileged=False)``) and fail on demand: ``fail_on["open_port"]
= HypervisorError(...)`` makes the next call of that name raise (once). A tap's fd is
a real pipe end, so the host's closing of its copy is visible (:meth:`open_fds`).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from hvstack.errors import HvError
from hvstack.network.backend import AclCounter, InterfaceInfo, PortPlan, SwitchPlan


@dataclass
class FakeNetwork:
    privileged: bool = True
    networks: list[ipaddress.IPv4Network] = field(default_factory=lambda: [
        ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv4Network("10.0.2.0/24"),
        ipaddress.IPv4Network("172.16.0.0/24")])
    interfaces: dict[str, InterfaceInfo] = field(default_factory=lambda: {
        "eth0": InterfaceInfo("eth0", True), "eth1": InterfaceInfo("eth1", True),
        "br0": InterfaceInfo("br0", True, is_bridge=True),
        "eth2": InterfaceInfo("eth2", True, master="br0")})
    switches: dict[str, SwitchPlan] = field(default_factory=dict)  # bridge -> plan
    ports: dict[str, PortPlan] = field(default_factory=dict)  # tap -> plan
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, object)
    fail_on: dict[str, HvError] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)  # tap -> our end of its pipe

    def _call(self, name: str, what: str) -> None:
        self.calls.append((name, what))
        error = self.fail_on.pop(name, None)
        if error is not None:
            raise error

    def missing_privilege(self) -> str | None:
        return None if self.privileged else "it lacks CAP_NET_ADMIN"

    async def host_networks(self) -> list[ipaddress.IPv4Network]:
        return list(self.networks) + [p.subnet for p in self.switches.values() if p.subnet]

    async def interface(self, name: str) -> InterfaceInfo:
        return self.interfaces.get(name, InterfaceInfo(name, False))

    async def ensure_switch(self, plan: SwitchPlan) -> None:
        self._call("ensure_switch", plan.bridge)
        self.switches[plan.bridge] = plan

    async def update_hosts(self, plan: SwitchPlan) -> None:
        self._call("update_hosts", plan.bridge)
        if plan.bridge not in self.switches:
            raise HvError(f"bridge {plan.bridge} does not exist")
        self.switches[plan.bridge] = plan

    async def remove_switch(self, plan: SwitchPlan) -> None:
        self._call("remove_switch", plan.bridge)
        self.switches.pop(plan.bridge, None)

    async def open_port(self, plan: PortPlan) -> int:
        self._call("open_port", plan.tap)
        if plan.bridge is not None and plan.bridge not in self.switches:
            raise HvError(f"bridge {plan.bridge} does not exist")
        read, write = os.pipe()
        self.fds[plan.tap] = write
        self.ports[plan.tap] = plan
        return read

    async def update_port(self, plan: PortPlan) -> None:
        self._call("update_port", plan.tap)
        if plan.tap not in self.ports:
            raise HvError(f"tap {plan.tap} does not exist")
        self.ports[plan.tap] = plan

    async def close_port(self, tap: str, table: str) -> None:
        self._call("close_port", tap)
        self.ports.pop(tap, None)
        fd = self.fds.pop(tap, None)
        if fd is not None:
            os.close(fd)

    async def port_exists(self, tap: str) -> bool:
        return tap in self.ports

    async def acl_counters(self, tap: str, table: str) -> tuple[AclCounter, ...]:
        plan = self.ports.get(tap)
        if plan is None:
            return ()
        return tuple(AclCounter(i, a.direction.value, 0, 0)
                     for i, a in enumerate(plan.settings.acls))

    async def cleanup(self, table: str, keep: set[str]) -> None:
        self._call("cleanup", ",".join(sorted(keep)))
        for bridge in [b for b in self.switches if b not in keep]:
            del self.switches[bridge]
        for tap in [t for t in self.ports if t not in keep]:
            del self.ports[tap]

    def open_fds(self, tap: str) -> bool:
        """Whether someone still holds the read end of ``tap``'s pipe: writing to our
        end fails with EPIPE once every reader closed."""
        try:
            os.write(self.fds[tap], b"x")
        except BrokenPipeError:
            return False
        return True

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
