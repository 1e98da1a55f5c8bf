"""The registry: the VMs of this host, each a controller, found by id or by name.

A reference is an id if it has the form of one, else a name (never both, so a name
can't reach another VM). The registry records what this host observes of each VM as it
changes (through :class:`~hvstack.host.records.Writer`, in order; a failure is logged
and the next change writes the whole observation again) and publishes each change as a
``vm.state`` event. A deleted VM's later changes are not recorded.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from hvstack.compute.lifecycle import VmController, VmFiles
from hvstack.compute.machine import BackingFile
from hvstack.compute.model import VmRecord, is_id
from hvstack.errors import AlreadyExists, HvError, NotFound
from hvstack.host.config import HostConfig
from hvstack.host.events import EventBus
from hvstack.host.records import VmRecords, Writer
from hvstack.hypervisor.driver import Driver
from hvstack.hypervisor.spec import MachineSpec
from hvstack.integration.heartbeat import GuestLink

log = logging.getLogger(__name__)


class VmRegistry:
    def __init__(self, config: HostConfig, records: VmRecords, driver: Driver,
                 events: EventBus, spec_for: Callable[[VmRecord, bool], MachineSpec],
                 before_start: Callable[[VmRecord], Awaitable[None]]) -> None:
        self._config = config
        self._records = records
        self._driver = driver
        self._events = events
        self._spec_for = spec_for
        self._before_start = before_start
        self._vms: dict[str, VmController] = {}
        self._names: dict[str, str] = {}
        self._writer = Writer()
        # The checked backing chains of each VM's disks, set before it starts for the
        # QEMU command line built right after.
        self.chains: dict[str, dict[str, tuple[BackingFile, ...]]] = {}
        # Called when a VM's guest agent answers after it did not (boot, reattach):
        # domain operations register here, e.g. to push the KVP pool into the guest.
        self.contact_hooks: list[Callable[[VmController], Awaitable[None]]] = []
        # Called on every change of a VM's state (the network closes its ports when a
        # VM stops); a hook must not raise.
        self.state_hooks: list[Callable[[VmRecord], None]] = []
        # Called, in the VM's lock, with the MAC of an adapter its guest let go of only
        # after the hot remove gave up waiting (the network takes it out of the settings).
        self.adapter_hooks: list[Callable[[VmController, str], Awaitable[None]]] = []

    def files(self, vm_id: str) -> VmFiles:
        return VmFiles(self._config.vms_dir / vm_id, self._config.run_dir / vm_id)

    def register(self, record: VmRecord) -> VmController:
        vm = VmController(
            record, self.files(record.id), self._driver, self._spec_for, self._on_change,
            self._before_start, publish=self._events.publish,
            on_guest_contact=self._on_guest_contact, recorded=self._recorded,
            make_link=GuestLink, on_adapter_gone=self._on_adapter_gone,
        )
        self._vms[record.id] = vm
        self._names[record.name] = record.id
        return vm

    def unregister(self, vm: VmController) -> None:
        del self._vms[vm.record.id]
        del self._names[vm.record.name]
        self.chains.pop(vm.record.id, None)

    def renamed(self, vm: VmController, old_name: str) -> None:
        del self._names[old_name]
        self._names[vm.record.name] = vm.record.id

    def check_free(self, name: str) -> None:
        """AlreadyExists if a VM of this host has ``name`` (the store checks again)."""
        if name in self._names:
            raise AlreadyExists(f"a VM named '{name}' already exists", vm=name)

    def holds(self, vm: VmController) -> bool:
        """Whether ``vm`` is still registered (not deleted meanwhile)."""
        return self._vms.get(vm.record.id) is vm

    def get(self, ref: str) -> VmController:
        if is_id(ref):
            vm = self._vms.get(ref.lower())
            if vm is None:
                raise NotFound(f"no VM with id {ref} exists on this host", vm=ref)
            return vm
        vm_id = self._names.get(ref)
        if vm_id is None:
            raise NotFound(f"no VM named '{ref}' exists on this host", vm=ref)
        return self._vms[vm_id]

    def all(self) -> list[VmController]:
        return list(self._vms.values())

    async def _on_guest_contact(self, vm: VmController) -> None:
        for hook in self.contact_hooks:
            try:
                await hook(vm)
            except HvError as exc:
                log.warning("VM %s: after contact with its guest agent: %s", vm.record.name, exc)

    async def _on_adapter_gone(self, vm: VmController, mac: str) -> None:
        for hook in self.adapter_hooks:
            await hook(vm, mac)

    def persist(self, record: VmRecord) -> None:
        """Queue the write of what this host observes of the VM."""
        if record.id not in self._vms:
            return  # deleted: its observations went with it
        self._writer.write(record.id, functools.partial(self._records.observe, record.id,
                                                        record.observed))

    async def _recorded(self, record: VmRecord) -> None:
        await self._writer.flush(record.id)  # _on_change queued it

    def _on_change(self, record: VmRecord) -> None:
        try:
            self.persist(record)
        finally:  # the change happened (or was undone) even if the store failed
            for hook in self.state_hooks:
                hook(record)
            self._events.publish(
                "vm.state", vm=record.name, id=record.id, state=record.state.value,
                reason=record.state_reason,
            )

    async def flush(self) -> None:
        """Wait until every observation queued so far is in the store."""
        await self._writer.flush()
