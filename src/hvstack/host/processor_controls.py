"""Processor resource controls of the host's VMs: each running VM's QEMU in a cgroup.

:class:`ProcessorControls` keeps every running VM's QEMU process (all its threads) in
its own cgroup ``hvstack-<service tag>/vm-<id>`` with the CPU settings of
:func:`hvstack.resources.cpu.controls`:

* when a VM turns Running or Paused with a new worker (a start, or a reattach after the
  service restarted) the cgroup is made, set and the process moved in (a state hook);
* a change of the settings of a running VM is written to its cgroup at once (a
  provisioning change hook); a raised reserve is admitted first (a change check);
* when the VM stops (Off, Saved) the cgroup is removed, retried briefly while the
  kernel still calls it busy; at startup cgroups of VMs no longer running are removed;
* a VM starts only if its reserve fits beside the running VMs' (:meth:`check_start`).

Cgroups that cannot be used (no CPU controller, read-only, a write refused) never stop a
VM: the failure is logged, published as a ``vm.processor-controls`` event and shown by
:meth:`status` ("not applied: ..."); the settings stay stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import VmConfig, VmRecord, VmState
from hvstack.errors import HvError, InsufficientResources
from hvstack.host.events import EventBus
from hvstack.resources import cpu
from hvstack.resources.cgroups import Cgroups

log = logging.getLogger(__name__)

FIELDS = ("cpus", "processor_reserve_percent", "processor_limit_percent", "processor_weight")
AT_REST = (VmState.OFF, VmState.SAVED)
REMOVE_DEADLINE = 10.0  # seconds a stopped VM's cgroup may stay busy before we give up
IN_FORCE = "in force"


@dataclass(frozen=True)
class ControlStatus:
    """Whether a VM's processor controls are in force, and if not, why."""

    in_force: bool
    detail: str


def settings_of(config: VmConfig) -> cpu.CpuSettings:
    return cpu.CpuSettings(config.cpus, config.processor_reserve_percent,
                           config.processor_limit_percent, config.processor_weight)


def parent_name(tag: str) -> str:
    """The service's parent cgroup, named by its tag (several services on a machine)."""
    return f"hvstack-{tag}"


