"""The files of a checkpoint: new overlays (offline and on a running machine) and the
memory, layout and UEFI-variable files beside it.

Contract (how disks become checkpoints: :mod:`hvstack.checkpoints.model`):

* :func:`plan_overlays` names one new overlay beside each writable disk's active file
  (:mod:`hvstack.checkpoints.files`), confined to the storage roots.
* :func:`make_overlays` creates them: ``qemu-img create -f qcow2 -F FMT -b F -u O SIZE``
  with the size read by ``qemu-img info -U -f FMT`` (never probed; both through
  :mod:`hvstack.storage.overlay`), each file created
  exclusively first (an existing file is never overwritten). On failure every overlay
  it made is deleted and the error raised.
* :func:`snapshot_live` puts them on top of a running machine's disks: one
  ``blockdev-add`` per overlay (node ``backing_node_id(disk, O)``, no backing), then ONE
  snapshot transaction for all disks. On failure the added nodes are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hvstack.checkpoints.files import overlay_path
from hvstack.compute.model import DiskAttachment
from hvstack.errors import HvError
from hvstack.hypervisor.capabilities import BlockJobs, BlockNodeSpec, Snapshot
from hvstack.hypervisor.spec import backing_node_id
from hvstack.storage.block_jobs import file_node, run_job
from hvstack.storage.overlay import create_on, virtual_size

OVERLAY_FORMAT = "qcow2"


@dataclass(frozen=True)
class Overlay:
    disk_id: str
    frozen: str  # the file it goes on top of (the checkpoint's file for this disk)
    frozen_format: str
    path: str  # the new, empty overlay


def writable(disks: Iterable[DiskAttachment]) -> list[DiskAttachment]:
    """The disks a checkpoint freezes: every writable one (never the DVD)."""
    return [d for d in disks if not d.read_only]


def plan_overlays(disks: Iterable[DiskAttachment], taken: Iterable[str] = ()
                  ) -> list[Overlay]:
    """One new overlay name beside each disk's file (``disk.path``); names in ``taken``
    (and files that exist) are avoided."""
    used = set(taken)
    planned: list[Overlay] = []
    for disk in disks:
        while True:
            path = overlay_path(disk.path, used)
            used.add(path)
            if not os.path.lexists(path):
                break
        planned.append(Overlay(disk.id, disk.path, disk.format, path))
    return planned


async def make_overlays(overlays: Sequence[Overlay]) -> None:
    """Create every overlay (empty qcow2 on top of its frozen file); all or none."""
    made: list[Path] = []
    try:
        for overlay in overlays:
            target = Path(overlay.path)
            size = await virtual_size(overlay.frozen, overlay.frozen_format)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            made.append(target)
            await create_on(target, size, overlay.frozen, overlay.frozen_format,
                            OVERLAY_FORMAT)
    except BaseException:
        remove_files(made)
        raise


def remove_files(paths: Iterable[Path | str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)


async def snapshot_live(jobs: BlockJobs, overlays: Sequence[Overlay]) -> None:
    """Put ``overlays`` (made already) on top of the running machine's disks at one
    instant. HvError if QEMU refuses; nothing is left added then."""
    nodes = await jobs.node_files()
    snapshots = [Snapshot(file_node(o.disk_id, o.frozen, nodes),
                          backing_node_id(o.disk_id, o.path)) for o in overlays]
    added: list[str] = []
    try:
        for overlay in overlays:
            name = backing_node_id(overlay.disk_id, overlay.path)
            await jobs.add_node(BlockNodeSpec(name, OVERLAY_FORMAT, overlay.path))
            added.append(name)
        await jobs.snapshot(snapshots)
    except BaseException:
        for name in reversed(added):
            with contextlib.suppress(HvError):
                await asyncio.shield(jobs.remove_node(name))
        raise


def with_overlays(disks: Iterable[DiskAttachment], overlays: Iterable[Overlay]
                  ) -> tuple[DiskAttachment, ...]:
    """``disks`` with each overlaid disk's path the overlay's (qcow2; same id, same
    ``owned``)."""
    by_disk: Mapping[str, Overlay] = {o.disk_id: o for o in overlays}
    result = []
    for disk in disks:
        overlay = by_disk.get(disk.id)
        result.append(disk if overlay is None
                      else replace(disk, path=overlay.path, format=OVERLAY_FORMAT))
    return tuple(result)


async def unsnapshot_live(jobs: BlockJobs, overlays: Sequence[Overlay],
                          timeout: float = 600.0) -> None:
    """Undo :func:`snapshot_live` (a later step failed): each overlay is committed back
    into its frozen file (an active commit, then the pivot) and its node removed; the
    machine runs on the frozen files again and the overlays can be deleted."""
    nodes = await jobs.node_files()
    for overlay in overlays:
        top = backing_node_id(overlay.disk_id, overlay.path)
        base = file_node(overlay.disk_id, overlay.frozen, nodes)
        job_id = f"undo-{overlay.disk_id}"
        await jobs.commit(job_id, top, base=base)
        await run_job(jobs, job_id, until_ready=True, timeout=timeout)
        await jobs.complete(job_id)
        await run_job(jobs, job_id, timeout=timeout)
        with contextlib.suppress(HvError):
            await jobs.remove_node(top)
