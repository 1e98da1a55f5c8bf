"""Checkpoints of the host's VMs: the tree in the store, and every operation on it.

:class:`CheckpointOperations` keeps each VM's :class:`~hvstack.checkpoints.model.CheckpointTree`
(``checkpoints/<vm id>`` in the store, cached here) and offers the operations the API,
the CLI and the other host operations use: create, list, apply, rename (this module),
delete with its merge (:mod:`hvstack.host.checkpoint_merge`). Every operation that
changes disk files holds the VM's :class:`~hvstack.host.block_work.BlockWork` claim;
every change of the tree is stored with :meth:`CheckpointOperations.store`, together
with the VM's settings when its disk paths change (one transaction: the store never
names a file the other does not).

Creating (a job, in the VM's lock): an Off VM gets a production checkpoint (offline
overlays); a Saved VM a standard one (offline overlays, its saved state hard-linked
into the checkpoint); a Running or Paused VM what its checkpoint type says: production
(the guest frozen through its agent; a standard checkpoint instead when it cannot
freeze, said in the result and an event), production-only (Conflict when it cannot
freeze, nothing changed) or standard (the guest held still while its disks are
snapshotted and its memory saved, then it goes on). A failure leaves the VM on its old
files (a live snapshot is committed back) with nothing made left behind.

Applying (a job): optionally a checkpoint of the current state first; a running VM is
turned off, a saved one's state discarded; new overlays on the checkpoint's files
become the disks, the checkpoint's settings the VM's (its name, notes, checkpoint and
automatic start/stop settings stay); a standard checkpoint leaves the VM Saved with the
checkpoint's memory state, a production one Off. The previous active overlays are
deleted when only the unsaved state needed them.

Automatic checkpoints: a start from Off of a VM with ``automatic_checkpoints`` first
makes one (a production one: the VM is Off). At the VM's checkpoint limit none is made
and the start goes on (a ``vm.checkpoint-skipped`` event and a log line say so); other
failures fail the start, which then changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from hvstack import files
from hvstack.checkpoints import files as names
from hvstack.checkpoints.model import (
    Checkpoint,
    CheckpointKind,
    CheckpointTree,
    check_limit,
    check_type_allows,
    default_name,
    new_checkpoint_id,
)
from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import (
    CheckpointType,
    Generation,
    ServiceStatus,
    VmConfig,
    VmState,
)
from hvstack.compute.states import Operation
from hvstack.errors import Conflict, HvError, NotFound
from hvstack.host import checkpoint_disks as disks
from hvstack.host import checkpoint_merge, checkpoint_repair
from hvstack.host.jobs import Job
from hvstack.host.records import CheckpointRecords
from hvstack.host.service import HostService
from hvstack.progress import Progress, scaled

log = logging.getLogger(__name__)

# The settings applying a checkpoint leaves as they are (Hyper-V's too).
KEPT_ON_APPLY = ("name", "notes", "checkpoint_type", "automatic_checkpoints",
                 "checkpoint_limit", "auto_start", "auto_start_delay_seconds", "auto_stop")


class Freezing(Protocol):
    """The guest's file systems frozen for a body (the backup integration service:
    :meth:`hvstack.integration.ops.GuestOperations.frozen`)."""

    def frozen(self, vm: VmController) -> contextlib.AbstractAsyncContextManager[int]: ...


class CheckpointOperations:
    def __init__(self, service: HostService, freezing: Freezing | None = None) -> None:
        self.service = service
        self.records = CheckpointRecords(service.store)
        self._trees: dict[str, CheckpointTree] = {}
        self.freezing = freezing
        # One hook per service, also when a test builds a second root on it.
        service.start_jobs[:] = [
            hook for hook in service.start_jobs
            if not isinstance(getattr(hook, "__self__", None), CheckpointOperations)]
        service.start_jobs.append(self._automatic)
        service.provisioning.checkpoint_files = self.deletable_files

    async def tree_of(self, vm: VmController) -> CheckpointTree:
        """The VM's checkpoint tree (empty if it has none)."""
        tree = self._trees.get(vm.record.id)
        if tree is None:
            tree = self._trees[vm.record.id] = await self.records.load(vm.record.id)
        return tree

    async def store(self, vm: VmController, tree: CheckpointTree,
                    config: VmConfig | None = None) -> None:
        """Store ``tree`` and, if given and changed, the VM's new settings ``config``
        in one transaction. The caller holds ``vm.lock``."""
        op = CheckpointRecords.op(vm.record.id, tree)
        if config is None or config == vm.record.config:
            await self.service.store.commit([op])
        else:
            await self.service.provisioning.store_config(vm, config, also=[op])
        self._trees[vm.record.id] = tree
        self.service.events.publish("vm.checkpoints", vm=vm.record.name, id=vm.record.id)

    # -- the operations -------------------------------------------------------------

    async def listing(self, ref: str) -> tuple[VmController, CheckpointTree]:
        """The VM ``ref`` names and its checkpoint tree."""
        vm = self.service.get_vm(ref)
        return vm, await self.tree_of(vm)

    async def create(self, ref: str, name: str | None = None) -> Job:
        """Start a job that checkpoints VM ``ref`` (its checkpoint type decides how);
        what is wrong at once (type disabled, limit, name, state) is raised here."""
        vm = self.service.get_vm(ref)
        config = vm.record.config
        check_type_allows(config.checkpoint_type.value)
        vm.require(Operation.CHECKPOINT)
        tree = await self.tree_of(vm)
        check_limit(tree, config.checkpoint_limit)
        if name is not None:
            tree.check_new_name(name)

        async def body(progress: Progress) -> dict[str, Any]:
            async with vm.lock:
                self._check_held(vm)
                return await self._checkpoint(vm, name, progress)

        return self._claimed_job(vm, "checkpoint", "a checkpoint", body)

    async def apply(self, ref: str, checkpoint: str, save_current: bool = False) -> Job:
        """Start a job that returns VM ``ref`` to ``checkpoint``."""
        vm = self.service.get_vm(ref)
        vm.require(Operation.APPLY_CHECKPOINT)
        tree = await self.tree_of(vm)
        target = tree.get(checkpoint)
        if save_current:
            check_type_allows(vm.record.config.checkpoint_type.value)
            check_limit(tree, vm.record.config.checkpoint_limit)

        async def body(progress: Progress) -> dict[str, Any]:
            async with vm.lock:
                self._check_held(vm)
                return await self._apply(vm, target.id, save_current, progress)

        return self._claimed_job(vm, "checkpoint-apply", "applying a checkpoint", body)

    async def rename(self, ref: str, checkpoint: str, name: str) -> Checkpoint:
        vm = self.service.get_vm(ref)
        async with vm.lock:
            tree = await self.tree_of(vm)
            renamed = tree.renamed(checkpoint, name)
            if renamed is not tree:
                await self.store(vm, renamed)
            return renamed.get(tree.get(checkpoint).id)

    def forget(self, vm_id: str) -> None:
        """Drop the cached tree of a deleted VM (its record went with the VM's)."""
        self._trees.pop(vm_id, None)

    # -- jobs --------------------------------------------------------------------------

    def _claimed_job(self, vm: VmController, kind: str, what: str,
                     body: Callable[[Progress], Awaitable[dict[str, Any]]]) -> Job:
        """A job holding the VM's disk claim from now until it ends (taken before it
        starts: a second disk job is refused at once)."""
        claim = contextlib.ExitStack()
        claim.enter_context(self.service.block_work.claim(vm.record.id, vm.record.name, what))
        try:
            job = self.service.jobs.start(kind, vm.record.name, body)
        except BaseException:
            claim.close()
            raise
        assert job.task is not None
        job.task.add_done_callback(lambda _: claim.close())
        return job

    def _check_held(self, vm: VmController) -> None:
        if not self.service.registry.holds(vm):  # deleted while the job waited
            raise NotFound(f"VM '{vm.record.name}' was deleted", vm=vm.record.name)

    # -- creating ----------------------------------------------------------------------

    def _name(self, tree: CheckpointTree, vm: VmController, when: float,
              automatic: bool) -> str:
        base = default_name(vm.record.name, when, automatic=automatic)
        taken = {c.name for c in tree.checkpoints}
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base} ({n})"
        return name

    async def _checkpoint(self, vm: VmController, name: str | None, progress: Progress,
                          *, automatic: bool = False) -> dict[str, Any]:
        """Checkpoint ``vm`` now. The caller holds the disk claim and ``vm.lock``."""
        config = vm.record.config
        check_type_allows(config.checkpoint_type.value)
        vm.require(Operation.CHECKPOINT)
        tree = await self.tree_of(vm)
        check_limit(tree, config.checkpoint_limit)
        now = time.time()
        name = name if name is not None else self._name(tree, vm, now, automatic)
        tree.check_new_name(name)
        checkpoint_id = new_checkpoint_id()
        overlays = disks.plan_overlays(disks.writable(config.disks),
                                       tree.made | tree.referenced_files())
        for overlay in overlays:
            self.service.disk_use.confine(overlay.path, must_exist=False)
        folder = vm.files.checkpoint_dir
        folder.mkdir(parents=True, exist_ok=True)
        memory = folder / names.memory_state_name(checkpoint_id)
        layout = folder / names.layout_name(checkpoint_id)
        progress(5, "making the differencing disks")
        await disks.make_overlays(overlays)
        made: list[Path] = [Path(o.path) for o in overlays]
        taken: list[bool] = []  # the running machine writes to the overlays
        note = ""
        try:
            if vm.state is VmState.OFF:
                kind = CheckpointKind.PRODUCTION
            elif vm.state is VmState.SAVED:
                kind = CheckpointKind.STANDARD
                made += [memory, layout]
                await asyncio.to_thread(self._keep_saved_state, vm, memory, layout)
            else:
                made += [memory, layout]
                kind, note = await self._live(vm, overlays, memory, layout, taken,
                                              scaled(progress, 10, 90, "checkpointing"))
            efi = await asyncio.to_thread(self._copy_efi_vars, vm, folder, checkpoint_id)
            if efi is not None:
                made.append(Path(efi))
            has_memory = kind is CheckpointKind.STANDARD
            checkpoint = Checkpoint(
                checkpoint_id, name, None, now, kind,
                {o.disk_id: o.frozen for o in overlays}, config.to_json(),
                str(memory) if has_memory else None,
                str(layout) if has_memory and layout.exists() else None, efi, automatic)
            progress(95, "recording the checkpoint")
            await self._record(vm, tree, checkpoint, overlays)
        except BaseException as exc:
            if taken:
                try:
                    await self._undo_live(vm, overlays)
                except HvError:
                    disks.remove_files([memory, layout])
                    await self._keep_taken(vm, tree, Checkpoint(
                        checkpoint_id, name, None, now, CheckpointKind.PRODUCTION,
                        {o.disk_id: o.frozen for o in overlays}, config.to_json(),
                        automatic=automatic), overlays, exc)
                    raise
            disks.remove_files(made)
            raise
        if taken:
            self._chains_grew(vm, overlays)
        if note:
            self.service.events.publish("vm.checkpoint-fallback", vm=vm.record.name,
                                        id=vm.record.id, checkpoint=name, reason=note)
        log.info("VM %s: %s checkpoint '%s' created", vm.record.name, kind.value, name)
        return {"id": checkpoint_id, "name": name, "kind": kind.value, "note": note,
                "automatic": automatic, "state": vm.state.value}

    async def _record(self, vm: VmController, tree: CheckpointTree, checkpoint: Checkpoint,
                      overlays: list[disks.Overlay]) -> None:
        """Store the new checkpoint with the overlays as the VM's disks."""
        config = vm.record.config
        new_config = replace(config, disks=disks.with_overlays(config.disks, overlays))
        await self.store(vm, tree.added(checkpoint, made=[o.path for o in overlays]),
                         new_config)

    async def _keep_taken(self, vm: VmController, tree: CheckpointTree,
                          checkpoint: Checkpoint, overlays: list[disks.Overlay],
                          exc: BaseException) -> None:
        """The checkpoint failed after its snapshot and the snapshot could not be undone:
        the machine writes to the overlays, so the store must name them. Kept as a
        disks-only checkpoint (the guest was frozen or still at the snapshot)."""
        why = exc.message if isinstance(exc, HvError) else "it was cancelled"
        log.error("VM %s: checkpoint '%s' failed after its snapshot (%s) and the snapshot "
                  "could not be undone; it is kept as a disks-only checkpoint",
                  vm.record.name, checkpoint.name, why)
        try:
            await asyncio.shield(self._record(vm, tree, checkpoint, overlays))
        except HvError as store_exc:
            log.error("VM %s: recording the kept checkpoint failed too: %s; the VM writes "
                      "to %s", vm.record.name, store_exc, ", ".join(o.path for o in overlays))
            return
        self._chains_grew(vm, overlays)
        self.service.events.publish("vm.checkpoint-fallback", vm=vm.record.name,
                                    id=vm.record.id, checkpoint=checkpoint.name,
                                    reason=f"kept as a disks-only checkpoint: {why}")

    async def _live(self, vm: VmController, overlays: list[disks.Overlay], memory: Path,
                    layout: Path, taken: list[bool], progress: Progress
                    ) -> tuple[CheckpointKind, str]:
        """Snapshot a running or paused VM's disks (frozen guest, or held still with
        its memory saved); the kind made and a note when production fell back.
        ``taken`` gets an entry once the machine writes to the overlays."""
        wanted = vm.record.config.checkpoint_type
        note = ""
        if wanted is not CheckpointType.STANDARD:
            async with contextlib.AsyncExitStack() as stack:
                why = await self._freeze(vm, stack)
                if why is None:
                    progress(20, "guest frozen: taking the snapshot")
                    await disks.snapshot_live(vm.running_machine().block_jobs, overlays)
                    taken.append(True)
                    return CheckpointKind.PRODUCTION, ""
            if wanted is CheckpointType.PRODUCTION_ONLY:
                raise Conflict(f"VM '{vm.record.name}' cannot make a production checkpoint: "
                               f"{why}; its checkpoint type is production-only, so nothing "
                               "was made", vm=vm.record.name)
            note = f"a standard checkpoint instead: {why}"
            log.warning("VM %s: %s", vm.record.name, note)
        async with vm.held_still(Operation.CHECKPOINT) as machine:
            progress(10, "guest held still: taking the snapshot")
            await disks.snapshot_live(machine.block_jobs, overlays)
            taken.append(True)
            await vm.save_memory(memory, layout, scaled(progress, 15, 95, "saving memory"))
        return CheckpointKind.STANDARD, note

    async def _freeze(self, vm: VmController, stack: contextlib.AsyncExitStack) -> str | None:
        """Freeze the guest for the rest of ``stack``; why it cannot be, else None."""
        if vm.state is not VmState.RUNNING:
            return f"the VM is {vm.state.value}, so its guest cannot freeze"
        if self.freezing is None:
            return "this host service cannot freeze guests"
        if not vm.record.config.integration_services.backup:
            return "its backup integration service is off"
        if vm.link.status is not ServiceStatus.OK:
            # Asking would wait for the agent's timeout, and a failed freeze is thawed
            # again and again for a while: no freeze is tried without an answering agent.
            return "its guest agent does not answer"
        try:
            await stack.enter_async_context(self.freezing.frozen(vm))
        except HvError as exc:
            return f"its guest cannot freeze ({exc.message})"
        return None

    async def _undo_live(self, vm: VmController, overlays: list[disks.Overlay]) -> None:
        """A live snapshot whose checkpoint could not be recorded: back onto the old
        files (the overlays are deleted after)."""
        try:
            await asyncio.shield(disks.unsnapshot_live(vm.running_machine().block_jobs,
                                                       overlays))
        except HvError as exc:
            log.error("VM %s: a checkpoint failed and its snapshot could not be undone: %s; "
                      "the VM writes to %s", vm.record.name, exc,
                      ", ".join(o.path for o in overlays))
            raise

    def _chains_grew(self, vm: VmController, overlays: list[disks.Overlay]) -> None:
        """The running machine's chains, as the start recorded them, now have each
        frozen file below its overlay (for reports of disk errors)."""
        from hvstack.compute.machine import BackingFile

        chains = self.service.registry.chains.setdefault(vm.record.id, {})
        for overlay in overlays:
            chains[overlay.disk_id] = (BackingFile(overlay.frozen, overlay.frozen_format),
                                       *chains.get(overlay.disk_id, ()))

    @staticmethod
    def _keep_saved_state(vm: VmController, memory: Path, layout: Path) -> None:
        files.link_or_copy(vm.files.saved_state, memory)
        if vm.files.saved_layout.exists():
            files.link_or_copy(vm.files.saved_layout, layout)

    @staticmethod
    def _copy_efi_vars(vm: VmController, folder: Path, checkpoint_id: str) -> str | None:
        if vm.record.config.generation is not Generation.GEN2 or not vm.files.efi_vars.exists():
            return None
        target = folder / names.efi_vars_name(checkpoint_id)
        shutil.copyfile(vm.files.efi_vars, target)
        return str(target)

    async def _automatic(self, vm: VmController, progress: Progress) -> None:
        """Before a start from Off (in the start job, in the VM's lock): the automatic
        checkpoint, if the VM has them on."""
        config = vm.record.config
        if (not config.automatic_checkpoints or vm.state is not VmState.OFF
                or config.checkpoint_type is CheckpointType.DISABLED):
            return
        tree = await self.tree_of(vm)
        if len(tree) >= config.checkpoint_limit:
            reason = (f"the VM has {len(tree)} checkpoints, its limit; no automatic "
                      "checkpoint was made")
            log.warning("VM %s: %s", vm.record.name, reason)
            self.service.events.publish("vm.checkpoint-skipped", vm=vm.record.name,
                                        id=vm.record.id, reason=reason)
            return
        with self.service.block_work.claim(vm.record.id, vm.record.name,
                                           "an automatic checkpoint"):
            await self._checkpoint(vm, None, scaled(progress, 0, 5, "automatic checkpoint"),
                                   automatic=True)

    # -- applying ----------------------------------------------------------------------

    async def _apply(self, vm: VmController, checkpoint_id: str, save_current: bool,
                     progress: Progress) -> dict[str, Any]:
        """Apply a checkpoint. The caller holds the disk claim and ``vm.lock``."""
        vm.require(Operation.APPLY_CHECKPOINT)
        tree = await self.tree_of(vm)
        target = tree.get(checkpoint_id)  # NotFound if it went meanwhile
        result: dict[str, Any] = {"id": target.id, "name": target.name,
                                  "kind": target.kind.value}
        missing = [p for p in (*target.disks.values(), target.memory_state)
                   if p is not None and not Path(p).exists()]
        if missing:  # found before the VM is turned off for nothing
            raise NotFound(f"checkpoint '{target.name}' cannot be applied: its file "
                           f"{missing[0]} is missing", checkpoint=target.name, path=missing[0])
        if save_current:
            saved = await self._checkpoint(vm, None, scaled(progress, 0, 40, "saving current"))
            result["saved_current"] = saved["name"]
            tree = await self.tree_of(vm)
        if vm.state in (VmState.RUNNING, VmState.PAUSED):
            progress(45, "turning the VM off")
            await vm.turn_off(f"turned off to apply checkpoint '{target.name}'")
        elif vm.state is VmState.SAVED:
            await vm.discard_saved_state()
        vm.require(Operation.APPLY_CHECKPOINT)
        progress(50, "making the differencing disks")
        await self._apply_off(vm, tree, target)
        progress(100, "")
        result["state"] = vm.state.value
        return result

    async def _apply_off(self, vm: VmController, tree: CheckpointTree,
                         target: Checkpoint) -> None:
        current = vm.record.config
        then = VmConfig.from_json(target.config)
        frozen = [replace(d, path=target.disks[d.id]) for d in then.disks
                  if d.id in target.disks]
        overlays = disks.plan_overlays(frozen, tree.made | tree.referenced_files())
        for overlay in overlays:
            self.service.disk_use.confine(overlay.path, must_exist=False)
        await disks.make_overlays(overlays)
        standard = target.kind is CheckpointKind.STANDARD and target.memory_state is not None
        new_config = replace(then, disks=disks.with_overlays(then.disks, overlays),
                             **{k: getattr(current, k) for k in KEPT_ON_APPLY})
        new_tree = tree.applied(target.id, made=[o.path for o in overlays])
        doomed = await self._left_behind(vm, new_tree, current.disks)
        new_tree = replace(new_tree, made=new_tree.made - doomed)
        try:
            if standard:
                await asyncio.to_thread(self._restore_files, vm, target)
            await self.store(vm, new_tree, new_config)
        except BaseException:
            disks.remove_files(o.path for o in overlays)
            if standard:
                vm.files.saved_state.unlink(missing_ok=True)
                vm.files.saved_layout.unlink(missing_ok=True)
            raise
        if target.efi_vars is not None and Path(target.efi_vars).exists():
            try:
                await asyncio.to_thread(shutil.copyfile, target.efi_vars, vm.files.efi_vars)
            except OSError as exc:
                log.error("VM %s: the UEFI variables of checkpoint '%s' could not be put "
                          "back: %s", vm.record.name, target.name, exc)
        vm.restored_checkpoint(standard, f"checkpoint '{target.name}' applied")
        disks.remove_files(doomed)

    async def _left_behind(self, vm: VmController, tree: CheckpointTree,
                           old: Iterable[Any]) -> frozenset[str]:
        """The previous active files that only the unsaved state needed: made by a
        checkpoint, named by none, parent of no file."""
        referenced = tree.referenced_files()
        candidates = {d.path for d in old if d.path in tree.made and d.path not in referenced}
        if not candidates:
            return frozenset()
        parents = await self.service.disk_use.parents()
        used = {str(parent) for parent in parents.values()}
        return frozenset(candidates - used)

    @staticmethod
    def _restore_files(vm: VmController, target: Checkpoint) -> None:
        assert target.memory_state is not None
        files.link_or_copy(Path(target.memory_state), vm.files.saved_state)
        if target.layout is not None and Path(target.layout).exists():
            files.link_or_copy(Path(target.layout), vm.files.saved_layout)
        else:
            vm.files.saved_layout.unlink(missing_ok=True)

    # -- deleting the VM -------------------------------------------------------------

    async def deletable_files(self, vm: VmController) -> list[tuple[str, bool]]:
        """The files of the VM's checkpoints beside its current disks, each with
        whether ``vm delete --delete-disks`` may delete it: a file a checkpoint made,
        or one that was a disk created for the VM (never an attached one)."""
        tree = await self.tree_of(vm)
        owned: set[str] = set()
        for checkpoint in tree.checkpoints:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                then = VmConfig.from_json(checkpoint.config)
                owned |= {checkpoint.disks[d.id] for d in then.disks
                          if d.owned and d.id in checkpoint.disks}
        found = tree.made | tree.referenced_files()
        self.forget(vm.record.id)
        return [(path, path in tree.made or path in owned) for path in sorted(found)]

    # -- deletion and merging (hvstack.host.checkpoint_merge) ---------------------------

    async def delete(self, ref: str, checkpoint: str, subtree: bool = False) -> Job:
        """Delete a checkpoint (``subtree``: with every checkpoint below it); the job
        merges its files so that nothing else changes."""
        return await checkpoint_merge.delete(self, ref, checkpoint, subtree)

    async def startup(self) -> tuple[Job, ...]:
        """Record the live checkpoints a killed service took but did not store, then
        finish the merges it left pending (one job each)."""
        for vm in self.service.list_vms():
            await checkpoint_repair.adopt_unrecorded(self, vm)
        return tuple(await checkpoint_merge.startup(self))
