"""Jobs: long operations with an id, progress, cancellation and a final result.

A job runs one coroutine as a task owned by the :class:`JobManager`; the coroutine
receives a ``progress(percent, message)`` callback. Finished jobs are kept (the newest
:data:`KEEP_FINISHED`) so clients can read their result after the fact; a finished job
has no progress message (its state, result or error says how it ended).

Clients name a job by its id or by a unique prefix of it (``get``); an ambiguous prefix
is InvalidInput listing the matches. Cancelling a job that has ended is a Conflict.

With a store, each job is recorded when it starts and when it ends (a store that cannot
write, e.g. a full disk, is logged and does not fail the job). :meth:`JobManager.restore`
loads the records at start-up; a job still recorded as running was cut short by a crash
or restart of the host service, and is marked failed with
:class:`~hvstack.errors.Interrupted`. Every failure of a job is logged once.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hvstack.errors import (
    ERROR_TYPES,
    Cancelled,
    Conflict,
    HvError,
    Interrupted,
    InvalidInput,
    NotFound,
)
from hvstack.host.events import EventBus
from hvstack.host.records import JobRecord, JobRecords, Writer
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


INTERRUPTED = "interrupted by a restart of the host service"


def _record(job: Job) -> JobRecord:
    return JobRecord(
        id=job.id, kind=job.kind, target=job.target, state=job.state.value,
        created_at=job.created_at, finished_at=job.finished_at,
        result=json.dumps(job.result, default=str) if job.result is not None else None,
        error=job.error.message if job.error else None,
        error_type=job.error.slug if job.error else None,
    )


def _error(slug: str | None, message: str) -> HvError:
    """The error of a stored job, of its original class (without its data)."""
    cls = ERROR_TYPES.get(slug or "", HvError)
    error = cls.__new__(cls)
    HvError.__init__(error, message)
    return error


def _job(record: JobRecord) -> Job:
    job = Job(id=record.id, kind=record.kind, target=record.target,
              state=JobState(record.state), created_at=record.created_at,
              finished_at=record.finished_at)
    if record.result is not None:
        job.result = json.loads(record.result)
    if record.error is not None:
        job.error = _error(record.error_type, record.error)
    if job.state is JobState.COMPLETED:
        job.progress = 100.0
    job.done.set()
    return job


class JobManager:
    def __init__(self, events: EventBus, store: JobRecords | None = None) -> None:
        self._events = events
        self._store = store
        self._writer = Writer()
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False  # the service stops: a cancel is an interruption

    async def restore(self) -> list[Job]:
        """Load the stored jobs; return those a restart interrupted, now failed."""
        if self._store is None:
            return []
        interrupted = []
        for record in await self._store.load():
            job = _job(record)
            if job.state is JobState.RUNNING:
                job.state = JobState.FAILED
                job.error = Interrupted(f"{job.kind} of {job.target} was {INTERRUPTED}")
                job.finished_at = job.finished_at or time.time()
                log.warning("job %s (%s of %s) was %s", job.id, job.kind, job.target,
                            INTERRUPTED)
                self._save(job)
                interrupted.append(job)
            self._jobs[job.id] = job
        self._trim()
        return interrupted

    def _save(self, job: Job) -> None:
        store = self._store
        if store is not None:  # a failing write is logged; it does not fail the job
            record = _record(job)
            self._writer.write(job.id, lambda: store.save(record))

    def start(self, kind: str, target: str, body: JobBody) -> Job:
        job = Job(id=str(uuid.uuid4()), kind=kind, target=target)
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, body), name=f"job-{kind}-{target}")
        self._tasks.add(job.task)
        job.task.add_done_callback(self._tasks.discard)
        job.task.add_done_callback(lambda _: self._settle(job))
        self._save(job)
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
            self._end_cancelled(job)
            raise
        except HvError as exc:
            log.warning("%s of %s failed (job %s): %s", job.kind, job.target, job.id, exc)
            job.state, job.error = JobState.FAILED, exc
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("%s of %s failed (job %s, error id %s)", job.kind, job.target,
                          job.id, error_id)
            job.state, job.error = JobState.FAILED, HvError(
                f"internal error (error id {error_id}; the host service's log has the "
                f"details)", error_id=error_id)
        finally:
            job.finished_at = time.time()
            job.message = ""
            job.done.set()
            self._save(job)
            self._publish(job)

    def _settle(self, job: Job) -> None:
        """A task cancelled before its first step never ran ``_run``: end its job here."""
        if job.state is JobState.RUNNING:
            self._end_cancelled(job)
            job.finished_at = time.time()
            job.message = ""
            job.done.set()
            self._save(job)
            self._publish(job)

    def _end_cancelled(self, job: Job) -> None:
        if self._closing:
            job.state = JobState.FAILED
            job.error = Interrupted(f"{job.kind} of {job.target} was {INTERRUPTED}")
        else:
            job.state = JobState.CANCELLED
            job.error = Cancelled(f"{job.kind} of {job.target} was cancelled")

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
            store = self._store
            if store is not None:
                self._writer.write(job.id, functools.partial(store.forget, job.id))

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
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._writer.flush()

    async def flush(self) -> None:
        """Wait until every job's record is written."""
        await self._writer.flush()
