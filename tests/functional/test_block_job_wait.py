"""Waiting for block jobs (storage.block_jobs) against the fake capability, and the node
of a file in a running chain."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from hvstack.errors import HypervisorError
from hvstack.hypervisor.capabilities import BlockJobInfo, BlockNodeSpec
from hvstack.hypervisor.qemu.capabilities import plain_filename
from hvstack.hypervisor.spec import backing_node_id
from hvstack.storage import block_jobs
from hvstack.storage.block_jobs import cancel_job, file_node, run_job
from tests.functional.fake_capabilities import FakeBlockJobs


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_jobs, "POLL", 0.01)


def conclude(jobs: FakeBlockJobs, job_id: str, error: str | None = None) -> None:
    jobs.running[job_id] = dataclasses.replace(jobs.running[job_id], status="concluded",
                                               error=error)


async def test_a_concluded_job_is_dismissed_and_its_error_raised() -> None:
    jobs = FakeBlockJobs()
    await jobs.commit("c1", "disk-a")
    waiting = asyncio.create_task(run_job(jobs, "c1"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    conclude(jobs, "c1")
    await waiting
    assert "c1" not in jobs.running
    await jobs.stream("s1", "disk-a")
    conclude(jobs, "s1", "No space left on device")
    with pytest.raises(HypervisorError, match="No space left"):
        await run_job(jobs, "s1")
    assert "s1" not in jobs.running


async def test_waiting_until_ready_leaves_the_job_for_the_caller() -> None:
    jobs = FakeBlockJobs()
    await jobs.mirror("m1", "disk-a", "target")
    jobs.running["m1"] = BlockJobInfo("m1", "mirror", "ready", 100, 100, ready=True)
    seen: list[float] = []
    await run_job(jobs, "m1", until_ready=True, progress=lambda p, m: seen.append(p))
    assert "m1" in jobs.running and seen[-1] == 100.0


async def test_a_vanished_job_is_an_error() -> None:
    with pytest.raises(HypervisorError, match="gone"):
        await run_job(FakeBlockJobs(), "nothing")


async def test_cancelling_the_wait_cancels_the_job_in_qemu() -> None:
    jobs = FakeBlockJobs()
    await jobs.mirror("m1", "disk-a", "target")
    waiting = asyncio.create_task(run_job(jobs, "m1", until_ready=True))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert "m1" not in jobs.running
    await cancel_job(jobs, "m1")  # nothing left: no error


async def test_the_launch_file_keeps_the_disk_node_and_others_are_named_by_path() -> None:
    jobs = FakeBlockJobs()
    await jobs.add_node(BlockNodeSpec("disk-d1", "qcow2", "/s/a_1.qcow2"))
    overlay = backing_node_id("d1", "/s/a_2.qcow2")
    await jobs.add_node(BlockNodeSpec(overlay, "qcow2", "/s/a_2.qcow2"))
    nodes = await jobs.node_files()
    assert file_node("d1", "/s/a_1.qcow2", nodes) == "disk-d1"
    assert file_node("d1", "/s/a_2.qcow2", nodes) == overlay
    with pytest.raises(HypervisorError):
        file_node("d1", "/s/elsewhere.qcow2", nodes)


def test_a_node_with_an_explicit_backing_is_named_by_its_file() -> None:
    name = ('json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": '
            '"/s/base.qcow2"}}, "driver": "qcow2", "file": {"driver": "file", '
            '"filename": "/s/top,1.qcow2"}}')
    assert plain_filename(name) == "/s/top,1.qcow2"
    assert plain_filename("/s/plain.qcow2") == "/s/plain.qcow2"
    assert plain_filename("json:{broken") == "json:{broken"
