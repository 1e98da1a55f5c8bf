"""Deleting checkpoints, and carrying out the merge of their files.

:func:`delete` takes the checkpoints out of the tree at once (stored with a
``PendingMerge`` before any file changes; their memory states go with them) and starts
a host job that does the merge plan of :mod:`hvstack.checkpoints.merge` one step at a
time, planning again from the qcow2 headers on disk after each step:

* :class:`~hvstack.checkpoints.merge.Remove`: the file is deleted (then forgotten);
* :class:`~hvstack.checkpoints.merge.Commit` of X into F, with the VM running and X in
  the running chain of a disk: ``block-commit`` in QEMU. X the disk's active file: an
  active commit, waited until ready, a pending "pivot" stored, ``complete`` (the device
  switches to F), the tree and disk path stored, the job dismissed. X below it: a commit
  of the intermediate node (QEMU names F in the header of the node above X). Then X's
  node is removed and X deleted. Otherwise: ``qemu-img commit`` of X into F, under the
  VM's lock (a start waits), then ``qemu-img rebase -u`` of X's children onto F, the
  tree and the disk paths stored, X deleted.

Before a commit writes F, its file system must have room for all of X (NoSpace
otherwise; QEMU's or qemu-img's "no space" is NoSpace too); clusters a cut-short commit
leaked in F are given back (``qemu-img check -r leaks``) before an offline commit.
A VM that stops during a live step makes it fail; the step is planned again, offline.
Failure or cancellation leaves every view intact (X keeps its data in front of F until
the tree names F instead) and the merge pending: the service's next start, or the next
deletion on the VM, plans again and finishes it.
:func:`resume` (at the service's start) finishes a pending merge: a QEMU job of it still
there is completed or dismissed as its state says, a commit whose children already name
F is only recorded, and the plan is made again from the headers and carried out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvstack.checkpoints import merge
from hvstack.checkpoints.merge import Commit, Files, Link, Remove, Step
from hvstack.checkpoints.model import CheckpointTree, PendingMerge
from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import VmConfig, VmState
from hvstack.errors import HvError, HypervisorError, InvalidInput, NoSpace
from hvstack.host.jobs import Job, JobBody, Progress
from hvstack.hypervisor.capabilities import BlockJobInfo, BlockJobs
from hvstack.storage import overlay, usage
from hvstack.storage.block_jobs import POLL, file_node, run_job
from hvstack.storage.qcow2_header import read_links
from hvstack.storage.qemu_img import LONG_TIMEOUT, run_qemu_img

if TYPE_CHECKING:
    from hvstack.host.checkpoint_ops import CheckpointOperations

log = logging.getLogger(__name__)

PIVOT_WAIT = 120.0  # seconds for a completed active commit to conclude


# -- what is on disk ------------------------------------------------------------------


async def read_files(ops: CheckpointOperations, vm: VmController,
                     tree: CheckpointTree) -> Files:
    """The VM's files as the plan needs them, from the headers on disk."""
    service = ops.service
    config = vm.record.config
    current = {d.id: d.path for d in config.disks}
    formats = {d.id: d.format for d in config.disks}
    own = tree.referenced_files() | set(current.values()) | tree.made | tree.bases
    attached = [Path(p) for p in own if p.endswith(".qcow2")]

    def scan() -> tuple[dict[str, Link], frozenset[str]]:
        parents = usage.scan_parents(service.config.storage_roots, attached,
                                     [service.config.run_dir])
        links: dict[str, Link] = {}
        for child, parent in parents.items():
            fmt = ""
            if str(child) in own:
                header = read_links(child)
                if header is None or not header.backing_format:
                    raise InvalidInput(f"'{child}' names its parent without a format; "
                                       "refusing to merge it", path=str(child))
                fmt = header.backing_format
            links[str(child)] = Link(str(parent), fmt)
        return links, frozenset(p for p in own if os.path.exists(p))

    links, existing = await asyncio.to_thread(scan)
    return Files(current, formats, links, existing)


