"""Waiting for one of QEMU's block jobs, and finding a disk's running nodes.

:func:`run_job` follows a job that was just started (or one found still in QEMU after a
restart of the host service) until it is ready (a mirror, an active commit: then the
caller completes or cancels it) or has concluded; it reports progress, dismisses a
concluded job, and turns a job that ended with an error or vanished into
:class:`~hvstack.errors.HypervisorError`. If the waiting task is cancelled, the job is
cancelled in QEMU too (and waited for, briefly), then the cancellation goes on.

:func:`file_node` names the node of a file in a disk's running chain (see
:mod:`hvstack.hypervisor.spec`): the disk's own node holds the file the machine was
launched with; every other file (a parent at launch, an overlay or a mirror target
added at run time) is named from the disk and its path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

from hvstack.errors import HypervisorError, OperationTimeout
from hvstack.hypervisor.capabilities import BlockJobInfo, BlockJobs
from hvstack.hypervisor.spec import backing_node_id, disk_node_id
from hvstack.progress import Progress, no_progress

POLL = 0.2
CANCEL_WAIT = 30.0


def file_node(disk_id: str, path: str, nodes: Mapping[str, str]) -> str:
    """The node of ``path`` in the running chain of disk ``disk_id``; ``nodes`` is the
    machine's :meth:`~hvstack.hypervisor.capabilities.BlockJobs.node_files`.
    HypervisorError if the machine has no node for that file."""
    own = disk_node_id(disk_id)
    if nodes.get(own) == path:
        return own
    named = backing_node_id(disk_id, path)
    if named not in nodes:
        raise HypervisorError(f"the running machine has no node for {path}", path=path)
    return named


async def _find(jobs: BlockJobs, job_id: str) -> BlockJobInfo | None:
    return next((j for j in await jobs.jobs() if j.job_id == job_id), None)


async def run_job(jobs: BlockJobs, job_id: str, *, until_ready: bool = False,
                  progress: Progress = no_progress, timeout: float | None = None) -> None:
    """Wait for block job ``job_id``: until it is ready (``until_ready``) or concluded.

    OperationTimeout after ``timeout`` seconds (the job is left running);
    HypervisorError if it failed, was cancelled or is gone.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            job = await _find(jobs, job_id)
            if job is None:
                raise HypervisorError(f"block job {job_id} is gone", job=job_id)
            if job.status == "concluded":
                await jobs.dismiss(job_id)
                if job.error:
                    raise HypervisorError(f"block job {job_id} failed: {job.error}",
                                          job=job_id)
                progress(100.0, "")
                return
            if until_ready and job.ready:
                progress(100.0, "")
                return
            if job.status in ("running", "ready", "standby") and job.length:
                progress(min(99.0, job.percent), "")
            if deadline is not None and time.monotonic() > deadline:
                raise OperationTimeout(f"block job {job_id} did not finish in time",
                                       job=job_id)
            await asyncio.sleep(POLL)
    except asyncio.CancelledError:
        await asyncio.shield(cancel_job(jobs, job_id))
        raise


async def cancel_job(jobs: BlockJobs, job_id: str, wait: float = CANCEL_WAIT) -> None:
    """Cancel block job ``job_id`` if it still exists and wait (up to ``wait``) until
    QEMU has ended it; a mirror that was ready leaves the device on its source."""
    with contextlib.suppress(HypervisorError):
        job = await _find(jobs, job_id)
        if job is None:
            return
        if job.status != "concluded":
            await jobs.cancel(job_id, force=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            job = await _find(jobs, job_id)
            if job is None:
                return
            if job.status == "concluded":
                await jobs.dismiss(job_id)
                return
            await asyncio.sleep(POLL)
