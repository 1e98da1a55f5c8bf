"""The host service: the VMs of this host, running them, and its own start and stop.

:class:`HostService` is the one place operations enter below the API. It is made of
the registry (:mod:`hvstack.host.registry`: a controller per VM, backed by the store),
provisioning (:mod:`hvstack.host.provisioning`: defining, changing, deleting VMs) and
the host's facts (:mod:`hvstack.host.facts`, injected); it runs long operations as jobs,
publishes every change as an event, and when it starts and stops applies each VM's
automatic start and stop actions as :mod:`hvstack.compute.policy` decides them. The
operation objects built on it are composed in :mod:`hvstack.host.root`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from hvstack.compute import policy
from hvstack.compute.lifecycle import VmController
from hvstack.compute.machine import MachineHost, machine_spec
from hvstack.compute.model import (
    AutoStopAction,
    DiskBus,
    VmConfig,
    VmRecord,
    VmState,
)
from hvstack.compute.policy import StopAction, StopMode
from hvstack.compute.states import Operation
from hvstack.errors import HvError, NotFound
from hvstack.host import cleanup, memory_balancer
from hvstack.host.block_work import BlockWork
from hvstack.host.config import HostConfig
from hvstack.host.disk_use import DiskUse
from hvstack.host.events import EventBus
from hvstack.host.facts import HostFacts, HostProbe, LinuxHost
from hvstack.host.jobs import Job, JobManager, Progress
from hvstack.host.memory_balancer import MemoryBalancer, default_reserve
from hvstack.host.processor_controls import ProcessorControls, parent_name
from hvstack.host.provisioning import NewVm, Provisioning, new_mac
from hvstack.host.records import JobRecords, VmRecords
from hvstack.host.registry import VmRegistry
from hvstack.host.store import Store
from hvstack.hypervisor.driver import Driver
from hvstack.hypervisor.spec import MachineSpec
from hvstack.memory.model import HostPool
from hvstack.network.names import service_tag
from hvstack.progress import no_progress

__all__ = ["AUTO_STOP_TIMEOUT", "HostFacts", "HostService", "NewVm", "new_mac"]

log = logging.getLogger(__name__)

AUTO_STOP_TIMEOUT = 120.0


class StartHook(Protocol):
    """What a domain adds to every start of a VM (the network: tap ports)."""

    async def before_start(self, record: VmRecord) -> None:
        """Prepare what the machine needs; runs before the start's other checks."""
        ...

    def start_aborted(self, record: VmRecord) -> None:
        """A check after :meth:`before_start` refused the start: undo it."""
        ...

    def tap_fds(self, record: VmRecord) -> dict[str, int]:
        """The open tap of each switch-mode adapter, by MAC, for the machine spec."""
        ...