def _chain(files: Files, top: str) -> list[str]:
    """``top`` and its parents, nearest first."""
    chain = [top]
    while (link := files.links.get(chain[-1])) is not None and link.parent not in chain:
        chain.append(link.parent)
    return chain


def _running(vm: VmController) -> bool:
    return vm.machine_running and vm.state in (VmState.RUNNING, VmState.PAUSED)


def _live_disk(vm: VmController, files: Files, step: Commit) -> str | None:
    """The disk whose running chain holds X, if the VM runs."""
    if not _running(vm):
        return None
    for disk, top in files.current.items():
        if step.file in _chain(files, top):
            return disk
    return None


def _config_after(config: VmConfig, files: Files) -> VmConfig:
    disks = tuple(replace(d, path=files.current[d.id], format=files.formats[d.id])
                  if d.id in files.current else d for d in config.disks)
    return replace(config, disks=disks)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- the steps ---------------------------------------------------------------------------


class Merger:
    """One merge run on one VM (the caller holds its BlockWork claim)."""

    def __init__(self, ops: CheckpointOperations, vm: VmController, job_id: str) -> None:
        self.ops = ops
        self.vm = vm
        self.job_id = job_id
        self._locked = False

    async def _store(self, tree: CheckpointTree, config: VmConfig | None = None) -> None:
        if self._locked:  # an offline step holds the VM's lock already
            await self.ops.store(self.vm, tree, config)
            return
        async with self.vm.lock:
            await self.ops.store(self.vm, tree, config)

    async def _pending(self, tree: CheckpointTree, steps: list[dict[str, Any]]) -> CheckpointTree:
        deleted = tree.pending.deleted if tree.pending is not None else ()
        tree = tree.with_pending(PendingMerge(deleted, tuple(steps), self.job_id))
        await self._store(tree)
        return tree

    async def _done(self, files: Files, step: Step) -> None:
        """Record ``step`` as done: the tree and the VM's disk paths, pending cleared of it."""
        tree = await self.ops.tree_of(self.vm)
        tree, after = merge.after_step(tree, files, step)
        pending = tree.pending
        if pending is not None:
            tree = tree.with_pending(PendingMerge(pending.deleted, (), pending.job))
        await self._store(tree, _config_after(self.vm.record.config, after))

    async def run(self, progress: Progress) -> dict[str, Any]:
        """Plan and do steps until none is left, then clear the pending merge. One that
        fails or is cancelled stays pending (every view is intact at any point): the
        service's next start or the VM's next checkpoint deletion finishes it."""
        done: list[dict[str, Any]] = []
        while True:
            tree = await self.ops.tree_of(self.vm)
            files = await read_files(self.ops, self.vm, tree)
            kept = merge.forgotten(tree, files)
            if kept != tree:
                await self._store(kept)
                tree = kept
            steps = merge.plan(tree, files)
            if not steps:
                break
            progress(100.0 * len(done) / (len(done) + len(steps)),
                     f"merging: {len(steps)} step(s) left")
            raw = merge.step_to_json(steps[0])
            await self._pending(tree, [raw, *map(merge.step_to_json, steps[1:])])
            await self._do(steps[0], files, progress)
            done.append(raw)
        tree = await self.ops.tree_of(self.vm)
        if tree.pending is not None:
            await self._store(tree.with_pending(None))
        return {"steps": done}

    async def _do(self, step: Step, files: Files, progress: Progress) -> None:
        log.info("VM %s: merge step %s", self.vm.record.name, merge.step_to_json(step))
        if isinstance(step, Remove):
            await asyncio.to_thread(_unlink, step.file)
            await self._done(files, step)
            return
        await asyncio.to_thread(_check_room, step)
        disk = _live_disk(self.vm, files, step)
        if disk is None:
            await self._offline(step, files)
            return
        try:
            await self._live(step, files, disk, progress)
        except HypervisorError:
            if _running(self.vm):
                raise
            log.info("VM %s stopped during a live merge; merging offline",
                     self.vm.record.name)

    async def _offline(self, step: Commit, files: Files) -> None:
        async with self._unless_running():
            if _running(self.vm):
                return  # started meanwhile: planned again, live
            # Into the parent X's header names (F, as planned); -d: X stays whole
            # until it is deleted, so a cut-short commit leaves every view intact.
            if step.into_format == "qcow2":
                await _repair_leaks(step.into)
            await run_qemu_img(["commit", "-f", "qcow2", "-d", "--", step.file],
                               timeout=LONG_TIMEOUT)
            await self._rebase(step, step.children)
            await self._done(files, step)
        await asyncio.to_thread(_unlink, step.file)

    @contextlib.asynccontextmanager
    async def _unless_running(self) -> AsyncIterator[None]:
        """The VM's lock while it is off or saved (a start waits for the offline step);
        none while it runs (its files are not the running chain's)."""
        if _running(self.vm):
            yield
            return
        await self.vm.lock.acquire()
        self._locked = True
        try:
            yield
        finally:
            self._locked = False
            self.vm.lock.release()

    async def _rebase(self, step: Commit, children: tuple[str, ...]) -> None:
        for child in children:
            await overlay.repoint(child, step.into, step.into_format)

    async def _live(self, step: Commit, files: Files, disk: str, progress: Progress) -> None:
        jobs = self.vm.running_machine().block_jobs
        nodes = await jobs.node_files()
        chain = _chain(files, files.current[disk])
        above = chain[chain.index(step.file) - 1] if chain[0] != step.file else None
        root = file_node(disk, chain[0], nodes)
        top = file_node(disk, step.file, nodes)
        base = file_node(disk, step.into, nodes)
        await jobs.writable(base)
        if above is not None:
            await jobs.writable(file_node(disk, above, nodes))
        job_id = f"cpmerge-{secrets.token_hex(4)}"
        tree = await self.ops.tree_of(self.vm)
        pending = tree.pending.steps if tree.pending is not None else ()
        marked = {**merge.step_to_json(step), "qemu_job": job_id}
        await self._pending(tree, [marked, *[dict(s) for s in pending[1:]]])
        if above is None:
            await jobs.commit(job_id, root, top=top, base=base)
            async with _room(step):
                await run_job(jobs, job_id, until_ready=True, progress=progress)
            await self._pending(await self.ops.tree_of(self.vm),
                                [{**marked, "pivot": True}, *[dict(s) for s in pending[1:]]])
            await asyncio.shield(self._pivot(jobs, job_id, files, step, top))
        else:
            await jobs.commit(job_id, root, top=top, base=base, backing_file=step.into)
            async with _room(step):
                await run_job(jobs, job_id, progress=progress)
            others = tuple(c for c in step.children if c != above)
            await self._rebase(step, others)
            await self._done(files, step)
            await _remove_nodes(jobs, top)
            await asyncio.to_thread(_unlink, step.file)

    async def _pivot(self, jobs: BlockJobs, job_id: str, files: Files, step: Commit,
                     top: str) -> None:
        """Complete a ready active commit: the device moves to F; recorded, then X goes."""
        await jobs.complete(job_id)
        info = await _concluded(jobs, job_id)
        if info.error:
            await jobs.dismiss(job_id)
            raise HypervisorError(f"the merge of {step.file} failed: {info.error}",
                                  job=job_id)
        await self._finish_pivot(jobs, job_id, files, step, top)

    async def _finish_pivot(self, jobs: BlockJobs, job_id: str, files: Files, step: Commit,
                            top: str) -> None:
        await self._done(files, step)
        with contextlib.suppress(HypervisorError):
            await jobs.dismiss(job_id)
        await _remove_nodes(jobs, top)
        await asyncio.to_thread(_unlink, step.file)

    # -- after a restart ------------------------------------------------------------

    async def resume(self, pending: PendingMerge) -> None:
        """Finish the step a killed service was doing (see the module doc)."""
        if not pending.steps:
            return
        step = merge.step_from_json(pending.steps[0])
        tree = await self.ops.tree_of(self.vm)
        files = await read_files(self.ops, self.vm, tree)
        job_id = pending.steps[0].get("qemu_job")
        if job_id and _running(self.vm) and isinstance(step, Commit):
            jobs = self.vm.running_machine().block_jobs
            info = next((j for j in await jobs.jobs() if j.job_id == job_id), None)
            log.info("VM %s: the merge's QEMU job %s is %s", self.vm.record.name, job_id,
                     "gone" if info is None else info.status)
            if info is not None and await self._resume_job(jobs, info, files, step):
                return
        if (isinstance(step, Commit) and step.children and step.file in files.existing
                and all(files.links.get(c) == Link(step.into, step.into_format)
                        for c in step.children)):
            # The data is in F and every child names it: only the record was missing.
            log.info("VM %s: %s was merged into %s; recording it", self.vm.record.name,
                     step.file, step.into)
            await self._done(files, step)
            await asyncio.to_thread(_unlink, step.file)

    async def _resume_job(self, jobs: BlockJobs, info: BlockJobInfo, files: Files,
                          step: Commit) -> bool:
        """True if the job's step is finished by this."""
        # X's node, found by its file: after an intermediate commit the headers no
        # longer place X in a disk's chain. (A job's filter node over X has a name
        # QEMU made up, "#block..."; hvstack names its own nodes.)
        top = next((n for n, f in (await jobs.node_files()).items()
                    if f == step.file and not n.startswith("#")), "")
        if info.status == "concluded" and info.error:
            await jobs.dismiss(info.job_id)
            return False
        if step.disk is not None:  # an active commit: completed, the device pivots
            if info.status == "concluded":
                await self._finish_pivot(jobs, info.job_id, files, step, top)
            else:
                await run_job(jobs, info.job_id, until_ready=True)
                await asyncio.shield(self._pivot(jobs, info.job_id, files, step, top))
            return True
        await run_job(jobs, info.job_id)  # waits for it (if it still runs) and dismisses
        files = await read_files(self.ops, self.vm, await self.ops.tree_of(self.vm))
        # F holds X's data and QEMU named F above X; X's other children are rebased as
        # the step would have.
        moved = Link(step.into, step.into_format)
        await self._rebase(step, tuple(c for c in step.children
                                       if files.links.get(c) != moved))
        await self._done(files, step)
        await _remove_nodes(jobs, top)
        await asyncio.to_thread(_unlink, step.file)
        return True


