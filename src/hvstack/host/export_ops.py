"""Exporting a VM (Export-VM) and a checkpoint of it (Export-VMSnapshot), as host jobs.

:meth:`ExportOperations.export_vm` writes ``DIR/<vm name>`` (layout:
:mod:`hvstack.host.export_format`) with the VM's settings, every disk file of its
current state and of its checkpoints (parents included: the export stands alone), the
checkpoints' memory states, and a Saved VM's saved state.

* An Off or Saved VM: the files are copied as they are (holes kept), under the VM's lock
  (a start waits for the export), and each copied qcow2 file is pointed at its copied
  parent by a relative name.
* A Running or Paused VM keeps running: for each writable disk a new qcow2 file naming
  the exported parent of its current file is added to QEMU, and ONE ``BlockJobs.backup``
  transaction starts a point-in-time copy of every current file's own layer (``sync``
  "top"; "full" for a disk without a parent) at one instant, inside a freeze of the
  guest's file systems when its agent answers and its backup service is on (the
  result's ``consistency`` says "frozen" or "crash-consistent"). The checkpoint files
  and other parents never change while the VM runs: they are copied as they are while
  the jobs run. The export records the VM as Off.

:meth:`ExportOperations.export_checkpoint` exports the VM as it was at one checkpoint:
its settings then, each disk flattened (``qemu-img convert`` of the checkpoint's chain,
``-U``), a standard checkpoint's memory state as the export's saved state; no checkpoints.

Both hold the VM's :class:`~hvstack.host.block_work.BlockWork` claim for the whole job
(no merge or move changes a chain under them). A failure or a cancellation (``hv job
cancel``) cancels QEMU's jobs, removes the nodes added and deletes the partial export:
nothing half-made stays. The destination must be inside the storage roots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hvstack.checkpoints.model import Checkpoint, CheckpointKind, CheckpointTree
from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import ServiceStatus, VmConfig, VmState
from hvstack.errors import (
    AlreadyExists,
    HvError,
    HypervisorError,
    InvalidState,
    PathNotAllowed,
)
from hvstack.host import export_files
from hvstack.host.checkpoint_ops import CheckpointOperations
from hvstack.host.export_files import Source
from hvstack.host.export_format import (
    DISKS,
    MACHINE,
    ExportedFile,
    Manifest,
    disk_names,
    relocated,
    state_name,
    with_disk_paths,
)
from hvstack.host.jobs import Job, Progress
from hvstack.host.service import HostService
from hvstack.hypervisor.capabilities import Backup, BlockJobs, BlockNodeSpec
from hvstack.integration.freeze import Freezer
from hvstack.progress import scaled
from hvstack.storage import overlay
from hvstack.storage.block_jobs import cancel_job, file_node, run_job
from hvstack.storage.paths import confine
from hvstack.storage.qemu_img import LONG_TIMEOUT, run_qemu_img

log = logging.getLogger(__name__)

LIVE_STATES = (VmState.RUNNING, VmState.PAUSED)
IDLE_STATES = (VmState.OFF, VmState.SAVED)


@dataclass
class _Written:
    """What an export has written so far: the folder, and the nodes and jobs it added
    to a running machine (undone on failure)."""

    folder: Path | None  # None until this export made it
    nodes: list[str]
    jobs: list[str]


class _Bytes:
    """Progress by bytes copied, over ``total``, into a share of a job's progress."""

    def __init__(self, progress: Progress, total: int, message: str) -> None:
        self._progress, self._total, self._done, self._message = progress, total, 0, message

    def __call__(self, count: int) -> None:
        self._done += count
        self._progress(100.0 * self._done / self._total if self._total else 100.0,
                       self._message)


