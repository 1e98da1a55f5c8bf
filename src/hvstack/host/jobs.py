"""Jobs: long operations with an id, progress, cancellation and a final result.

A job runs one coroutine as a task owned by the :class:`JobManager`; the coroutine
receives a ``progress(percent, message)`` callback. Finished jobs are kept (the newest
:data:`KEEP_FINISHED`) so clients can read their result after the fact; a finished job
has no progress message (its state, result or error says how it ended).

Clients name a job by its id or by a unique prefix of it (``get``); an ambiguous prefix
is InvalidInput listing the matches. Cancelling a job that has ended is a Conflict.
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

from hvstack.errors import Cancelled, Conflict, HvError, InvalidInput, NotFound
from hvstack.host.events import EventBus
from hvstack.progress import Progress

__all__ = ["Job", "JobBody", "JobManager", "JobState", "Progress"]

log = logging.getLogger(__name__)

KEEP_FINISHED = 500
AMBIGUOUS_SHOWN = 5  # matches an ambiguous prefix error lists

JobBody = Callable[[Progress], Awaitable[dict[str, Any] | None]]


class JobState(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_ended = {JobState.COMPLETED: "completed", JobState.FAILED: "failed",
          JobState.CANCELLED: "been cancelled"}


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
            job.message = ""
            job.done.set()
            self._publish(job)

    def _settle(self, job: Job) -> None:
        """A task cancelled before its first step never ran ``_run``: end its job here."""
        if job.state is JobState.RUNNING:
            job.state = JobState.CANCELLED
            job.error = Cancelled(f"{job.kind} of {job.target} was cancelled")
            job.finished_at = time.time()
            job.message = ""
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

    def get(self, ref: str) -> Job:
        """The job whose id is ``ref`` or, failing that, the one whose id starts with it."""
        job = self._jobs.get(ref) or self._jobs.get(ref.lower())
        if job is not None:
            return job
        prefix = ref.lower()
        matches = [j for j in self._jobs.values() if prefix and j.id.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound(f"no job has an id that is or starts with '{ref}'", job=ref)
        shown = ", ".join(j.id for j in matches[:AMBIGUOUS_SHOWN])
        more = f" and {len(matches) - AMBIGUOUS_SHOWN} more" * (len(matches) > AMBIGUOUS_SHOWN)
        raise InvalidInput(f"job id prefix '{ref}' matches {len(matches)} jobs ({shown}{more}); "
                           "give more of the id", job=ref,
                           matches=[j.id for j in matches[:AMBIGUOUS_SHOWN]])

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job:
        """Cancel the job if it still runs (for the service's own use: a job that ended
        meanwhile is left as it is)."""
        job = self.get(job_id)
        if job.state is JobState.RUNNING and job.task is not None:
            job.task.cancel()
        return job

    def cancel_running(self, ref: str) -> Job:
        """A user's cancel: the job ``ref`` names must still run, else Conflict."""
        job = self.get(ref)
        if job.state is not JobState.RUNNING:
            raise Conflict(f"job {job.id} ({job.kind} of {job.target}) has already "
                           f"{_ended[job.state]}; only a running job can be cancelled",
                           job=job.id, state=job.state.value)
        return self.cancel(job.id)

    async def wait(self, job: Job, timeout: float | None = None) -> Job:
        await asyncio.wait_for(job.done.wait(), timeout)
        return job

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
