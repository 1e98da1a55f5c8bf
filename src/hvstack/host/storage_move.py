"""Live storage migration (Hyper-V's Move-VMStorage): a VM's disks and their checkpoint
chains to another folder inside the storage roots, while it runs.

:meth:`StorageMoves.move` checks the request (the VM, the destination inside the
storage roots, the disks, free space there) and starts a host job; the job holds the
VM's :class:`~hvstack.host.block_work.BlockWork` claim throughout. What moves is
:func:`hvstack.storage.move_plan.plan_move`'s decision (the VM's own files; shared
parents such as managed images stay).

A running or paused VM keeps running on its old files until the switch:

1. the files below the active ones (checkpoint files, immutable) are copied as they
   are and their headers pointed at their copied parents (``qemu-img rebase -u``);
2. each disk's new active file is created empty on top of the copied chain, the new
   chain is added to QEMU (parents read-only), and a ``mirror`` (``sync=top``, copy
   mode ``write-blocking``: guest writes go to both files, so it converges under any
   write load) copies the active layer; once every mirror is ready,
3. the move is committed: each mirror is completed (QEMU switches the device to the
   new file), then ONE :meth:`~hvstack.host.checkpoint_ops.CheckpointOperations.store`
   renames the files in the checkpoint tree and the VM's settings together, the old
   nodes leave QEMU, and only then are the old files deleted.

An off or saved VM (its lock held, so it cannot start meanwhile): every file is copied,
the headers rebased, the same one store, then the old files deleted.

Cancelling the job, or any failure before the commit, cancels the mirrors (the device
stays on its source), removes the new nodes and deletes every copy: the records are
not touched. After the commit starts, cancelling does not interrupt it.

Crash safety: the move is recorded under ``storage-moves/<vm id>`` (:class:`PendingMove`)
before any file is made, and marked ``switching`` before the first mirror is completed.
:meth:`StorageMoves.startup` (the host's start, after the VMs were reattached) finishes
or rolls back each recorded move: a disk whose settings name the new file already, or
whose move was switching (its mirror completed or still ready in QEMU, or QEMU gone:
with write-blocking both files held the same), goes forward; any other goes back.

The VM's own folder (settings copy, saved state, checkpoint memory states, UEFI
variables) stays where the service keeps it; only disk files move.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from hvstack.checkpoints.model import CheckpointTree
from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import VmConfig, VmState
from hvstack.errors import (
    HvError,
    HypervisorError,
    InvalidInput,
    InvalidState,
    NoSpace,
    ResourceBusy,
)
from hvstack.files import remove_quietly
from hvstack.host.checkpoint_ops import CheckpointOperations
from hvstack.host.jobs import Job, Progress
from hvstack.host.service import HostService
from hvstack.host.store import Delete, Put, Store
from hvstack.hypervisor.capabilities import BlockJobs, BlockNodeSpec
from hvstack.hypervisor.spec import backing_node_id, disk_node_id
from hvstack.progress import scaled
from hvstack.storage import chain, formats, overlay
from hvstack.storage.block_jobs import cancel_job, file_node, run_job
from hvstack.storage.file_copy import copy_in_thread, sync_folder
from hvstack.storage.move_plan import DiskFiles, FileMove, MovePlan, plan_move
from hvstack.storage.paths import confine
from hvstack.storage.qemu_img import QUICK_TIMEOUT

log = logging.getLogger(__name__)

PENDING = "storage-moves/"
STORE_ATTEMPTS = 5
SPACE_MARGIN = 16 * 1024 * 1024  # the active layers grow while they are mirrored
T = TypeVar("T")
LIVE_STATES = (VmState.RUNNING, VmState.PAUSED)
OFFLINE_STATES = (VmState.OFF, VmState.SAVED)


@dataclass(frozen=True)
class PendingMove:
    """A move in progress, as a restart must finish or undo it."""

    vm_id: str
    job: str
    live: bool
    phase: str  # "copying": nothing switched yet; "switching": committing
    moves: tuple[FileMove, ...]
    made_folder: str | None = None  # the destination folder the move created

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "moves": [asdict(m) for m in self.moves]})

    @staticmethod
    def from_json(text: str) -> PendingMove:
        raw: dict[str, Any] = json.loads(text)
        return PendingMove(raw["vm_id"], raw["job"], raw["live"], raw["phase"],
                           tuple(FileMove(**m) for m in raw["moves"]), raw.get("made_folder"))


class StorageMoveRecords:
    """The pending moves under ``storage-moves/<vm id>``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def load_all(self) -> list[PendingMove]:
        return [PendingMove.from_json(e.value) for e in await self.store.scan(PENDING)]

    async def save(self, pending: PendingMove) -> None:
        await self.store.commit([Put(PENDING + pending.vm_id, pending.to_json())])

    async def forget(self, vm_id: str) -> None:
        await self.store.commit([Delete(PENDING + vm_id)])