class HostService:
    def __init__(self, config: HostConfig, store: Store, driver: Driver,
                 host: HostProbe | None = None) -> None:
        self.config = config
        self.store = store
        self.records = VmRecords(store)
        self.driver = driver
        self.host = host if host is not None else LinuxHost()
        self.facts = self.host.facts(config.accelerator)
        self.events = EventBus()
        self.jobs = JobManager(self.events, JobRecords(store))
        self.registry = VmRegistry(config, self.records, driver, self.events,
                                   self._spec_for, self._before_start)
        self.disk_use = DiskUse(config, self.list_vms)
        self.block_work = BlockWork()  # one disk-changing job per VM at a time
        self.provisioning = Provisioning(config, lambda: self.facts, self.registry,
                                         self.records, self.disk_use, self.events)
        # Each running VM's QEMU in a cgroup of its own, under one parent per service.
        self.processor = ProcessorControls(
            self.host.cgroups(parent_name(service_tag(str(config.data_dir)))),
            self.facts.cpus, self.events, self.list_vms)
        self.registry.state_hooks.append(self.processor.on_state)
        self.provisioning.change_checks.append(self.processor.check_change)
        self.provisioning.change_hooks.append(self.processor.on_change)
        self._tasks: set[asyncio.Task[None]] = set()
        # Dynamic memory: a round every config.memory_interval seconds while it runs.
        self.memory = MemoryBalancer(self.list_vms, self.events, self.memory_pool,
                                     config.memory_interval)
        self._memory_task: asyncio.Task[None] | None = None
        self.start_hook: StartHook | None = None  # set by the network operations
        # Run by every start job in the VM's lock before the start (automatic checkpoints).
        self.start_jobs: list[Callable[[VmController, Progress], Awaitable[None]]] = []
        self.started_at = time.time()
        self.cleanup_report = cleanup.CleanupReport()  # what startup() found left behind
        # Called when a VM's guest agent answers after it did not (boot, reattach).
        self.contact_hooks: list[Callable[[VmController], Awaitable[None]]] = (
            self.registry.contact_hooks)

    # -- lifecycle of the service --------------------------------------------

    async def startup(self) -> None:
        """Load the VMs and reattach to their workers; first clean what a killed service
        left (see :mod:`hvstack.host.cleanup`) and fail the jobs it was running."""
        for path in (self.config.data_dir, self.config.vms_dir, self.config.images_dir):
            path.mkdir(parents=True, exist_ok=True)
        await self.jobs.restore()
        records = await self.records.load()
        report = cleanup.CleanupReport()
        await asyncio.to_thread(cleanup.remove_temporaries, self.config, report)
        cleanup.clean_vm_folders(self.config, (r.id for r in records), report)
        for record in records:
            self.registry.register(record)
        vms = self.list_vms()
        results = await asyncio.gather(*(vm.reattach() for vm in vms), return_exceptions=True)
        for vm, result in zip(vms, results, strict=True):
            if isinstance(result, BaseException):
                log.error("reattaching to VM %s failed: %s", vm.record.name, result)
        idle = [vm for vm in vms
                if not vm.machine_running and vm.state in (VmState.OFF, VmState.SAVED)]
        cleanup.clean_run_dirs(self.config, (vm.record.id for vm in vms if vm not in idle),
                               report)
        for vm in idle:
            vm.files.pidfile.unlink(missing_ok=True)  # a stale pid may be reused
        self.processor.startup(vm.record for vm in vms)
        self.cleanup_report = report
        self._memory_task = asyncio.create_task(self.memory.run(), name="memory-balancer")
        for vm in vms:
            self._schedule_auto_start(vm)

    async def shutdown(self) -> None:
        if self._memory_task is not None:
            await memory_balancer.stop(self._memory_task)
            self._memory_task = None
        if not self.config.detach_on_exit:
            await asyncio.gather(
                *(self._auto_stop(vm) for vm in self.list_vms()), return_exceptions=True
            )
        for task in list(self._tasks):
            task.cancel()
        await self.jobs.shutdown()
        for vm in self.list_vms():
            await vm.detach()
        await self.processor.close()
        await self.registry.flush()

    async def flush(self) -> None:
        """Wait until every change so far is in the store."""
        await self.registry.flush()
        await self.jobs.flush()

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _schedule_auto_start(self, vm: VmController) -> None:
        config = vm.record.config
        delay = policy.auto_start(config.auto_start, config.auto_start_delay_seconds,
                                  vm.state, vm.record.was_running)
        if delay is None:
            return

        async def later() -> None:
            await asyncio.sleep(delay)
            log.info("VM %s: automatic start action (%s)", vm.record.name,
                     config.auto_start.value)
            try:
                job = self.start_vm(vm.record.id)
            except HvError as exc:  # refused at once; a failing job logs its own failure
                log.warning("VM %s: automatic start failed: %s", vm.record.name, exc)
                return
            await job.done.wait()

        self._spawn(later(), f"auto-start-{vm.record.id}")

    async def _auto_stop(self, vm: VmController) -> None:
        action = policy.auto_stop(vm.record.config.auto_stop, vm.state)
        if action is None:
            vm.record = vm.record.evolve(was_running=False)
            self.registry.persist(vm.record)
            return
        log.info("VM %s: automatic stop action (%s)", vm.record.name, action.value)
        async with vm.lock:
            try:
                if action is AutoStopAction.SAVE:
                    await vm.save(no_progress)
                elif action is AutoStopAction.SHUT_DOWN:
                    await vm.shut_down(AUTO_STOP_TIMEOUT, no_progress)
                else:
                    await vm.turn_off("turned off by the automatic stop action")
            except HvError as exc:
                log.error("VM %s: automatic stop action (%s) failed: %s", vm.record.name,
                          action.value, exc)
            vm.record = vm.record.evolve(was_running=True)
            self.registry.persist(vm.record)

    # -- the registry -----------------------------------------------------------

    def get_vm(self, ref: str) -> VmController:
        """The VM ``ref`` names: an id if it has the form of one, else a name (never
        both, so a name can't reach another VM)."""
        return self.registry.get(ref)

    def list_vms(self) -> list[VmController]:
        return self.registry.all()

    # -- running a VM --------------------------------------------------------

    def memory_pool(self) -> HostPool:
        """The memory this host's VMs may have together (see :mod:`hvstack.memory`)."""
        total = self.facts.memory_bytes
        reserve = (self.config.memory_reserve if self.config.memory_reserve is not None
                   else default_reserve(total))
        return HostPool(total, reserve, self.config.memory_limit)

    def accelerator_for(self, config: VmConfig) -> str:
        """The accelerator the VM runs with (checked for usability when it starts)."""
        return config.accelerator or self.facts.accelerator.name

    def _spec_for(self, record: VmRecord, incoming: bool) -> MachineSpec:
        host = MachineHost(self.accelerator_for(record.config), str(self.config.ovmf_code),
                           self.config.qemu_binary, self.facts.memory_bytes)
        taps = self.start_hook.tap_fds(record) if self.start_hook else None
        return machine_spec(record.id, record.config, self.registry.files(record.id), host,
                            chains=self.registry.chains.get(record.id, {}), incoming=incoming,
                            tap_fds=taps)

    async def _before_start(self, record: VmRecord) -> None:
        if self.start_hook is None:
            await self._check_start(record)
            return
        await self.start_hook.before_start(record)
        try:
            await self._check_start(record)
        except BaseException:
            self.start_hook.start_aborted(record)
            raise

    async def _check_start(self, record: VmRecord) -> None:
        """Checks that need the whole host: files present, disks free, memory there."""
        for disk in record.config.disks:
            if not os.path.exists(disk.path):
                raise NotFound(f"cannot start VM '{record.name}': its disk {disk.path} "
                               "does not exist", vm=record.name, disk=disk.path)
        parents = await self.disk_use.parents()
        chains = await self.disk_use.chains(record)
        # No await from here on: the VM turns Starting before another start can check.
        self.disk_use.check_start(record, parents, chains)
        self.registry.chains[record.id] = chains
        if record.config.dvd and not os.path.exists(record.config.dvd):
            raise NotFound(f"cannot start VM '{record.name}': its ISO {record.config.dvd} "
                           "does not exist", vm=record.name)
        if record.config.accelerator:
            self.host.check_accelerator(record.config.accelerator)
        self.memory.admit(record)  # next to what the running VMs cannot give back
        policy.admit_memory(record.name, record.config.memory_bytes,
                            self.host.available_memory())
        self.processor.check_start(record)

    def _job(self, kind: str, vm: VmController, body: Any) -> Job:
        async def locked(progress: Progress) -> dict[str, Any] | None:
            async with vm.lock:
                if not self.registry.holds(vm):  # deleted while it waited
                    raise NotFound(f"VM '{vm.record.name}' was deleted", vm=vm.record.name)
                result: dict[str, Any] | None = await body(progress)
                return result

        return self.jobs.start(kind, vm.record.name, locked)

    def start_vm(self, ref: str) -> Job:
        vm = self.get_vm(ref)
        vm.require(Operation.START)

        async def body(progress: Progress) -> dict[str, Any]:
            for before in self.start_jobs:
                await before(vm, progress)
            await vm.start(progress)
            return {"state": vm.state.value}

        return self._job("start", vm, body)

    def stop_vm(self, ref: str, mode: StopMode, force: bool = False,
                timeout: float | None = None) -> Job:
        vm = self.get_vm(ref)
        vm.require(policy.stop_action(mode, force).operation)
        wait = self.config.stop_timeout if timeout is None else timeout

        async def body(progress: Progress) -> dict[str, Any]:
            action = policy.stop_action(mode, force, vm.state)
            if action is StopAction.SAVE:
                await vm.save(progress)
                how = "saved"
            elif action is StopAction.DISCARD_SAVED_STATE:
                await vm.discard_saved_state()
                how = "saved state discarded"
            elif action is StopAction.TURN_OFF:
                await vm.turn_off()
                how = "turned off"
            else:
                how = await vm.shut_down(wait, progress)
            return {"state": vm.state.value, "how": how}

        return self._job(mode.value, vm, body)

    def restart_vm(self, ref: str, timeout: float | None = None) -> Job:
        vm = self.get_vm(ref)
        vm.require(Operation.RESTART)
        wait = self.config.stop_timeout if timeout is None else timeout

        async def body(progress: Progress) -> dict[str, Any]:
            how = await vm.restart(wait, progress)
            return {"state": vm.state.value, "how": how}

        return self._job("restart", vm, body)

    async def pause_vm(self, ref: str) -> VmController:
        vm = self.get_vm(ref)
        async with vm.lock:
            await vm.pause()
        return vm

    async def resume_vm(self, ref: str) -> VmController:
        vm = self.get_vm(ref)
        async with vm.lock:
            await vm.resume()
        return vm

    # -- defining VMs (see :mod:`hvstack.host.provisioning`) -------------------------

    async def create_vm(self, new: NewVm) -> VmController:
        return await self.provisioning.create(new)

    async def update_vm(self, ref: str, **changes: Any) -> VmController:
        return await self.provisioning.update(ref, **changes)

    async def delete_vm(self, ref: str, delete_disks: bool = False) -> dict[str, Any]:
        return await self.provisioning.delete(ref, delete_disks)

    async def attach_disk(self, ref: str, path: str, bus: DiskBus | None = None,
                          fmt: str | None = None) -> VmController:
        return await self.provisioning.attach_disk(ref, path, bus, fmt)

    async def detach_disk(self, ref: str, path: str) -> VmController:
        return await self.provisioning.detach_disk(ref, path)

    async def set_dvd(self, ref: str, iso: str | None) -> VmController:
        return await self.provisioning.set_dvd(ref, iso)

    def console_log(self, ref: str, max_bytes: int = 64 * 1024) -> str:
        vm = self.get_vm(ref)
        try:
            with open(vm.files.console_log, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
