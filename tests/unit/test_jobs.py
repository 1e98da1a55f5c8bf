"""Jobs: progress, results, failures, cancellation and the events they publish."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hvstack.errors import Cancelled, Conflict, HvError, Interrupted, InvalidInput, NotFound
from hvstack.host.events import Event, EventBus
from hvstack.host.jobs import Job, JobManager, JobState, Progress


class RecordingBus(EventBus):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    def publish(self, type_: str, **data: Any) -> Event:
        event = super().publish(type_, **data)
        self.events.append(event)
        return event

    def of(self, job: Job) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.type == "job" and e.data["id"] == job.id]


@pytest.fixture
def bus() -> RecordingBus:
    return RecordingBus()


@pytest.fixture
async def jobs(bus: RecordingBus) -> Any:
    manager = JobManager(bus)
    yield manager
    await manager.shutdown()


async def finish(job: Job) -> Job:
    await asyncio.wait_for(job.done.wait(), 5)
    return job


async def test_completed_job_has_its_result(jobs: JobManager) -> None:
    async def body(progress: Progress) -> dict[str, Any]:
        return {"state": "Running"}

    job = jobs.start("start", "web", body)
    assert job.state.value == "running"
    assert (job.kind, job.target) == ("start", "web")
    await finish(job)
    assert job.state is JobState.COMPLETED
    assert job.result == {"state": "Running"}
    assert job.progress == 100.0
    assert job.error is None
    assert job.finished_at is not None and job.finished_at >= job.created_at


async def test_progress_is_visible_while_running(jobs: JobManager) -> None:
    reached, release = asyncio.Event(), asyncio.Event()

    async def body(progress: Progress) -> None:
        progress(40, "copying")
        progress(150, "")  # clamped; an empty message keeps the last one
        reached.set()
        await release.wait()
        progress(-3, "almost")
        return None

    job = jobs.start("convert", "/d/a", body)
    await asyncio.wait_for(reached.wait(), 5)
    assert (job.state, job.progress, job.message) == (JobState.RUNNING, 100.0, "copying")
    release.set()
    await finish(job)
    assert job.state is JobState.COMPLETED
    assert job.result is None
    assert job.message == ""  # a finished job keeps no stale progress message


async def test_failure_is_captured_as_the_error(jobs: JobManager) -> None:
    async def body(progress: Progress) -> None:
        progress(10, "looking")
        raise NotFound("disk /d/x does not exist", path="/d/x")

    job = await finish(jobs.start("start", "web", body))
    assert job.state is JobState.FAILED
    assert isinstance(job.error, NotFound)
    assert job.error.data["path"] == "/d/x"
    assert job.result is None


async def test_unexpected_exception_becomes_an_internal_error_with_an_id(
    jobs: JobManager, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(progress: Progress) -> None:
        raise RuntimeError("boom /proc/self/fd/3")

    job = await finish(jobs.start("start", "web", body))
    assert job.state is JobState.FAILED
    assert type(job.error) is HvError
    error_id = job.error.data["error_id"]
    assert isinstance(error_id, str) and error_id in job.error.message
    assert "boom" not in job.error.message and "/proc" not in job.error.message
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "web" in logged[0].getMessage()


async def test_cancel(jobs: JobManager) -> None:
    started = asyncio.Event()
    cleaned_up = asyncio.Event()

    async def body(progress: Progress) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.set()

    job = jobs.start("stop", "web", body)
    await asyncio.wait_for(started.wait(), 5)
    assert jobs.cancel(job.id) is job
    await finish(job)
    assert job.state is JobState.CANCELLED
    assert isinstance(job.error, Cancelled)
    assert job.error.message == "stop of web was cancelled"
    assert cleaned_up.is_set()
    assert job.task is not None and job.task.cancelled()  # CancelledError not swallowed


async def test_cancel_of_a_finished_job_changes_nothing(jobs: JobManager) -> None:
    async def body(progress: Progress) -> dict[str, Any]:
        return {"ok": True}

    job = await finish(jobs.start("start", "web", body))
    jobs.cancel(job.id)
    assert job.state is JobState.COMPLETED


async def test_events_published(jobs: JobManager, bus: RecordingBus) -> None:
    release = asyncio.Event()

    async def body(progress: Progress) -> dict[str, Any]:
        progress(25, "first step")
        await release.wait()
        return {"done": True}

    job = jobs.start("start", "web", body)
    first = bus.of(job)[0]
    assert first == {"id": job.id, "kind": "start", "target": "web", "state": "running",
                     "progress": 0.0, "message": "", "error": None}
    release.set()
    await finish(job)
    events = bus.of(job)
    assert any(e["progress"] == 25.0 and e["message"] == "first step" for e in events)
    assert events[-1]["state"] == "completed"
    assert events[-1]["progress"] == 100.0
    seqs = [e.seq for e in bus.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_failure_event_carries_the_message(jobs: JobManager, bus: RecordingBus) -> None:
    async def body(progress: Progress) -> None:
        raise NotFound("no such thing")

    job = await finish(jobs.start("start", "web", body))
    assert bus.of(job)[-1]["state"] == "failed"
    assert bus.of(job)[-1]["error"] == "no such thing"


async def test_get_list_and_unknown(jobs: JobManager) -> None:
    async def body(progress: Progress) -> None:
        return None

    a = jobs.start("start", "a", body)
    b = jobs.start("start", "b", body)
    assert jobs.get(a.id) is a
    assert {j.id for j in jobs.list()} == {a.id, b.id}
    with pytest.raises(NotFound):
        jobs.get("no-such-job")
    with pytest.raises(NotFound):
        jobs.cancel("no-such-job")
    assert await jobs.wait(b, 5) is b
    assert b.state is JobState.COMPLETED


async def test_shutdown_ends_running_jobs_as_interrupted(bus: RecordingBus) -> None:
    manager = JobManager(bus)

    async def body(progress: Progress) -> None:
        await asyncio.Event().wait()

    job = manager.start("start", "web", body)
    await asyncio.sleep(0)
    await asyncio.wait_for(manager.shutdown(), 5)
    assert job.state is JobState.FAILED
    assert isinstance(job.error, Interrupted)
    assert "interrupted by a restart of the host service" in job.error.message


async def test_a_unique_prefix_names_a_job(jobs: JobManager) -> None:
    async def body(progress: Progress) -> None:
        return None

    a, b = jobs.start("start", "a", body), jobs.start("start", "b", body)
    a.id, b.id = "abc12345-0000-4000-8000-000000000000", "abd12345-0000-4000-8000-000000000000"
    jobs._jobs = {a.id: a, b.id: b}  # ids chosen so that prefixes collide
    assert jobs.get("abc") is a
    assert jobs.get("ABD1") is b
    assert jobs.get(a.id.upper()) is a
    with pytest.raises(InvalidInput) as ambiguous:
        jobs.get("ab")
    assert ambiguous.value.message == (
        f"job id prefix 'ab' matches 2 jobs ({a.id}, {b.id}); give more of the id")
    assert ambiguous.value.data["matches"] == [a.id, b.id]
    for unknown in ("abe", "", "zz"):
        with pytest.raises(NotFound):
            jobs.get(unknown)
    await jobs.wait(a, 5)
    await jobs.wait(b, 5)


async def test_cancelling_a_finished_job_is_a_conflict(jobs: JobManager) -> None:
    async def body(progress: Progress) -> dict[str, Any]:
        progress(50, "halfway")
        return {"ok": True}

    job = await finish(jobs.start("start", "web", body))
    with pytest.raises(Conflict) as caught:
        jobs.cancel_running(job.id[:6])
    assert caught.value.message == (f"job {job.id} (start of web) has already completed; "
                                    "only a running job can be cancelled")
    assert job.state is JobState.COMPLETED
    assert job.message == ""


async def test_a_failed_job_keeps_no_progress_message(jobs: JobManager) -> None:
    async def body(progress: Progress) -> None:
        progress(30, "copying")
        raise NotFound("gone")

    job = await finish(jobs.start("convert", "/d/a", body))
    assert (job.state, job.message, job.progress) == (JobState.FAILED, "", 30.0)
