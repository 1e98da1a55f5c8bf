"""Integration services on the host side: heartbeat and time synchronisation.

One :class:`GuestLink` runs per running VM. It pings the guest agent every
:data:`HEARTBEAT_INTERVAL` seconds (2 s until it answers) and turns the answers into
Hyper-V's statuses with the pure :func:`next_status`: OK, No Contact (never answered
since the VM started), Lost Communication (answered before, not now), Disabled. When
contact is made it sets the guest clock and calls the host's contact hooks (the KVP
pool is pushed there); while contact lasts it sets the clock every
:data:`TIME_SYNC_INTERVAL` seconds.

The VM's controller runs the link while its worker runs and asks it whether the agent
answers; it gets the link from the host service (``make_link``), as a
:class:`~hvstack.compute.lifecycle.AgentLink`, so compute never imports this package.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from hvstack.compute.model import IntegrationServices, ServiceStatus
from hvstack.errors import HvError
from hvstack.hypervisor.qemu.agent import GuestAgent

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5.0
HEARTBEAT_TIMEOUT = 3.0
TIME_SYNC_INTERVAL = 600.0


def next_status(enabled: bool, answered: bool, previous: ServiceStatus) -> ServiceStatus:
    """The heartbeat status after one ping."""
    if not enabled:
        return ServiceStatus.DISABLED
    if answered:
        return ServiceStatus.OK
    if previous in (ServiceStatus.OK, ServiceStatus.LOST_COMMUNICATION):
        return ServiceStatus.LOST_COMMUNICATION
    return ServiceStatus.NO_CONTACT


def service_status(enabled: bool, agent: ServiceStatus) -> ServiceStatus:
    """A service other than heartbeat works when it is enabled and the agent answers."""
    if not enabled:
        return ServiceStatus.DISABLED
    return agent if agent is not ServiceStatus.DISABLED else ServiceStatus.NO_CONTACT


class GuestLink:
    def __init__(
        self,
        agent: GuestAgent,
        settings: Callable[[], IntegrationServices],
        guest_running: Callable[[], bool],
        on_status: Callable[[ServiceStatus, ServiceStatus], None],
        on_contact: Callable[[], Awaitable[None]],
    ) -> None:
        self.agent = agent
        self.status = ServiceStatus.NO_CONTACT
        self.last_contact: float | None = None
        self._settings = settings
        self._guest_running = guest_running
        self._on_status = on_status
        self._on_contact = on_contact
        self._last_sync = 0.0

    async def ping(self) -> bool:
        try:
            await self.agent.call("guest-ping", timeout=HEARTBEAT_TIMEOUT)
        except HvError:
            return False
        return True

    async def sync_time(self) -> bool:
        """Set the guest clock from the host's; False if the guest did not take it."""
        if not self._settings().time_sync:
            return False
        try:
            await self.agent.call("guest-set-time", {"time": time.time_ns()}, timeout=10)
        except HvError as exc:
            log.info("time synchronisation of %s failed: %s", self.agent.vm_name, exc)
            return False
        self._last_sync = time.monotonic()
        return True

    @property
    def heartbeat(self) -> ServiceStatus:
        """The heartbeat service's status, as ``hv vm show`` reports it."""
        return ServiceStatus.DISABLED if not self._settings().heartbeat else self.status

    async def beat(self) -> None:
        """One ping, whether or not heartbeat is enabled (every other service needs to
        know the agent answers); then react to contact made or lost."""
        if not self._guest_running():
            return  # a paused guest cannot answer; that is no loss of contact
        answered = await self.ping()
        if answered:
            self.last_contact = time.time()
        previous = self.status
        self.status = next_status(True, answered, previous)
        if self.status is not previous:
            self._on_status(previous, self.status)
        if self.status is ServiceStatus.OK and previous is not ServiceStatus.OK:
            await self.sync_time()
            await self._on_contact()
        elif self.status is ServiceStatus.OK and (
            time.monotonic() - self._last_sync > TIME_SYNC_INTERVAL
        ):
            await self.sync_time()

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except HvError as exc:
                log.warning("heartbeat of %s: %s", self.agent.vm_name, exc)
            await asyncio.sleep(HEARTBEAT_INTERVAL if self.status is ServiceStatus.OK else 2.0)