ROOM_MARGIN = 4 << 20  # bytes beyond X's size: F's new metadata, the guest's writes


def _check_room(step: Commit) -> None:
    """NoSpace, before F is written, if its file system cannot take all of X."""
    need = os.stat(step.file).st_blocks * 512 + ROOM_MARGIN
    fs = os.statvfs(step.into)
    free = fs.f_bavail * fs.f_frsize
    if free < need:
        raise NoSpace(f"merging '{step.file}' into '{step.into}' needs up to {need >> 20} MiB "
                      f"on its file system, which has {free >> 20} MiB free; every "
                      "checkpoint and the current state are intact, and the merge finishes "
                      "at the service's next start or the VM's next checkpoint deletion",
                      path=step.into, needed=need, free=free)


async def _repair_leaks(path: str) -> None:
    """Give back clusters a commit cut short (a full disk) left allocated in F, which
    nothing but the merge uses; a failure here only leaves them."""
    try:
        await run_qemu_img(["check", "-r", "leaks", "-f", "qcow2", "--", path],
                           timeout=LONG_TIMEOUT)
    except HvError as exc:
        log.warning("qemu-img check -r leaks of %s: %s", path, exc)


@contextlib.asynccontextmanager
async def _room(step: Commit) -> AsyncIterator[None]:
    """QEMU's "No space left on device" as NoSpace, naming the file that needed it."""
    try:
        yield
    except HypervisorError as exc:
        if "no space left" not in exc.message.lower():
            raise
        raise NoSpace(f"merging '{step.file}' into '{step.into}' needs more room on its "
                      f"file system: {exc.message}; every checkpoint and the current state "
                      "are intact, and the merge finishes at the service's next start or "
                      "the VM's next checkpoint deletion", path=step.into) from exc


