"""Provisioning: defining, changing and deleting VMs (their settings, folders, disks).

:class:`Provisioning` creates a VM (its folder, its first disk from an image, a new
disk or an existing one, its UEFI variables), changes its settings (those a state
allows: :mod:`hvstack.compute.settings`), attaches and detaches disks and ISOs, and
deletes it with the disks it owns (never a disk another VM uses or one that is the
parent of another: :mod:`hvstack.host.disk_use`). Settings are stored with
compare-and-swap on their revision; the registry is kept in step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import (
    DiskAttachment,
    DiskBus,
    Generation,
    NetworkAdapter,
    NicModel,
    VmConfig,
    VmRecord,
    new_disk_id,
    validate_config,
    validate_name,
    with_memory_defaults,
)
from hvstack.compute.settings import check_change, check_memory_change
from hvstack.compute.states import Operation
from hvstack.errors import HvError, HypervisorError, InvalidInput, NotFound
from hvstack.host.config import HostConfig
from hvstack.host.disk_use import DiskUse
from hvstack.host.events import EventBus
from hvstack.host.facts import HostFacts
from hvstack.host.records import VmRecords
from hvstack.host.registry import VmRegistry
from hvstack.host.store import Op
from hvstack.storage import disks, formats
from hvstack.storage.paths import confine

log = logging.getLogger(__name__)


def new_mac() -> str:
    """A random MAC in QEMU's 52:54:00 range (locally administered would also do)."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def _default_bus(generation: Generation) -> DiskBus:
    """Where a disk goes when nobody says: IDE on Generation 1, SCSI on Generation 2."""
    return DiskBus.IDE if generation is Generation.GEN1 else DiskBus.SCSI


@dataclass(frozen=True)
class NewVm:
    """What ``create`` needs: the settings plus where the first disk comes from."""

    config: VmConfig
    image: str | None = None
    disk: str | None = None
    new_disk_bytes: int | None = None
    disk_format: str | None = None  # of ``disk``; default: as its extension says
    switches: tuple[str, ...] = ()  # one adapter on each switch (names or ids)
    network: bool = True  # False: no adapter at all


# The adapters of a new VM that gave none: the network operations decide (the Default
# Switch, the switches asked for, the MAC pool); without them one user-mode adapter.
AdapterChooser = Callable[[VmConfig, NewVm], Awaitable[tuple[NetworkAdapter, ...]]]
# Awaited after a VM's settings changed: the VM, its old and its new settings.
ChangeHook = Callable[[VmController, VmConfig, VmConfig], Awaitable[None]]


async def user_mode_adapter(config: VmConfig, new: NewVm) -> tuple[NetworkAdapter, ...]:
    if new.switches:
        raise InvalidInput("this host service has no virtual switches")
    if not new.network:
        return ()
    model = NicModel.E1000 if config.generation is Generation.GEN1 else NicModel.VIRTIO
    return (NetworkAdapter(new_mac(), model),)


