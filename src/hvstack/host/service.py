"""The host service: the composition root that owns every VM on this host.

:class:`HostService` is the one place operations enter below the API. It keeps the VM
registry (a :class:`~hvstack.compute.lifecycle.VmController` per VM) in memory, backed
by the store; runs long operations as jobs; publishes every change as an event; and on
start and stop applies each VM's automatic start and stop actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hvstack.compute.lifecycle import StopMode, VmController, VmFiles
from hvstack.compute.model import (
    AutoStartAction,
    AutoStopAction,
    DiskAttachment,
    DiskBus,
    Generation,
    NetworkAdapter,
    NicModel,
    VmConfig,
    VmRecord,
    VmState,
    is_id,
    new_disk_id,
    validate_config,
    validate_name,
)
from hvstack.compute.settings import check_change
from hvstack.compute.states import Operation
from hvstack.errors import (
    HvError,
    HypervisorError,
    InsufficientResources,
    InvalidInput,
    NotFound,
)
from hvstack.host import cleanup
from hvstack.host.config import HostConfig
from hvstack.host.disk_use import DiskUse
from hvstack.host.events import EventBus
from hvstack.host.jobs import Job, JobManager, Progress
from hvstack.host.records import JobRecords, VmRecords, Writer
from hvstack.host.store import Store
from hvstack.hypervisor import accel
from hvstack.hypervisor.driver import Driver
from hvstack.hypervisor.qemu.argv import BackingFile, Firmware, QemuSpec, RuntimePaths
from hvstack.storage import disks
from hvstack.storage.paths import confine

log = logging.getLogger(__name__)

AUTO_STOP_TIMEOUT = 120.0


@dataclass(frozen=True)
class HostFacts:
    cpus: int
    memory_bytes: int
    accelerator: accel.AcceleratorChoice


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise HypervisorError(f"/proc/meminfo has no {field}")


def new_mac() -> str:
    """A random MAC in QEMU's 52:54:00 range (locally administered would also do)."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


@dataclass(frozen=True)
class NewVm:
    """What ``create`` needs: the settings plus where the first disk comes from."""

    config: VmConfig
    image: str | None = None
    disk: str | None = None
    new_disk_bytes: int | None = None
    disk_format: str | None = None  # of ``disk``; default: as its extension says