async def _concluded(jobs: BlockJobs, job_id: str) -> BlockJobInfo:
    deadline = time.monotonic() + PIVOT_WAIT
    while time.monotonic() < deadline:
        info = next((j for j in await jobs.jobs() if j.job_id == job_id), None)
        if info is None:
            raise HypervisorError(f"block job {job_id} is gone", job=job_id)
        if info.status == "concluded":
            return info
        await asyncio.sleep(POLL)
    raise HypervisorError(f"block job {job_id} did not conclude after completing",
                          job=job_id)


async def _remove_nodes(jobs: BlockJobs, node: str) -> None:
    """Remove X's node once it left the chain (and its protocol node, for a launch node)."""
    for name in (node, f"{node}-file"):
        try:
            await jobs.remove_node(name)
        except HypervisorError as exc:
            if name == node:
                log.warning("could not remove the merged node %s: %s", name, exc)


# -- the operations -----------------------------------------------------------------------


def _memory_files(tree: CheckpointTree, ids: list[str]) -> list[str]:
    found = []
    for checkpoint_id in ids:
        checkpoint = tree.get(checkpoint_id)
        found += [p for p in (checkpoint.memory_state, checkpoint.layout, checkpoint.efi_vars)
                  if p]
    return found


async def delete(ops: CheckpointOperations, ref: str, checkpoint: str,
                 subtree: bool = False) -> Job:
    """Delete checkpoint ``checkpoint`` of VM ``ref`` (with ``subtree``: and every
    checkpoint below it); a job merges the files (see the module doc)."""
    service = ops.service
    vm = service.get_vm(ref)
    tree = await ops.tree_of(vm)
    target = tree.get(checkpoint)
    ids = [c.id for c in tree.subtree(target.id)] if subtree else [target.id]
    claim = service.block_work.claim(vm.record.id, vm.record.name, "a checkpoint deletion")
    claim.__enter__()
    try:
        async with vm.lock:
            tree = await ops.tree_of(vm)
            ids = [i for i in ids if tree.find(i) is not None]
            if not ids:
                tree.get(checkpoint)  # deleted meanwhile: NotFound
            after = merge.deleted(tree, ids)
            merge.plan(after, await read_files(ops, vm, after))  # refuses before any change
            memory = _memory_files(tree, ids)
            pending = PendingMerge(tuple(ids), (), tree.pending.job if tree.pending else "")
            await ops.store(vm, after.with_pending(pending))
        for path in memory:
            await asyncio.to_thread(_unlink, path)
    except BaseException:
        claim.__exit__(None, None, None)
        raise
    names = [tree.get(i).name for i in ids]
    merger = Merger(ops, vm, "")

    async def body(progress: Progress) -> dict[str, Any]:
        try:
            result = await merger.run(progress)
        finally:
            claim.__exit__(None, None, None)
        return {"deleted": names, **result}

    job = service.jobs.start("checkpoint-delete", vm.record.name, body)
    merger.job_id = job.id
    return job


def _resumed(merger: Merger, pending: PendingMerge,
             claim: contextlib.AbstractContextManager[None]) -> JobBody:
    async def body(progress: Progress) -> dict[str, Any]:
        try:
            await merger.resume(pending)
            return await merger.run(progress)
        finally:
            claim.__exit__(None, None, None)
    return body


async def startup(ops: CheckpointOperations) -> list[Job]:
    """Finish every pending merge a stopped or killed service left (one job per VM)."""
    started = []
    for vm in ops.service.list_vms():
        try:
            tree = await ops.tree_of(vm)
        except HvError as exc:  # the service starts anyway; the VM's tree stays as it is
            log.error("VM %s: cannot read its checkpoint tree: %s", vm.record.name, exc)
            continue
        pending = tree.pending
        if pending is None:
            continue
        claim = ops.service.block_work.claim(vm.record.id, vm.record.name,
                                             "a checkpoint merge")
        claim.__enter__()

        merger = Merger(ops, vm, "")
        log.info("VM %s: finishing the checkpoint merge a restart interrupted",
                 vm.record.name)
        job = ops.service.jobs.start("checkpoint-merge", vm.record.name,
                                     _resumed(merger, pending, claim))
        merger.job_id = job.id
        started.append(job)
    return started
