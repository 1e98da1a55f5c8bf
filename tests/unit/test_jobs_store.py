"""Jobs kept in the store: restored after a restart, interrupted ones marked failed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from hvstack.errors import Interrupted, NoSpace, NotFound
from hvstack.host.events import EventBus
from hvstack.host.jobs import JobManager, JobState, Progress
from hvstack.host.records import JobRecord, JobRecords
from hvstack.host.store import MemoryStore, Op, SqliteStore, Store


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobRecords]:
    backend: Store = (MemoryStore() if request.param == "memory"
                      else SqliteStore(tmp_path / "hv.db"))
    yield JobRecords(backend)
    backend.close()


async def test_finished_jobs_survive_a_restart(store: JobRecords) -> None:
    first = JobManager(EventBus(), store)

    async def ok(progress: Progress) -> dict[str, Any]:
        return {"state": "Running"}

    async def bad(progress: Progress) -> None:
        raise NotFound("disk /d/x does not exist", path="/d/x")

    done = first.start("start", "web", ok)
    failed = first.start("convert", "/d/x", bad)
    await asyncio.wait_for(asyncio.gather(done.done.wait(), failed.done.wait()), 5)
    await first.flush()

    second = JobManager(EventBus(), store)
    assert await second.restore() == []
    again = second.get(done.id)
    assert again.state is JobState.COMPLETED and again.result == {"state": "Running"}
    assert again.done.is_set() and again.progress == 100.0
    lost = second.get(failed.id)
    assert lost.state is JobState.FAILED
    assert isinstance(lost.error, NotFound) and lost.error.message == "disk /d/x does not exist"


async def test_a_job_running_when_the_service_died_is_failed_after_restart(
    store: JobRecords,
) -> None:
    # What a killed service leaves: the job's record from its start, never finished.
    await store.save(JobRecord(id="j1", kind="convert", target="/d/big.qcow2",
                             state="running", created_at=1.0))
    manager = JobManager(EventBus(), store)
    interrupted = await manager.restore()
    assert [j.id for j in interrupted] == ["j1"]
    job = manager.get("j1")
    assert job.state is JobState.FAILED
    assert isinstance(job.error, Interrupted)
    assert job.error.message == (
        "convert of /d/big.qcow2 was interrupted by a restart of the host service")
    assert job.finished_at is not None
    # ... and recorded as such: a second restart finds nothing left to interrupt.
    await manager.flush()
    assert await JobManager(EventBus(), store).restore() == []
    [record] = await store.load()
    assert (record.state, record.error_type) == ("failed", "interrupted")


async def test_a_store_that_cannot_write_does_not_fail_the_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class FullStore(MemoryStore):
        async def commit(self, ops: Sequence[Op]) -> int:
            raise NoSpace("cannot record job: disk full")

    manager = JobManager(EventBus(), JobRecords(FullStore()))

    async def ok(progress: Progress) -> dict[str, Any]:
        return {"ok": True}

    job = manager.start("start", "web", ok)
    await asyncio.wait_for(job.done.wait(), 5)
    assert job.state is JobState.COMPLETED
    await manager.flush()
    assert any("cannot record job" in r.getMessage() for r in caplog.records)