class HostService:
    def __init__(self, config: HostConfig, store: Store, driver: Driver) -> None:
        self.config = config
        self.store = store
        self.records = VmRecords(store)
        self._writer = Writer()  # this host's observations of its VMs, in order
        self.driver = driver
        self.events = EventBus()
        self.jobs = JobManager(self.events, JobRecords(store))
        self.facts = HostFacts(
            cpus=os.cpu_count() or 1,
            memory_bytes=_meminfo("MemTotal"),
            accelerator=accel.choose(accel.probe(), config.accelerator),
        )
        self._vms: dict[str, VmController] = {}
        self.disk_use = DiskUse(config, self.list_vms)
        # The checked backing chains of each VM's disks, read by _before_start for the
        # QEMU command line _spec_for builds right after it.
        self._chains: dict[str, dict[str, tuple[BackingFile, ...]]] = {}
        self._names: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.started_at = time.time()
        self.cleanup_report = cleanup.CleanupReport()  # what startup() found left behind
        # Called when a VM's guest agent answers after it did not (boot, reattach):
        # domain operations register here, e.g. to push the KVP pool into the guest.
        self.contact_hooks: list[Callable[[VmController], Awaitable[None]]] = []

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
            self._register(record)
        vms = list(self._vms.values())
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
        self.cleanup_report = report
        for vm in self._vms.values():
            self._schedule_auto_start(vm)

    async def shutdown(self) -> None:
        if not self.config.detach_on_exit:
            await asyncio.gather(
                *(self._auto_stop(vm) for vm in self._vms.values()), return_exceptions=True
            )
        for task in list(self._tasks):
            task.cancel()
        await self.jobs.shutdown()
        for vm in self._vms.values():
            await vm.detach()
        await self._writer.flush()

    async def flush(self) -> None:
        """Wait until every change so far is in the store."""
        await self._writer.flush()
        await self.jobs.flush()

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _schedule_auto_start(self, vm: VmController) -> None:
        config = vm.record.config
        if vm.state not in (VmState.OFF, VmState.SAVED):
            return
        wanted = config.auto_start is AutoStartAction.ALWAYS_START or (
            config.auto_start is AutoStartAction.START_IF_RUNNING and vm.record.was_running
        )
        if not wanted:
            return

        async def later() -> None:
            await asyncio.sleep(config.auto_start_delay_seconds)
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
        if vm.state not in (VmState.RUNNING, VmState.PAUSED):
            vm.record = vm.record.evolve(was_running=False)
            self._persist(vm.record)
            return
        action = vm.record.config.auto_stop
        log.info("VM %s: automatic stop action (%s)", vm.record.name, action.value)
        async with vm.lock:
            try:
                noop = _no_progress
                if action is AutoStopAction.SAVE:
                    await vm.save(noop)
                elif action is AutoStopAction.SHUT_DOWN:
                    await vm.shut_down(AUTO_STOP_TIMEOUT, noop)
                else:
                    await vm.turn_off("turned off by the automatic stop action")
            except HvError as exc:
                log.error("VM %s: automatic stop action (%s) failed: %s", vm.record.name,
                          action.value, exc)
            vm.record = vm.record.evolve(was_running=True)
            self._persist(vm.record)

    # -- the registry -----------------------------------------------------------

    def _files(self, vm_id: str) -> VmFiles:
        return VmFiles(self.config.vms_dir / vm_id, self.config.run_dir / vm_id)

    def _register(self, record: VmRecord) -> VmController:
        vm = VmController(
            record, self._files(record.id), self.driver, self._spec_for, self._on_change,
            self._before_start, publish=self.events.publish,
            on_guest_contact=self._on_guest_contact, recorded=self._recorded,
        )
        self._vms[record.id] = vm
        self._names[record.name] = record.id
        return vm

    async def _on_guest_contact(self, vm: VmController) -> None:
        for hook in self.contact_hooks:
            try:
                await hook(vm)
            except HvError as exc:
                log.warning("VM %s: after contact with its guest agent: %s", vm.record.name, exc)

    def _persist(self, record: VmRecord) -> None:
        """Queue the write of what this host observes of the VM (a failure is logged;
        the next change writes the whole observation again)."""
        if record.id not in self._vms:
            return  # deleted: its observations went with it
        self._writer.write(record.id, functools.partial(self.records.observe, record.id,
                                                        record.observed))

    async def _recorded(self, record: VmRecord) -> None:
        await self._writer.flush(record.id)  # _on_change queued it

    def _on_change(self, record: VmRecord) -> None:
        try:
            self._persist(record)
        finally:  # the change happened (or was undone) even if the store failed
            self.events.publish(
                "vm.state", vm=record.name, id=record.id, state=record.state.value,
                reason=record.state_reason,
            )

    def get_vm(self, ref: str) -> VmController:
        """The VM ``ref`` names: an id if it has the form of one, else a name (never
        both, so a name can't reach another VM)."""
        if is_id(ref):
            vm = self._vms.get(ref.lower())
            if vm is None:
                raise NotFound(f"no VM with id {ref} exists on this host", vm=ref)
            return vm
        vm_id = self._names.get(ref)
        if vm_id is None:
            raise NotFound(f"no VM named '{ref}' exists on this host", vm=ref)
        return self._vms[vm_id]

    def list_vms(self) -> list[VmController]:
        return list(self._vms.values())

    # -- running a VM --------------------------------------------------------

    def accelerator_for(self, config: VmConfig) -> str:
        """The accelerator the VM runs with (checked for usability when it starts)."""
        return config.accelerator or self.facts.accelerator.name

    def _spec_for(self, record: VmRecord, incoming: bool) -> QemuSpec:
        files = self._files(record.id)
        firmware = None
        if record.config.generation is Generation.GEN2:
            firmware = Firmware(str(self.config.ovmf_code), str(files.efi_vars))
        return QemuSpec(
            vm_id=record.id,
            config=record.config,
            accelerator=self.accelerator_for(record.config),
            paths=RuntimePaths(
                qmp_socket=str(files.qmp_socket),
                serial_socket=str(files.serial_socket),
                serial_log=str(files.console_log),
                qga_socket=str(files.qga_socket),
                pidfile=str(files.pidfile),
                vnc_socket=str(files.vnc_socket),
            ),
            firmware=firmware,
            incoming=incoming,
            binary=self.config.qemu_binary,
            backing=self._chains.get(record.id, {}),
        )

    async def _before_start(self, record: VmRecord) -> None:
        """Checks that need the whole host: files present, disks free, memory there."""
        for disk in record.config.disks:
            if not os.path.exists(disk.path):
                raise NotFound(f"cannot start VM '{record.name}': its disk {disk.path} "
                               "does not exist", vm=record.name, disk=disk.path)
        parents = await self.disk_use.parents()
        chains = await self.disk_use.chains(record)
        # No await from here on: the VM turns Starting before another start can check.
        self.disk_use.check_start(record, parents, chains)
        self._chains[record.id] = chains
        if record.config.dvd and not os.path.exists(record.config.dvd):
            raise NotFound(f"cannot start VM '{record.name}': its ISO {record.config.dvd} "
                           "does not exist", vm=record.name)
        if record.config.accelerator:
            accel.choose(accel.probe(), record.config.accelerator)  # raises if unusable
        available = _meminfo("MemAvailable")
        if record.config.memory_bytes > available:
            raise InsufficientResources(
                f"cannot start VM '{record.name}': it needs "
                f"{record.config.memory_bytes >> 20} MiB of memory and the host has "
                f"{available >> 20} MiB available"
            )

    def _job(self, kind: str, vm: VmController, body: Any) -> Job:
        async def locked(progress: Progress) -> dict[str, Any] | None:
            async with vm.lock:
                if self._vms.get(vm.record.id) is not vm:  # deleted while it waited
                    raise NotFound(f"VM '{vm.record.name}' was deleted", vm=vm.record.name)
                result: dict[str, Any] | None = await body(progress)
                return result

        return self.jobs.start(kind, vm.record.name, locked)

    def start_vm(self, ref: str) -> Job:
        vm = self.get_vm(ref)
        vm.require(Operation.START)

        async def body(progress: Progress) -> dict[str, Any]:
            await vm.start(progress)
            return {"state": vm.state.value}

        return self._job("start", vm, body)

    def stop_vm(self, ref: str, mode: StopMode, force: bool = False,
                timeout: float | None = None) -> Job:
        vm = self.get_vm(ref)
        if mode is StopMode.SAVE:
            vm.require(Operation.SAVE)
        elif mode is StopMode.DISCARD_SAVED_STATE:
            vm.require(Operation.DISCARD_SAVED_STATE)
        elif mode is StopMode.TURN_OFF or force:
            vm.require(Operation.TURN_OFF)
        else:
            vm.require(Operation.SHUT_DOWN)
        wait = self.config.stop_timeout if timeout is None else timeout

        async def body(progress: Progress) -> dict[str, Any]:
            if mode is StopMode.SAVE:
                await vm.save(progress)
                how = "saved"
            elif mode is StopMode.DISCARD_SAVED_STATE:
                await vm.discard_saved_state()
                how = "saved state discarded"
            elif mode is StopMode.TURN_OFF or (force and vm.state is not VmState.RUNNING):
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

    # -- defining VMs ------------------------------------------------------------

    def _confine(self, path: str, *, must_exist: bool = False, what: str = "path") -> Path:
        return confine(path, self.config.storage_roots, must_exist=must_exist, what=what)

    def _image_path(self, name: str) -> Path:
        validate_name(name, what="image name")
        for candidate in sorted(self.config.images_dir.glob(f"{name}.*")):
            if candidate.suffix in (".qcow2", ".raw", ".img", ".vhdx"):
                return candidate
        raise NotFound(
            f"no image named '{name}'; build it with 'hv image build {name}' "
            "or see 'hv image list'", image=name,
        )

    async def create_vm(self, new: NewVm) -> VmController:
        config = new.config
        validate_config(config, host_cpus=self.facts.cpus, host_memory=self.facts.memory_bytes)
        if config.name in self._names:
            raise_exists(config.name)
        sources = sum(x is not None for x in (new.image, new.disk, new.new_disk_bytes))
        if sources > 1:
            raise InvalidInput("give at most one of an image, an existing disk or a new disk")
        if config.dvd:
            config = replace(config, dvd=str(self._confine(config.dvd, must_exist=True,
                                                           what="ISO")))
        bus = DiskBus.IDE if config.generation is Generation.GEN1 else DiskBus.SCSI
        if not config.network_adapters:
            model = NicModel.E1000 if config.generation is Generation.GEN1 else NicModel.VIRTIO
            config = replace(config, network_adapters=(NetworkAdapter(new_mac(), model),))
        existing = None
        if new.disk:
            existing = self.disk_use.confine(new.disk, must_exist=True)
            existing_format = self.disk_use.format_of(existing, new.disk_format)
            await self.disk_use.check(existing, "attach")
        elif new.disk_format:
            raise InvalidInput("a disk format is given only with an existing disk")
        base = self._image_path(new.image) if new.image else None

        if config.generation is Generation.GEN2 and not (
            self.config.ovmf_vars.is_file() and self.config.ovmf_code.is_file()
        ):
            raise HypervisorError(
                f"Generation 2 VMs need UEFI firmware, and {self.config.ovmf_code} or "
                f"{self.config.ovmf_vars} is missing: apt-get install ovmf"
            )
        vm_id = str(uuid.uuid4())
        files = self._files(vm_id)
        files.folder.mkdir(parents=True)
        try:
            if base is not None or new.new_disk_bytes is not None:
                target = files.folder / "disk0.qcow2"
                if base is not None:
                    info = await disks.create_disk(
                        target, None, "differencing", parent=base,
                        roots=self.config.storage_roots, guard=self.disk_use.guard,
                    )
                else:
                    assert new.new_disk_bytes is not None
                    info = await disks.create_disk(target, new.new_disk_bytes, "dynamic")
                config = replace(config, image=new.image, disks=(DiskAttachment(
                    str(target), bus, info.format, owned=True, id=new_disk_id()),
                    *config.disks))
            elif existing is not None:
                info = await disks.inspect_disk(
                    existing, format=existing_format, roots=self.config.storage_roots,
                    guard=self.disk_use.guard)
                config = replace(config, disks=(DiskAttachment(
                    str(existing), bus, info.format, id=new_disk_id()), *config.disks))
            if config.generation is Generation.GEN2:
                shutil.copyfile(self.config.ovmf_vars, files.efi_vars)
            validate_config(config, host_cpus=self.facts.cpus,
                            host_memory=self.facts.memory_bytes)
            record = VmRecord(id=vm_id, config=config, created_at=time.time())
            if config.name in self._names:
                raise_exists(config.name)
            record = await self.records.create(record)
        except BaseException:
            shutil.rmtree(files.folder, ignore_errors=True)
            raise
        vm = self._register(record)
        self._write_config_copy(vm)
        self.events.publish("vm.created", vm=record.name, id=record.id)
        return vm

    def _write_config_copy(self, vm: VmController) -> None:
        with contextlib.suppress(OSError):
            (vm.files.folder / "vm.json").write_text(vm.record.config.to_json())

    async def update_vm(self, ref: str, **changes: Any) -> VmController:
        """Change settings. Names, notes and automatic actions change in any state; the
        hardware (processors, memory, generation) only while the VM is Off."""
        vm = self.get_vm(ref)
        async with vm.lock:
            check_change(changes, vm.state, vm.record.name)
            new = replace(vm.record.config, **changes)
            validate_config(new, host_cpus=self.facts.cpus, host_memory=self.facts.memory_bytes)
            old_name = vm.record.name
            if new.name != old_name and new.name in self._names:
                raise_exists(new.name)
            stored = await self.records.change(vm.record, new)
            record = vm.record = vm.record.evolve(config=new, revision=stored.revision)
            if new.name != old_name:
                del self._names[old_name]
                self._names[new.name] = record.id
            self._write_config_copy(vm)
            self.events.publish("vm.changed", vm=new.name, id=record.id)
        return vm

    async def rename_vm(self, ref: str, new_name: str) -> VmController:
        validate_name(new_name)
        return await self.update_vm(ref, name=new_name)

    async def delete_vm(self, ref: str, delete_disks: bool = False) -> dict[str, Any]:
        """Delete a VM that is Off or Saved, with its folder. Its disks are kept (left in
        place, even inside the folder) unless ``delete_disks``; even then only the disks
        created for it are deleted, never a disk attached from elsewhere, one another VM
        uses or the parent of another disk. The result lists each kept disk's reason."""
        vm = self.get_vm(ref)
        async with vm.lock:
            vm.require(Operation.DELETE)
            kept = await self._disks_to_keep(vm, delete_disks)
            doomed = [d.path for d in vm.record.config.disks if d.path not in kept]
            await self._writer.flush()  # no queued observation outlives the record
            await self.records.delete(vm.record)
            del self._vms[vm.record.id]
            del self._names[vm.record.name]
            self._chains.pop(vm.record.id, None)
            for path in doomed:
                Path(path).unlink(missing_ok=True)
            keep_files = {Path(p) for p in kept}
            if vm.files.folder.exists():
                for entry in vm.files.folder.iterdir():
                    if entry in keep_files:
                        continue
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    vm.files.folder.rmdir()  # fails, rightly, while kept disks are in it
            shutil.rmtree(vm.files.run_dir, ignore_errors=True)
            self.events.publish("vm.deleted", vm=vm.record.name, id=vm.record.id)
            return {"deleted": vm.record.name, "deleted_disks": doomed,
                    "kept_disks": [{"path": p, "reason": why} for p, why in kept.items()]}

    async def _disks_to_keep(self, vm: VmController, delete_disks: bool) -> dict[str, str]:
        """Each of ``vm``'s disks that delete keeps, with the reason."""
        disks_ = vm.record.config.disks
        if not delete_disks:
            return {d.path: "disks are kept unless --delete-disks is given" for d in disks_}
        kept: dict[str, str] = {}
        for d in disks_:
            if not d.owned:
                kept[d.path] = "it was not created for this VM (it was attached)"
        for other in self.disk_use.attachments(but_vm=vm.record.id):
            if str(other.path) in {d.path for d in disks_} and str(other.path) not in kept:
                kept[str(other.path)] = f"VM '{other.vm}' uses it too"
        links = await self.disk_use.parents()
        changed = True
        while changed:  # a child that is deleted too does not keep its parent
            changed = False
            doomed = {Path(d.path) for d in disks_ if d.path not in kept}
            for child, parent in links.items():
                if parent in doomed and child not in doomed:
                    kept[str(parent)] = f"it is the parent of '{child}'"
                    changed = True
        return kept

    async def attach_disk(self, ref: str, path: str, bus: DiskBus | None = None,
                          fmt: str | None = None) -> VmController:
        """Attach ``path``, opened in the format its extension names or ``fmt`` gives
        (never probed), after checking its chain against the roots and the service's
        own files."""
        vm = self.get_vm(ref)
        disk = self.disk_use.confine(path, must_exist=True)
        disk_format = self.disk_use.format_of(disk, fmt)
        if any(d.path == str(disk) for d in vm.record.config.disks):
            raise InvalidInput(f"disk {disk} is already attached to VM '{vm.record.name}'")
        await self.disk_use.check(disk, "attach", vm_id=vm.record.id)
        info = await disks.inspect_disk(disk, format=disk_format,
                                        roots=self.config.storage_roots,
                                        guard=self.disk_use.guard)
        default = DiskBus.IDE if vm.record.config.generation is Generation.GEN1 else DiskBus.SCSI
        attachment = DiskAttachment(str(disk), bus or default, info.format, id=new_disk_id())
        return await self.update_vm(ref, disks=(*vm.record.config.disks, attachment))

    async def detach_disk(self, ref: str, path: str) -> VmController:
        vm = self.get_vm(ref)
        target = os.path.realpath(path)
        left = tuple(d for d in vm.record.config.disks if d.path != target)
        if len(left) == len(vm.record.config.disks):
            raise NotFound(f"disk {target} is not attached to VM '{vm.record.name}'")
        return await self.update_vm(ref, disks=left)

    async def set_dvd(self, ref: str, iso: str | None) -> VmController:
        path = str(self._confine(iso, must_exist=True, what="ISO")) if iso else None
        return await self.update_vm(ref, dvd=path)

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


def raise_exists(name: str) -> None:
    from hvstack.errors import AlreadyExists

    raise AlreadyExists(f"a VM named '{name}' already exists", vm=name)


def _no_progress(percent: float, message: str = "") -> None:
    return None
