"""The host's composition root: the service and every operation object built on it.

:class:`HostRoot` builds the host service (:mod:`hvstack.host.service`) and the
operations that use it (disks, guest, console, network), and closes them in order: the
operations first (API freezes thawed, console viewers told the service stops), then the
service (automatic stop actions, jobs, the store's last writes), then resource
metering's sampler (it samples the VMs the stop actions save or shut down). ``hv serve``
and tests build one; the API only routes requests to it.
"""

from __future__ import annotations

import importlib
import logging

from hvstack.host.checkpoint_ops import CheckpointOperations
from hvstack.host.config import HostConfig
from hvstack.host.console_ops import ConsoleOperations
from hvstack.host.disk_ops import DiskOperations
from hvstack.host.export_ops import ExportOperations
from hvstack.host.facts import HostProbe
from hvstack.host.import_ops import ImportOperations
from hvstack.host.metering import HostMemory as MeteredHostMemory
from hvstack.host.metering import MemoryReading as MeteredMemory
from hvstack.host.metering import Metering
from hvstack.host.network_ops import NetworkOperations
from hvstack.host.service import HostService
from hvstack.host.storage_move import StorageMoves
from hvstack.host.store import Store
from hvstack.hypervisor.driver import Driver
from hvstack.integration.ops import GuestOperations, thaw_leftovers
from hvstack.integration.rules import GuestPolicy
from hvstack.network.backend import NetworkBackend

log = logging.getLogger(__name__)


def linux_network() -> NetworkBackend | None:
    """The Linux backend (bridges, nftables, tc, dnsmasq), imported only by the
    service that uses it; None, logged, when it cannot be loaded (the service then
    runs without switches, as without privilege)."""
    try:
        module = importlib.import_module("hvstack.network.linux")
        backend: NetworkBackend = module.LinuxNetwork()
    except (ImportError, AttributeError) as exc:
        log.error("the Linux network backend cannot be loaded: %s", exc)
        return None
    return backend


class HostRoot:
    def __init__(self, service: HostService, guest_policy: GuestPolicy | None = None,
                 network: NetworkOperations | None = None) -> None:
        self.service = service
        self.disks = DiskOperations(service)
        self.guest = GuestOperations(service, guest_policy)
        self.console = ConsoleOperations(service)
        self.network = network if network is not None else NetworkOperations(service, None)
        self.checkpoints = CheckpointOperations(service, self.guest)
        self.exports = ExportOperations(service, self.checkpoints, self.guest.freezer)
        self.imports = ImportOperations(service, self.checkpoints, self.network.name_of)
        self.storage_moves = StorageMoves(service, self.checkpoints)
        self.metering = Metering(service, self.network.tap)
        self.metering.memory = self._metered_memory
        self.metering.host_memory = self._metered_host_memory

    def _metered_memory(self, vm_id: str) -> MeteredMemory | None:
        """The dynamic memory balancer's last reading of a running VM, for metering."""
        reading = self.service.memory.reading(vm_id)
        return None if reading is None else MeteredMemory(reading.assigned, reading.demand)

    def _metered_host_memory(self) -> MeteredHostMemory:
        summary = self.service.memory.host_summary()
        return MeteredHostMemory(summary.total, summary.reserved, summary.assigned,
                                 summary.available)

    @classmethod
    async def start(cls, config: HostConfig, store: Store, driver: Driver,
                    host: HostProbe | None = None,
                    guest_policy: GuestPolicy | None = None,
                    network: NetworkBackend | None = None) -> HostRoot:
        """Start the service (reattaching to running VMs), rebuild the switches and
        build the operations. The network's hooks are in place before the service
        starts: an automatic start waits for the switches."""
        service = HostService(config, store, driver, host)
        network_ops = NetworkOperations(service, network)
        await service.startup()
        root = cls(service, guest_policy, network_ops)
        try:
            await network_ops.startup()
            # A freeze left by a crashed service must not stay.
            await thaw_leftovers(service.list_vms())
            # A checkpoint merge a killed service left is finished (a job per VM).
            await root.checkpoints.startup()
            await root.storage_moves.startup()  # moves a crash cut short
            await root.metering.start()
        except BaseException:
            await root.close()
            raise
        return root

    async def close(self) -> None:
        try:
            await self.guest.close()
            await self.console.close()
        finally:
            try:  # the automatic stop actions sample metered VMs on their way out
                await self.service.shutdown()
            finally:
                await self.metering.close()
            await self.network.close()
