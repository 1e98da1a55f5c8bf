"""Jobs: long operations with an id, progress, cancellation and a final result.

A job runs one coroutine as a task owned by the :class:`JobManager`; the coroutine
receives a ``progress(percent, message)`` callback. Finished jobs are kept (the newest
:data:`KEEP_FINISHED`) so clients can read their result after the fact.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hvstack.errors import Cancelled, HvError, NotFound
from hvstack.host.events import EventBus
from hvstack.progress import Progress

__all__ = ["Job", "JobBody", "JobManager", "JobState", "Progress"]

log = logging.getLogger(__name__)

KEEP_FINISHED = 500

JobBody = Callable[[Progress], Awaitable[dict[str, Any] | None]]


class JobState(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class Job:
    id: str
    kind: str
    target: str
    state: JobState = JobState.RUNNING
    progress: float = 0.0
    message: str = ""
    result: dict[str, Any] | None = None
    error: HvError | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class JobManager:
    def __init__(self, events: EventBus) -> None:
        self._events = events
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, kind: str, target: str, body: JobBody) -> Job:
        job = Job(id=str(uuid.uuid4()), kind=kind, target=target)
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, body), name=f"job-{kind}-{target}")
        self._tasks.add(job.task)
        job.task.add_done_callback(self._tasks.discard)
        job.task.add_done_callback(lambda _: self._settle(job))
        self._publish(job)
        self._trim()
        return job

    async def _run(self, job: Job, body: JobBody) -> None:
        last_sent = 0.0

        def progress(percent: float, message: str = "") -> None:
            nonlocal last_sent
            job.progress = max(0.0, min(100.0, percent))
            job.message = message or job.message
            now = time.monotonic()
            if now - last_sent > 0.2:
                last_sent = now
                self._publish(job)

        try:
            job.result = await body(progress)
            job.state, job.progress = JobState.COMPLETED, 100.0
        except asyncio.CancelledError:
            job.state = JobState.CANCELLED
            job.error = Cancelled(f"{job.kind} of {job.target} was cancelled")
            raise
        except HvError as exc:
            job.state, job.error = JobState.FAILED, exc
        except Exception as exc:
            log.exception("job %s (%s of %s) failed", job.id, job.kind, job.target)
            job.state, job.error = JobState.FAILED, HvError(f"internal error: {exc}")
        finally:
            job.finished_at = time.time()
            job.done.set()
            self._publish(job)

    def _settle(self, job: Job) -> None:
        """A task cancelled before its first step never ran ``_run``: end its job here."""
        if job.state is JobState.RUNNING:
            job.state = JobState.CANCELLED
            job.error = Cancelled(f"{job.kind} of {job.target} was cancelled")
            job.finished_at = time.time()
            job.done.set()
            self._publish(job)

    def _publish(self, job: Job) -> None:
        self._events.publish(
            "job", id=job.id, kind=job.kind, target=job.target, state=job.state.value,
            progress=round(job.progress, 1), message=job.message,
            error=job.error.message if job.error else None,
        )

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.state is not JobState.RUNNING]
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.id]

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"job {job_id} does not exist", job=job_id) from None

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state is JobState.RUNNING and job.task is not None:
            job.task.cancel()
        return job

    async def wait(self, job: Job, timeout: float | None = None) -> Job:
        await asyncio.wait_for(job.done.wait(), timeout)
        return job

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