def mirror_job_id(disk_id: str) -> str:
    return f"move-{disk_node_id(disk_id)}"


def renamed_config(config: VmConfig, renames: Mapping[str, str]) -> VmConfig:
    return replace(config, disks=tuple(replace(d, path=renames.get(d.path, d.path))
                                       for d in config.disks))


def renamed_tree(tree: CheckpointTree, renames: Mapping[str, str]) -> CheckpointTree:
    """The tree's files renamed, the disk paths in its checkpoints' settings too."""
    moved = tree.with_files(renames)

    def config(text: str) -> str:
        if not text:
            return text
        return renamed_config(VmConfig.from_json(text), renames).to_json()

    return replace(moved, checkpoints=tuple(replace(c, config=config(c.config))
                                            for c in moved.checkpoints))


def _allocated(path: str) -> int:
    with contextlib.suppress(OSError):
        return os.stat(path).st_blocks * 512
    return 0


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class StorageMoves:
    def __init__(self, service: HostService, checkpoints: CheckpointOperations) -> None:
        self.service = service
        self.checkpoints = checkpoints
        self.records = StorageMoveRecords(service.store)

    # -- the request -------------------------------------------------------------

    def _destination(self, destination: str) -> Path:
        folder = confine(destination, self.service.config.storage_roots,
                         what="destination")
        if folder.exists() and not folder.is_dir():
            raise InvalidInput(f"destination '{destination}' is not a folder",
                               path=destination)
        return folder

    def _selected(self, vm: VmController, disks: Sequence[str]) -> list[str]:
        """The ids of the disks to move (all, or those at the paths given)."""
        attached = vm.record.config.disks
        if not disks:
            return [d.id for d in attached]
        chosen = []
        for text in disks:
            path = str(confine(text, self.service.config.storage_roots, what="disk"))
            match = next((d for d in attached if d.path == path), None)
            if match is None:
                raise InvalidInput(f"VM '{vm.record.name}' has no disk '{text}'", path=text)
            chosen.append(match.id)
        return chosen

    async def _plan(self, vm: VmController, folder: Path, disk_ids: Sequence[str],
                    include_checkpoints: bool, live: bool) -> MovePlan:
        config = vm.record.config
        tree = await self.checkpoints.tree_of(vm)
        use = self.service.disk_use
        parents: dict[str, tuple[str, str]] = {}
        selected = []
        for disk in config.disks:
            if disk.id not in disk_ids:
                continue
            frozen = tuple(c.disks[disk.id] for c in tree.checkpoints if disk.id in c.disks)
            selected.append(DiskFiles(disk.id, disk.path, disk.format, disk.read_only, frozen))
            seeds = [(disk.path, disk.format),
                     *((p, self._frozen_format(tree, disk.id, p, disk.format)) for p in frozen)]
            for path, fmt in seeds:
                members = await chain.read_chain(Path(path), fmt, roots=use.roots,
                                                 guard=use.guard, timeout=QUICK_TIMEOUT,
                                                 headers=True)
                for top, below in itertools.pairwise(members):
                    parents[str(top.path)] = (str(below.path), below.format)
        children: dict[str, set[str]] = {}
        for child_path, parent_path in (await use.parents()).items():
            children.setdefault(str(parent_path), set()).add(str(child_path))
        for child, (parent, _) in parents.items():
            children.setdefault(parent, set()).add(child)
        vm_files = {d.path for d in config.disks} | tree.made | tree.referenced_files()
        elsewhere = [str(a.path) for a in use.attachments(but_vm=vm.record.id)]
        plan = plan_move(selected, destination=str(folder), parents=parents,
                         children=children, vm_files=vm_files, attached_elsewhere=elsewhere,
                         images_dir=str(self.service.config.images_dir),
                         include_checkpoints=include_checkpoints, live_read_only=live,
                         taken=os.path.lexists)
        for move in plan.moves:
            use.guard(Path(move.new))
        return plan

    @staticmethod
    def _frozen_format(tree: CheckpointTree, disk_id: str, path: str, fallback: str) -> str:
        """A checkpoint file's format as its checkpoint's settings recorded it."""
        for checkpoint in tree.checkpoints:
            if checkpoint.disks.get(disk_id) == path and checkpoint.config:
                for disk in VmConfig.from_json(checkpoint.config).disks:
                    if disk.id == disk_id and disk.path == path:
                        return disk.format
        return formats.format_for(Path(path), None) if Path(path).suffix else fallback

    def _check_space(self, folder: Path, plan: MovePlan) -> None:
        needed = sum(_allocated(m.old) for m in plan.moves) + SPACE_MARGIN
        where = _existing_ancestor(folder)
        free = shutil.disk_usage(where).free
        if needed > free:
            raise NoSpace(f"the move needs about {needed // (1024 * 1024)} MiB in '{folder}' "
                          f"but only {free // (1024 * 1024)} MiB is free there; nothing "
                          "was changed", path=str(folder), required=needed, available=free)

    def _check_state(self, vm: VmController) -> None:
        if vm.state not in (*LIVE_STATES, *OFFLINE_STATES):
            raise InvalidState(vm.record.name, vm.state.value, "move the storage of",
                               [s.value for s in (*LIVE_STATES, *OFFLINE_STATES)])

    async def move(self, ref: str, destination: str, disks: Sequence[str] = (), *,
                   include_checkpoints: bool = True, bandwidth: int | None = None) -> Job:
        """Start moving VM ``ref``'s disks (all, or those at ``disks``) into the folder
        ``destination``; ``bandwidth``: bytes per second at most (None: no limit)."""
        vm = self.service.get_vm(ref)
        folder = self._destination(destination)
        disk_ids = self._selected(vm, disks)
        if bandwidth is not None and bandwidth <= 0:
            raise InvalidInput("the bandwidth must be more than 0 bytes per second")
        self._check_state(vm)
        if (busy := self.service.block_work.busy(vm.record.id)) is not None:
            raise ResourceBusy(f"VM '{vm.record.name}' is busy with {busy}; wait for it to "
                               "end or cancel its job, then retry the move", vm=vm.record.name)
        plan = await self._plan(vm, folder, disk_ids, include_checkpoints,
                                vm.state in LIVE_STATES)
        self._check_space(folder, plan)

        async def body(progress: Progress) -> dict[str, Any]:
            with self.service.block_work.claim(vm.record.id, vm.record.name, "a storage move"):
                async with vm.lock:
                    self._check_state(vm)
                    if not vm.machine_running:
                        plan = await self._plan(vm, folder, disk_ids, include_checkpoints,
                                                False)
                        self._check_space(folder, plan)
                        moved = await self._offline(vm, plan, folder, progress, bandwidth)
                        return self._result(vm, folder, plan, moved, live=False)
                plan = await self._plan(vm, folder, disk_ids, include_checkpoints, True)
                self._check_space(folder, plan)
                moved = await self._live(vm, plan, folder, progress, bandwidth)
                return self._result(vm, folder, plan, moved, live=True)

        return self.service.jobs.start("move-storage", vm.record.name, body)

    @staticmethod
    def _result(vm: VmController, folder: Path, plan: MovePlan, moved: Sequence[FileMove],
                live: bool) -> dict[str, Any]:
        return {"vm": vm.record.name, "destination": str(folder), "live": live,
                "moved": [{"from": m.old, "to": m.new} for m in moved],
                "skipped": [{"path": p, "reason": why} for p, why in plan.skipped]}

    # -- copying -------------------------------------------------------------------

    async def _copy(self, moves: Iterable[FileMove], bandwidth: int | None,
                    progress: Progress) -> None:
        """Copy each file (parents first) and point its header at its new parent."""
        todo = list(moves)
        total = sum(os.stat(m.old).st_size for m in todo) or 1
        base = 0
        for move in todo:
            def report(done: int, base: int = base, name: str = Path(move.old).name) -> None:
                progress(100.0 * (base + done) / total, f"copying {name}")

            await copy_in_thread(Path(move.old), Path(move.new), bandwidth=bandwidth,
                                 progress=report)
            if move.backing is not None:
                await overlay.repoint(move.new, move.backing, move.backing_format or "qcow2",
                                      move.format)
            base += os.stat(move.old).st_size
        progress(100.0, "")

    @staticmethod
    def _make_folder(folder: Path) -> str | None:
        """Create the destination folder if needed; the topmost folder made, if any."""
        made = None
        path = folder
        while not path.exists():
            made, path = path, path.parent
        folder.mkdir(parents=True, exist_ok=True)
        return None if made is None else str(made)

    @staticmethod
    def _drop(paths: Iterable[str], made_folder: str | None) -> None:
        """Delete ``paths``, then the folders the move made if they are empty."""
        for path in paths:
            remove_quietly(Path(path))
        if made_folder is None:
            return
        for here, _, _ in os.walk(made_folder, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(here)

    # -- off or saved ---------------------------------------------------------------

    async def _offline(self, vm: VmController, plan: MovePlan, folder: Path,
                       progress: Progress, bandwidth: int | None) -> list[FileMove]:
        if not plan.moves:
            return []
        made = self._make_folder(folder)
        pending = PendingMove(vm.record.id, "", False, "copying", plan.moves, made)
        await self.records.save(pending)
        try:
            await self._copy(plan.moves, bandwidth, scaled(progress, 0, 95))
            await asyncio.to_thread(sync_folder, folder)
        except BaseException:
            await asyncio.shield(self._undo(pending))
            raise
        await _to_the_end(self._commit(vm, plan.moves, None, locked=True))
        progress(100.0, "")
        return list(plan.moves)

    async def _undo(self, pending: PendingMove) -> None:
        self._drop((m.new for m in pending.moves), pending.made_folder)
        await self.records.forget(pending.vm_id)

    # -- committing --------------------------------------------------------------

    async def _commit(self, vm: VmController, moves: Sequence[FileMove],
                      jobs: BlockJobs | None, *, locked: bool) -> None:
        """Store the renames (tree and settings, one transaction), remove the old nodes,
        delete the old files, forget the pending move."""
        renames = {m.old: m.new for m in moves}
        for attempt in range(STORE_ATTEMPTS if renames else 0):
            # QEMU may run on the new files already: the records must follow, so a
            # store that fails (a full disk under it) is tried again before giving up
            # (the pending move then stays for the next start of the service).
            try:
                if locked:
                    await self._store(vm, renames)
                else:
                    async with vm.lock:
                        await self._store(vm, renames)
                break
            except HvError as exc:
                if attempt + 1 == STORE_ATTEMPTS:
                    raise
                log.warning("VM %s: storing the moved files failed (%s); retrying",
                            vm.record.name, exc)
                await asyncio.sleep(2.0 ** attempt)
        if jobs is not None:
            with contextlib.suppress(HvError):  # QEMU may have stopped meanwhile
                await _remove_nodes(jobs, [m.old for m in reversed(moves)])
        await self._delete_old(vm, moves)
        await self.records.forget(vm.record.id)
        self.service.events.publish("vm.storage-moved", vm=vm.record.name, id=vm.record.id)
        log.info("VM %s: moved %d files", vm.record.name, len(moves))

    async def _delete_old(self, vm: VmController, moves: Sequence[FileMove]) -> None:
        """Delete the old files, except one that got a child meanwhile (someone made a
        differencing disk on a checkpoint file during the move): it stays, logged."""
        old = {m.old for m in moves}
        foreign = {str(parent) for child, parent in (await self.service.disk_use.parents()).items()
                   if str(child) not in old}
        for move in moves:
            if move.old in foreign:
                log.warning("VM %s: '%s' stays where it was: a disk made during the move "
                            "names it as parent", vm.record.name, move.old)
                continue
            remove_quietly(Path(move.old))

    async def _store(self, vm: VmController, renames: Mapping[str, str]) -> None:
        tree = await self.checkpoints.tree_of(vm)
        await self.checkpoints.store(vm, renamed_tree(tree, renames),
                                     renamed_config(vm.record.config, renames))

    # -- running or paused --------------------------------------------------------

    async def _live(self, vm: VmController, plan: MovePlan, folder: Path,
                    progress: Progress, bandwidth: int | None) -> list[FileMove]:
        actives = [m for m in plan.moves if m.active]
        if not actives:
            return []
        machine = vm.running_machine()
        jobs = machine.block_jobs
        made = self._make_folder(folder)
        pending = PendingMove(vm.record.id, "", True, "copying", plan.moves, made)
        await self.records.save(pending)
        started: list[str] = []
        copy_bytes = sum(os.stat(m.old).st_size for m in plan.moves if not m.active)
        mirror_bytes = sum(_allocated(m.old) for m in actives)
        split = 90.0 * copy_bytes / ((copy_bytes + mirror_bytes) or 1)
        try:
            await self._copy([m for m in plan.moves if not m.active], bandwidth,
                             scaled(progress, 0, split))
            nodes = await jobs.node_files()
            for move in actives:
                await self._start_mirror(jobs, plan, move, nodes, bandwidth)
                started.append(mirror_job_id(move.disk_id))
            await _wait_ready(jobs, started, scaled(progress, split, 90))
        except BaseException:
            await asyncio.shield(self._undo_live(jobs, started, pending))
            raise
        switching = replace(pending, phase="switching")
        return await _to_the_end(self._switch(vm, jobs, plan, switching, progress))

    async def _start_mirror(self, jobs: BlockJobs, plan: MovePlan, move: FileMove,
                            nodes: Mapping[str, str], bandwidth: int | None) -> None:
        """Make the disk's new active file, add its new chain to QEMU, start the mirror."""
        size = await overlay.virtual_size(move.old, move.format)
        await overlay.create_on(move.new, size, move.backing, move.backing_format, move.format)
        below = await self._add_chain(jobs, plan, move, nodes)
        target = backing_node_id(move.disk_id, move.new)
        await jobs.add_node(BlockNodeSpec(target, move.format, move.new, backing=below))
        job_id = mirror_job_id(move.disk_id)
        await jobs.mirror(job_id, file_node(move.disk_id, move.old, nodes), target,
                          sync="top", write_blocking=True, speed=bandwidth or 0)

    @staticmethod
    async def _add_chain(jobs: BlockJobs, plan: MovePlan, move: FileMove,
                         nodes: Mapping[str, str]) -> str | None:
        """Add the copied parents of ``move`` (base first, read-only); the node the new
        active file sits on, or None for a flat disk."""
        by_old = {m.old: m for m in plan.moves}
        copied: list[FileMove] = []
        parent = move.parent
        while parent is not None and parent in by_old:
            copied.append(by_old[parent])
            parent = by_old[parent].parent
        below = None if parent is None else file_node(move.disk_id, parent, nodes)
        for member in reversed(copied):
            name = backing_node_id(move.disk_id, member.new)
            await jobs.add_node(BlockNodeSpec(name, member.format, member.new,
                                              backing=below, read_only=True))
            below = name
        return below

    async def _undo_live(self, jobs: BlockJobs, started: Sequence[str],
                         pending: PendingMove) -> None:
        for job_id in started:
            await _cancel(jobs, job_id)
        with contextlib.suppress(HvError):
            await _remove_nodes(jobs, [m.new for m in reversed(pending.moves)])
        await self._undo(pending)

    async def _switch(self, vm: VmController, jobs: BlockJobs, plan: MovePlan,
                      pending: PendingMove, progress: Progress) -> list[FileMove]:
        """Complete every mirror, then commit the disks that switched; a disk whose
        mirror QEMU would not complete stays on its old files (an error says so)."""
        await self.records.save(pending)
        progress(92.0, "switching to the new files")
        switched, stayed = [], []
        for move in (m for m in plan.moves if m.active):
            job_id = mirror_job_id(move.disk_id)
            try:
                await jobs.complete(job_id)
                await run_job(jobs, job_id)
                switched.append(move.disk_id)
            except HvError as exc:
                log.warning("VM %s: disk %s stays on %s: %s", vm.record.name, move.disk_id,
                            move.old, exc)
                await _cancel(jobs, job_id)
                stayed.append(move)
        moved = [m for m in plan.moves if m.disk_id in switched]
        back = [m for m in plan.moves if m.disk_id not in switched]
        with contextlib.suppress(HvError):
            await _remove_nodes(jobs, [m.new for m in reversed(back)])
        self._drop((m.new for m in back), None)
        await self._commit(vm, moved, jobs, locked=False)
        if stayed:
            raise HypervisorError(
                "QEMU did not switch " + ", ".join(f"'{m.old}'" for m in stayed) +
                " to the new storage; those disks stay where they were, nothing was lost",
                vm=vm.record.name)
        progress(100.0, "")
        return moved

    # -- after a crash ---------------------------------------------------------------

    async def startup(self) -> None:
        """Finish or roll back every move a crash of the service cut short."""
        for pending in await self.records.load_all():
            try:
                await self._recover(pending)
            except HvError as exc:
                log.error("the storage move of VM %s could not be recovered: %s",
                          pending.vm_id, exc)

    async def _recover(self, pending: PendingMove) -> None:
        try:
            vm = self.service.get_vm(pending.vm_id)
        except HvError:
            await self._undo(pending)  # the VM is gone: its copies too
            return
        named = {d.path for d in vm.record.config.disks}
        jobs = vm.running_machine().block_jobs if vm.machine_running else None
        forward = set()
        for move in (m for m in pending.moves if m.active):
            if move.new in named or (pending.phase == "switching"
                                     and await _switched(jobs, move.disk_id)):
                forward.add(move.disk_id)
            elif jobs is not None:
                await _cancel(jobs, mirror_job_id(move.disk_id))
        back = [m for m in pending.moves if m.disk_id not in forward]
        if jobs is not None:
            with contextlib.suppress(HvError):
                await _remove_nodes(jobs, [m.new for m in reversed(back)])
        self._drop((m.new for m in back), pending.made_folder if not forward else None)
        done = [m for m in pending.moves if m.disk_id in forward]
        async with vm.lock:
            await self._commit(vm, done, jobs, locked=True)
        log.warning("VM %s: a storage move cut short by a restart was %s", vm.record.name,
                    "finished" if done else "rolled back")


async def _to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to its end even if the caller is cancelled meanwhile (the commit of a
    move: stopping half-way would leave the records behind QEMU); then the
    cancellation goes on."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


async def _cancel(jobs: BlockJobs, job_id: str) -> None:
    """Cancel a mirror if QEMU is still there to ask (a VM turned off took it along)."""
    with contextlib.suppress(HvError):
        await cancel_job(jobs, job_id)


async def _switched(jobs: BlockJobs | None, disk_id: str) -> bool:
    """After a crash in the switching phase: has (or can) the disk's device switch to
    the new file? QEMU gone: yes (write-blocking kept both files the same)."""
    if jobs is None:
        return True
    job_id = mirror_job_id(disk_id)
    job = next((j for j in await jobs.jobs() if j.job_id == job_id), None)
    if job is None:  # dismissed after it completed
        return True
    if job.status == "concluded":
        await jobs.dismiss(job_id)
        return job.error is None
    if job.ready:
        try:
            await jobs.complete(job_id)
            await run_job(jobs, job_id)
            return True
        except HvError:
            await _cancel(jobs, job_id)
            return False
    await _cancel(jobs, job_id)
    return False


async def _remove_nodes(jobs: BlockJobs, paths: Sequence[str]) -> None:
    """Remove the nodes of ``paths`` (top first) that QEMU still has and no longer
    uses; one in use (a shared parent) stays."""
    files = await jobs.node_files()
    for path in paths:
        for name, filename in files.items():
            if filename == path:
                try:
                    await jobs.remove_node(name)
                except HvError as exc:
                    log.debug("node %s stays: %s", name, exc)


async def _wait_ready(jobs: BlockJobs, job_ids: Sequence[str], progress: Progress) -> None:
    shares = dict.fromkeys(job_ids, 0.0)

    def part(job_id: str) -> Progress:
        def report(percent: float, message: str) -> None:
            shares[job_id] = percent
            progress(sum(shares.values()) / len(shares), "mirroring the active disks")
        return report

    try:
        async with asyncio.TaskGroup() as group:
            for job_id in job_ids:
                group.create_task(run_job(jobs, job_id, until_ready=True,
                                          progress=part(job_id)))
    except* HvError as failed:  # the first failure says why; the others follow from it
        error = failed.exceptions[0]
        if isinstance(error, HvError) and "No space left" in error.message:
            raise NoSpace(f"the destination filled up during the move ({error.message}); "
                          "the VM stays on its old storage", **error.data) from None
        raise error from None