class ExportOperations:
    def __init__(self, service: HostService, checkpoints: CheckpointOperations,
                 freezer: Freezer) -> None:
        self.service = service
        self.checkpoints = checkpoints
        self.freezer = freezer

    # -- where ------------------------------------------------------------------------

    def _target(self, directory: str, vm_name: str) -> Path:
        """``directory/vm_name``, confined to the roots; AlreadyExists if it is there."""
        config = self.service.config
        base = confine(directory, config.storage_roots, what="export folder")
        self.service.disk_use.guard(base / f"{vm_name}.qcow2")  # not the service's files
        for own in (config.vms_dir, config.images_dir):
            if base.is_relative_to(own.resolve()):
                raise PathNotAllowed(f"export folder '{base}' is inside the host service's "
                                     f"own folder {own}; export elsewhere", path=str(base))
        target = base / vm_name
        if target.exists():
            raise AlreadyExists(f"'{target}' already exists; export into another folder or "
                                "remove it", path=str(target))
        return target

    def _check_free(self, vm: VmController) -> None:
        """ResourceBusy now, not in the job, if another disk job runs on the VM."""
        with self.service.block_work.claim(vm.record.id, vm.record.name, "an export"):
            pass

    @staticmethod
    def _make(target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.mkdir()
        (target / DISKS).mkdir()

    @staticmethod
    def _missing(target: Path) -> Path:
        """The outermost folder of ``target`` that does not exist yet (what a failed
        export deletes, so it leaves no empty folders it made)."""
        top = target
        while not top.parent.exists():
            top = top.parent
        return top

    # -- hv vm export ------------------------------------------------------------------

    def export_vm(self, ref: str, directory: str) -> Job:
        """Start exporting VM ``ref`` into ``directory/<its name>``."""
        vm = self.service.get_vm(ref)
        target = self._target(directory, vm.record.name)
        self._check_free(vm)
        if vm.state not in (*LIVE_STATES, *IDLE_STATES):
            raise InvalidState(vm.record.name, vm.state.value, "export",
                               [s.value for s in (*LIVE_STATES, *IDLE_STATES)])

        async def body(progress: Progress) -> dict[str, Any]:
            with self.service.block_work.claim(vm.record.id, vm.record.name, "an export"):
                written = _Written(None, [], [])
                try:
                    return await self._export(vm, target, written, progress)
                except BaseException:
                    await asyncio.shield(self._undo(vm, written))
                    raise

        return self.service.jobs.start("export", vm.record.name, body)

    async def _undo(self, vm: VmController, written: _Written) -> None:
        machine = vm.running_machine() if vm.machine_running else None
        if machine is not None:
            for job_id in written.jobs:
                await cancel_job(machine.block_jobs, job_id)
            for node in written.nodes:
                with contextlib.suppress(HvError):
                    await machine.block_jobs.remove_node(node)
        if written.folder is not None:
            await asyncio.to_thread(shutil.rmtree, written.folder, True)

    async def _sources(self, vm: VmController, tree: CheckpointTree) -> list[Source]:
        use = self.service.disk_use
        return await export_files.gather(
            vm.record.config, tree, self.service.config.storage_roots, use.guard,
            lambda path: use.format_of(path, None))

    async def _export(self, vm: VmController, target: Path, written: _Written,
                      progress: Progress) -> dict[str, Any]:
        async with vm.lock:
            if target.exists():
                raise AlreadyExists(f"'{target}' already exists", path=str(target))
            written.folder = self._missing(target)
            self._make(target)
            state = vm.state
            if state not in (*LIVE_STATES, *IDLE_STATES):
                raise InvalidState(vm.record.name, state.value, "export",
                                   [s.value for s in (*LIVE_STATES, *IDLE_STATES)])
            tree = await self.checkpoints.tree_of(vm)
            config = vm.record.config
            sources = await self._sources(vm, tree)
            names = disk_names(str(s.path) for s in sources)
            if state in IDLE_STATES:
                result = await self._copy_all(sources, names, target, progress)
                saved = await self._machine_files(vm, target, state is VmState.SAVED)
                return await self._finish(vm, config, tree, sources, names, target,
                                          state, "offline", saved, result)
            consistency = await self._start_backup(vm, sources, names, target, written)
        # The VM may stop meanwhile: its jobs then fail, and so does the export.
        machine = vm.running_machine()
        copied = await self._copy_all([s for s in sources if not s.active], names, target,
                                      scaled(progress, 0, 50, "copying checkpoint files"))
        for job_id in list(written.jobs):
            await run_job(machine.block_jobs, job_id,
                          progress=scaled(progress, 50, 95, "copying the running disks"),
                          timeout=LONG_TIMEOUT)
            written.jobs.remove(job_id)
        for node in list(written.nodes):
            await machine.block_jobs.remove_node(node)
            written.nodes.remove(node)
        saved = await self._machine_files(vm, target, False)
        return await self._finish(vm, config, tree, sources, names, target, VmState.OFF,
                                  consistency, saved, copied)

    async def _copy_all(self, sources: list[Source], names: dict[str, str], target: Path,
                        progress: Progress) -> int:
        """Copy immutable files as they are, then point each at its copied parent."""
        total = export_files.disk_bytes([s.path for s in sources])
        count = _Bytes(progress, total, "copying disk files")
        for source in sources:
            dst = target / names[str(source.path)]
            await export_files.copy_file(source.path, dst, count)
            if source.parent is not None and source.parent_format is not None:
                await overlay.repoint(dst, Path(names[str(source.parent)]).name,
                                           source.parent_format)
        return total

    async def _start_backup(self, vm: VmController, sources: list[Source],
                            names: dict[str, str], target: Path, written: _Written) -> str:
        """Add a target node for each active file and start all backups at one instant
        (frozen if the guest can be). Returns the consistency reached."""
        jobs: BlockJobs = vm.running_machine().block_jobs
        nodes = await jobs.node_files()
        await self._clear_leftovers(jobs, nodes, sources)
        backups = []
        for source in (s for s in sources if s.active):
            dst = target / names[str(source.path)]
            size = await overlay.virtual_size(source.path, source.format)
            parent = None if source.parent is None else Path(names[str(source.parent)]).name
            fmt = "qcow2" if source.parent is not None else source.format
            await overlay.create_on(dst, size, parent, source.parent_format, fmt)
            node = _export_node(source.disk_id)
            await jobs.add_node(BlockNodeSpec(node, fmt, str(dst)))
            written.nodes.append(node)
            backups.append(Backup(f"export-{source.disk_id}",
                                  file_node(source.disk_id, str(source.path), nodes), node,
                                  "top" if source.parent is not None else "full"))
        if not backups:
            return "offline"
        consistency = "crash-consistent"
        async with contextlib.AsyncExitStack() as stack:
            if self._can_freeze(vm):
                try:
                    await stack.enter_async_context(self.freezer.frozen(vm))
                    consistency = "frozen"
                except HvError as exc:
                    log.warning("VM %s: exporting without a freeze: %s", vm.record.name, exc)
            await jobs.backup(backups)
            written.jobs.extend(b.job_id for b in backups)
        return consistency

    @staticmethod
    async def _clear_leftovers(jobs: BlockJobs, nodes: dict[str, str],
                               sources: list[Source]) -> None:
        """End the jobs and nodes an export cut short by a killed service left in QEMU
        (which outlives the service), so this one can use their names."""
        for source in (s for s in sources if s.active):
            await cancel_job(jobs, f"export-{source.disk_id}")
            node = _export_node(source.disk_id)
            if node in nodes:
                log.warning("removing the node %s a cut-short export left", node)
                with contextlib.suppress(HvError):
                    await jobs.remove_node(node)

    @staticmethod
    def _can_freeze(vm: VmController) -> bool:
        return (vm.state is VmState.RUNNING
                and vm.record.config.integration_services.backup
                and vm.link.status is ServiceStatus.OK)

    async def _machine_files(self, vm: VmController, target: Path,
                             saved: bool) -> dict[str, str | None]:
        """The UEFI variables, and a Saved VM's saved state and layout."""
        folder = target / MACHINE
        folder.mkdir()
        found: dict[str, str | None] = {"efi_vars": None, "saved_state": None,
                                        "saved_layout": None}
        files = vm.files
        wanted = {"efi_vars": files.efi_vars}
        if saved:
            wanted |= {"saved_state": files.saved_state, "saved_layout": files.saved_layout}
        for key, path in wanted.items():
            if path.is_file():
                await asyncio.to_thread(shutil.copyfile, path, folder / path.name)
                found[key] = f"{MACHINE}/{path.name}"
        return found

    async def _finish(self, vm: VmController, config: VmConfig, tree: CheckpointTree,
                      sources: list[Source], names: dict[str, str], target: Path,
                      state: VmState, consistency: str, saved: dict[str, str | None],
                      copied: int) -> dict[str, Any]:
        states: dict[str, str] = {}
        if tree.checkpoints:
            (target / "Snapshots").mkdir()
        for checkpoint in tree.checkpoints:
            for path in (checkpoint.memory_state, checkpoint.layout, checkpoint.efi_vars):
                if path is not None and Path(path).is_file():
                    states[path] = state_name(path)
                    await asyncio.to_thread(shutil.copyfile, path, target / states[path])
        files = tuple(ExportedFile(
            names[str(s.path)], "qcow2" if s.active and s.parent is not None else s.format,
            None if s.parent is None else names[str(s.parent)], s.parent_format)
            for s in sources)
        manifest = Manifest(
            vm.record.id, with_disk_paths(config, names.__getitem__), files,
            relocated(tree, names.__getitem__, lambda p: states.get(p, state_name(p))),
            state.value, saved["saved_state"], saved["saved_layout"], saved["efi_vars"],
            time.time(), consistency)
        manifest = replace(manifest, config=replace(
            manifest.config, disks=tuple(
                replace(d, format=manifest.by_path()[d.path].format)
                for d in manifest.config.disks)))
        await asyncio.to_thread(manifest.write, target)
        self.service.events.publish("vm.exported", vm=vm.record.name, id=vm.record.id,
                                    path=str(target))
        return {"vm": vm.record.name, "path": str(target), "state": state.value,
                "consistency": consistency, "files": len(files),
                "checkpoints": len(tree.checkpoints), "bytes": copied}

    # -- hv checkpoint export ------------------------------------------------------------

    async def export_checkpoint(self, ref: str, checkpoint_ref: str, directory: str) -> Job:
        """Start exporting VM ``ref`` as it was at checkpoint ``checkpoint_ref``."""
        vm = self.service.get_vm(ref)
        checkpoint = (await self.checkpoints.tree_of(vm)).get(checkpoint_ref)
        target = self._target(directory, vm.record.name)
        self._check_free(vm)

        async def body(progress: Progress) -> dict[str, Any]:
            with self.service.block_work.claim(vm.record.id, vm.record.name,
                                               "a checkpoint export"):
                written = _Written(None, [], [])
                try:
                    return await self._export_checkpoint(vm, checkpoint.id, target, written,
                                                         progress)
                except BaseException:
                    if written.folder is not None:
                        await asyncio.to_thread(shutil.rmtree, written.folder, True)
                    raise

        return self.service.jobs.start("checkpoint-export", vm.record.name, body)

    async def _export_checkpoint(self, vm: VmController, checkpoint_id: str, target: Path,
                                 written: _Written, progress: Progress) -> dict[str, Any]:
        tree = await self.checkpoints.tree_of(vm)
        checkpoint = tree.get(checkpoint_id)  # deleted meanwhile: NotFound
        config = (VmConfig.from_json(checkpoint.config) if checkpoint.config
                  else vm.record.config)
        if target.exists():
            raise AlreadyExists(f"'{target}' already exists", path=str(target))
        written.folder = self._missing(target)
        self._make(target)
        names = disk_names(str(Path(d.path).with_suffix(".qcow2")) for d in config.disks)
        files: list[ExportedFile] = []
        disks = []
        use = self.service.disk_use
        for i, disk in enumerate(config.disks):
            source = Path(checkpoint.disks.get(disk.id, disk.path))
            name = names[str(Path(disk.path).with_suffix(".qcow2"))]
            # The chain is checked (roots, service files, recorded formats) before
            # qemu-img follows it.
            await export_files.gather(replace(config, disks=(replace(disk, path=str(source)),)),
                                      CheckpointTree(), self.service.config.storage_roots,
                                      use.guard, lambda p: use.format_of(p, None))
            share = scaled(progress, 90 * i / len(config.disks),
                           90 * (i + 1) / len(config.disks), f"flattening disk {i + 1}")
            await run_qemu_img(["convert", "-U", "-p", "-f", disk.format, "-O", "qcow2", "--",
                                str(source), str(target / name)],
                               timeout=LONG_TIMEOUT, progress=share)
            files.append(ExportedFile(name, "qcow2"))
            disks.append(replace(disk, path=name, format="qcow2", owned=True))
        saved = await self._checkpoint_state(checkpoint, target)
        manifest = Manifest(vm.record.id, replace(config, name=vm.record.name,
                                                  disks=tuple(disks)),
                            tuple(files), CheckpointTree(),
                            "Saved" if saved["saved_state"] else "Off",
                            saved["saved_state"], saved["saved_layout"], saved["efi_vars"],
                            time.time(), "checkpoint", f"checkpoint:{checkpoint.name}")
        await asyncio.to_thread(manifest.write, target)
        return {"vm": vm.record.name, "checkpoint": checkpoint.name, "path": str(target),
                "state": manifest.state, "files": len(files)}

    @staticmethod
    async def _checkpoint_state(checkpoint: Checkpoint, target: Path) -> dict[str, str | None]:
        folder = target / MACHINE
        folder.mkdir()
        found: dict[str, str | None] = {"efi_vars": None, "saved_state": None,
                                        "saved_layout": None}
        wanted = {"efi_vars": (checkpoint.efi_vars, "efivars.fd")}
        if checkpoint.kind is CheckpointKind.STANDARD:
            wanted |= {"saved_state": (checkpoint.memory_state, "saved-state.bin"),
                       "saved_layout": (checkpoint.layout, "saved-state.layout.json")}
        for key, (path, name) in wanted.items():
            if path is not None and Path(path).is_file():
                await asyncio.to_thread(shutil.copyfile, path, folder / name)
                found[key] = f"{MACHINE}/{name}"
        if checkpoint.kind is CheckpointKind.STANDARD and found["saved_state"] is None:
            raise HypervisorError(f"the memory state of checkpoint '{checkpoint.name}' is "
                                  "missing", checkpoint=checkpoint.name)
        return found


def _export_node(disk_id: str) -> str:
    """The node of an export's target file on a running machine (QEMU's node names are
    at most 31 characters)."""
    return f"export-{disk_id}"[:31]