class ProcessorControls:
    def __init__(self, cgroups: Cgroups, host_cpus: int, events: EventBus,
                 vms: Callable[[], Iterable[VmController]]) -> None:
        self.cgroups = cgroups
        self.host_cpus = host_cpus
        self._events = events
        self._vms = vms
        self._placed: dict[str, int] = {}  # VM id -> the pid moved into its cgroup
        self._failed: dict[str, str] = {}  # VM id -> why its controls are not in force
        self._removing: dict[str, asyncio.Task[None]] = {}

    # -- what clients see ------------------------------------------------------------

    def summary(self) -> str:
        return self.cgroups.summary()

    def status(self, record: VmRecord) -> ControlStatus:
        failed = self._failed.get(record.id)
        if failed is not None:
            return ControlStatus(False, f"not applied: {failed}")
        if record.id in self._placed and record.state not in AT_REST:
            return ControlStatus(True, IN_FORCE)
        reason = self.cgroups.unusable()
        if reason is not None:
            return ControlStatus(False, f"not applied: {reason}")
        return ControlStatus(False, "applied when the VM starts")

    # -- admission of reserves -------------------------------------------------------

    def _running_settings(self, but: str) -> list[cpu.CpuSettings]:
        return [settings_of(vm.record.config) for vm in self._vms()
                if vm.record.id != but and vm.state not in AT_REST]

    def _admit(self, record: VmRecord, config: VmConfig, doing: str) -> None:
        admission = cpu.admit(settings_of(config), self._running_settings(record.id),
                              self.host_cpus)
        if admission.fits:
            return
        raise InsufficientResources(
            f"cannot {doing}: it reserves {config.processor_reserve_percent}% of its "
            f"{config.cpus} processor(s), {admission.wanted:g} host processor(s), and the "
            f"running VMs reserve {admission.reserved:g} of this host's "
            f"{self.host_cpus} ({admission.left:g} left); lower a processor reserve",
            vm=record.name, reserve_percent=config.processor_reserve_percent,
            reserved=round(admission.reserved, 3), host_cpus=self.host_cpus)

    def check_start(self, record: VmRecord) -> None:
        """InsufficientResources if ``record``'s reserve does not fit beside the
        running VMs' reserves."""
        if record.config.processor_reserve_percent:
            self._admit(record, record.config, f"start VM '{record.name}'")

    def check_change(self, vm: VmController, new: VmConfig) -> None:
        """A running VM's reserve may be raised only as far as the host has room."""
        old = vm.record.config
        if vm.state in AT_REST or (
                cpu.reserved_processors(new.processor_reserve_percent, new.cpus)
                <= cpu.reserved_processors(old.processor_reserve_percent, old.cpus)):
            return
        self._admit(vm.record, new, f"raise the processor reserve of VM '{vm.record.name}'")

    # -- applying --------------------------------------------------------------------

    def _controls(self, config: VmConfig) -> cpu.CpuControls:
        return cpu.controls(settings_of(config), self.host_cpus)

    def on_state(self, record: VmRecord) -> None:
        """The registry's state hook: place a new worker, remove a stopped VM's cgroup."""
        if record.state in AT_REST:
            self._placed.pop(record.id, None)
            self._failed.pop(record.id, None)
            self._schedule_removal(record.id, record.name)
        elif (record.state in (VmState.RUNNING, VmState.PAUSED) and record.pid is not None
              and self._placed.get(record.id) != record.pid):
            self._place(record, record.pid)

    def _place(self, record: VmRecord, pid: int) -> None:
        pending = self._removing.pop(record.id, None)
        if pending is not None:
            pending.cancel()  # the VM runs again: its cgroup stays
        self._placed[record.id] = pid
        try:
            self.cgroups.place(record.id, pid, self._controls(record.config))
        except HvError as exc:
            self._not_applied(record, exc)
            return
        self._applied(record)

    async def on_change(self, vm: VmController, old: VmConfig, new: VmConfig) -> None:
        """Provisioning's change hook: write a running VM's changed settings."""
        record = vm.record
        if (record.id not in self._placed or record.state in AT_REST
                or all(getattr(old, f) == getattr(new, f) for f in FIELDS)):
            return
        try:
            if record.id in self._failed:  # not in its cgroup yet: try the whole way
                self.cgroups.place(record.id, self._placed[record.id], self._controls(new))
            else:
                self.cgroups.apply(record.id, self._controls(new))
        except HvError as exc:
            self._not_applied(record, exc)
            return
        self._applied(record, changed=True)

    def _applied(self, record: VmRecord, *, changed: bool = False) -> None:
        was_failing = self._failed.pop(record.id, None) is not None
        if was_failing or changed:
            self._publish(record, IN_FORCE)

    def _not_applied(self, record: VmRecord, exc: HvError) -> None:
        settings = settings_of(record.config)
        quiet = settings == cpu.CpuSettings(settings.cpus)  # nothing asked for
        (log.info if quiet else log.warning)(
            "VM %s: processor resource controls not applied (the VM runs without them): %s",
            record.name, exc.message)
        if self._failed.get(record.id) != exc.message:
            self._failed[record.id] = exc.message
            self._publish(record, f"not applied: {exc.message}")

    def _publish(self, record: VmRecord, detail: str) -> None:
        self._events.publish("vm.processor-controls", vm=record.name, id=record.id,
                             in_force=detail == IN_FORCE, detail=detail)

    # -- removing --------------------------------------------------------------------

    def removal_pending(self, vm_id: str) -> bool:
        """Whether the removal of the VM's cgroup is being retried."""
        return vm_id in self._removing

    def _schedule_removal(self, vm_id: str, name: str) -> None:
        if vm_id in self._removing or self._remove_now(vm_id, name):
            return
        task = asyncio.get_running_loop().create_task(
            self._remove(vm_id, name), name=f"cgroup-remove-{vm_id}")
        self._removing[vm_id] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._removing.get(vm_id) is done:
                del self._removing[vm_id]

        task.add_done_callback(forget)

    def _remove_now(self, vm_id: str, name: str) -> bool:
        """One try; True when done (gone, or failed for good: logged)."""
        try:
            return self.cgroups.remove(vm_id)
        except HvError as exc:
            log.warning("VM %s: %s", name, exc.message)
            return True

    async def _remove(self, vm_id: str, name: str) -> None:
        """Retry while the kernel calls the cgroup busy (its last process exiting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REMOVE_DEADLINE
        delay = 0.01
        while not self._remove_now(vm_id, name):
            if loop.time() > deadline:
                log.warning("VM %s: its cgroup is still busy after %.0f s; left in place",
                            name, REMOVE_DEADLINE)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    def startup(self, records: Iterable[VmRecord]) -> None:
        """After reattaching: remove the cgroups of VMs that no longer run."""
        known = list(records)
        running = {r.id for r in known if r.state not in AT_REST}
        names = {r.id: r.name for r in known}
        for vm_id in self.cgroups.vm_ids():
            if vm_id not in running:
                self._schedule_removal(vm_id, names.get(vm_id, vm_id))

    async def close(self) -> None:
        """Wait for removals under way; remove the service's parent if it is empty."""
        await asyncio.gather(*self._removing.values(), return_exceptions=True)
        if not self._placed:
            self.cgroups.remove_parent()
