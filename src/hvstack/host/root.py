"""The host's composition root: the service and every operation object built on it.

:class:`HostRoot` builds the host service (:mod:`hvstack.host.service`) and the
operations that use it (disks, guest, console), and closes them in order: the
operations first (API freezes thawed, console viewers told the service stops), then the
service (automatic stop actions, jobs, the store's last writes). ``hv serve`` and tests
build one; the API only routes requests to it.
"""

from __future__ import annotations

from hvstack.host.config import HostConfig
from hvstack.host.console_ops import ConsoleOperations
from hvstack.host.disk_ops import DiskOperations
from hvstack.host.facts import HostProbe
from hvstack.host.service import HostService
from hvstack.host.store import Store
from hvstack.hypervisor.driver import Driver
from hvstack.integration.ops import GuestOperations, thaw_leftovers
from hvstack.integration.rules import GuestPolicy


class HostRoot:
    def __init__(self, service: HostService, guest_policy: GuestPolicy | None = None) -> None:
        self.service = service
        self.disks = DiskOperations(service)
        self.guest = GuestOperations(service, guest_policy)
        self.console = ConsoleOperations(service)

    @classmethod
    async def start(cls, config: HostConfig, store: Store, driver: Driver,
                    host: HostProbe | None = None,
                    guest_policy: GuestPolicy | None = None) -> HostRoot:
        """Start the service (reattaching to running VMs) and build the operations."""
        service = HostService(config, store, driver, host)
        await service.startup()
        root = cls(service, guest_policy)
        try:
            # A freeze left by a crashed service must not stay.
            await thaw_leftovers(service.list_vms())
        except BaseException:
            await root.close()
            raise
        return root

    async def close(self) -> None:
        try:
            await self.guest.close()
            await self.console.close()
        finally:
            await self.service.shutdown()