class Provisioning:
    def __init__(self, config: HostConfig, facts: Callable[[], HostFacts],
                 registry: VmRegistry, records: VmRecords, disk_use: DiskUse,
                 events: EventBus) -> None:
        self.config = config
        self._facts = facts
        self._registry = registry
        self._records = records
        self.disk_use = disk_use
        self._events = events
        self.choose_adapters: AdapterChooser = user_mode_adapter
        # The files of a VM's checkpoints, each with whether --delete-disks may delete
        # it (set by the checkpoint operations).
        self.checkpoint_files: Callable[[VmController], Awaitable[list[tuple[str, bool]]]] = (
            _no_checkpoint_files)
        # Settings changes as domains see them: each check may refuse a change before it
        # is stored (the VM's lock is held); each hook is awaited after it was stored,
        # with the old and new settings (e.g. to apply them to a running VM).
        self.change_checks: list[Callable[[VmController, VmConfig], None]] = []
        self.change_hooks: list[ChangeHook] = []

    def validate(self, config: VmConfig) -> None:
        facts = self._facts()
        validate_config(config, host_cpus=facts.cpus, host_memory=facts.memory_bytes)

    def _confine(self, path: str, *, must_exist: bool = False, what: str = "path") -> Path:
        return confine(path, self.config.storage_roots, must_exist=must_exist, what=what)

    def _image_path(self, name: str) -> Path:
        validate_name(name, what="image name")
        for candidate in sorted(self.config.images_dir.glob(f"{name}.*")):
            if candidate.suffix in formats.DISK_EXTENSIONS:  # what hv image list shows
                return candidate
        raise NotFound(
            f"no image named '{name}'; build it with 'hv image build {name}' "
            "or see 'hv image list'", image=name,
        )

    async def create(self, new: NewVm) -> VmController:
        config = new.config
        self.validate(config)
        self._registry.check_free(config.name)
        sources = sum(x is not None for x in (new.image, new.disk, new.new_disk_bytes))
        if sources > 1:
            raise InvalidInput("give at most one of an image, an existing disk or a new disk")
        if config.dvd:
            config = replace(config, dvd=str(self._confine(config.dvd, must_exist=True,
                                                           what="ISO")))
        bus = _default_bus(config.generation)
        if not config.network_adapters:
            config = replace(config,
                             network_adapters=await self.choose_adapters(config, new))
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
        files = self._registry.files(vm_id)
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
            self.validate(config)
            record = VmRecord(id=vm_id, config=config, created_at=time.time())
            self._registry.check_free(config.name)
            record = await self._records.create(record)
        except BaseException:
            shutil.rmtree(files.folder, ignore_errors=True)
            raise
        vm = self._registry.register(record)
        self._write_config_copy(vm)
        self._events.publish("vm.created", vm=record.name, id=record.id)
        return vm

    def _write_config_copy(self, vm: VmController) -> None:
        with contextlib.suppress(OSError):
            (vm.files.folder / "vm.json").write_text(vm.record.config.to_json())

    async def update(self, ref: str, **changes: Any) -> VmController:
        """Change settings. Names, notes and automatic actions change in any state; the
        hardware (processors, memory, generation) only while the VM is Off."""
        vm = self._registry.get(ref)
        async with vm.lock:
            check_change(changes, vm.state, vm.record.name)
            new = with_memory_defaults(replace(vm.record.config, **changes),
                                       self._facts().memory_bytes)
            check_memory_change(vm.record.config, new, vm.state, vm.record.name)
            await self.store_config(vm, new)
        return vm

    async def store_config(self, vm: VmController, new: VmConfig,
                           also: Sequence[Op] = ()) -> None:
        """Validate and store ``new`` settings of ``vm`` (compare-and-swap on the
        revision), with ``also`` in the same transaction, and keep the registry in
        step. The caller holds ``vm.lock`` and has checked the change against the VM's
        state."""
        self.validate(new)
        for check in self.change_checks:
            check(vm, new)
        old, old_name = vm.record.config, vm.record.name
        if new.name != old_name:
            self._registry.check_free(new.name)
        stored = await self._records.change(vm.record, new, also)
        record = vm.record = vm.record.evolve(config=new, revision=stored.revision)
        if new.name != old_name:
            self._registry.renamed(vm, old_name)
        self._write_config_copy(vm)
        self._events.publish("vm.changed", vm=new.name, id=record.id)
        for hook in self.change_hooks:
            try:
                await hook(vm, old, new)
            except HvError as exc:  # stored all the same: the hook says what it missed
                log.error("VM %s: after a change of its settings: %s", new.name, exc)

    async def delete(self, ref: str, delete_disks: bool = False) -> dict[str, Any]:
        """Delete a VM that is Off or Saved, with its folder. Its disks are kept (left in
        place, even inside the folder) unless ``delete_disks``; even then only the disks
        created for it are deleted, never a disk attached from elsewhere, one another VM
        uses or the parent of another disk. The result lists each kept disk's reason."""
        vm = self._registry.get(ref)
        async with vm.lock:
            vm.require(Operation.DELETE)
            files = [(d.path, d.owned) for d in vm.record.config.disks]
            files += [f for f in await self.checkpoint_files(vm)
                      if f[0] not in {p for p, _ in files}]
            kept = await self._disks_to_keep(vm, files, delete_disks)
            doomed = [path for path, _ in files if path not in kept]
            await self._registry.flush()  # no queued observation outlives the record
            await self._records.delete(vm.record)
            self._registry.unregister(vm)
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
            self._events.publish("vm.deleted", vm=vm.record.name, id=vm.record.id)
            return {"deleted": vm.record.name, "deleted_disks": doomed,
                    "kept_disks": [{"path": p, "reason": why} for p, why in kept.items()]}

    async def _disks_to_keep(self, vm: VmController, files: Sequence[tuple[str, bool]],
                             delete_disks: bool) -> dict[str, str]:
        """Each of ``vm``'s disk ``files`` (path, created for it) that delete keeps,
        with the reason."""
        if not delete_disks:
            return {path: "disks are kept unless --delete-disks is given" for path, _ in files}
        kept: dict[str, str] = {}
        for path, owned in files:
            if not owned:
                kept[path] = "it was not created for this VM (it was attached)"
        for other in self.disk_use.attachments(but_vm=vm.record.id):
            if str(other.path) in {p for p, _ in files} and str(other.path) not in kept:
                kept[str(other.path)] = f"VM '{other.vm}' uses it too"
        links = await self.disk_use.parents()
        changed = True
        while changed:  # a child that is deleted too does not keep its parent
            changed = False
            doomed = {Path(p) for p, _ in files if p not in kept}
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
        vm = self._registry.get(ref)
        disk = self.disk_use.confine(path, must_exist=True)
        disk_format = self.disk_use.format_of(disk, fmt)
        if any(d.path == str(disk) for d in vm.record.config.disks):
            raise InvalidInput(f"disk {disk} is already attached to VM '{vm.record.name}'")
        await self.disk_use.check(disk, "attach", vm_id=vm.record.id)
        info = await disks.inspect_disk(disk, format=disk_format,
                                        roots=self.config.storage_roots,
                                        guard=self.disk_use.guard)
        attachment = DiskAttachment(str(disk), bus or _default_bus(vm.record.config.generation),
                                    info.format, id=new_disk_id())
        return await self.update(ref, disks=(*vm.record.config.disks, attachment))

    async def detach_disk(self, ref: str, path: str) -> VmController:
        vm = self._registry.get(ref)
        target = os.path.realpath(path)
        left = tuple(d for d in vm.record.config.disks if d.path != target)
        if len(left) == len(vm.record.config.disks):
            raise NotFound(f"disk {target} is not attached to VM '{vm.record.name}'")
        return await self.update(ref, disks=left)

    async def set_dvd(self, ref: str, iso: str | None) -> VmController:
        path = str(self._confine(iso, must_exist=True, what="ISO")) if iso else None
        return await self.update(ref, dvd=path)


async def _no_checkpoint_files(vm: VmController) -> list[tuple[str, bool]]:
    return []
