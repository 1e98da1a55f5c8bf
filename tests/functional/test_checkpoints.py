"""Checkpoints through the API with the fake driver and real qemu-img: create in every
state, list, apply, rename, the VM's checkpoint settings, the limit, automatic
checkpoints, one disk job at a time, and vm delete --delete-disks."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from hvstack.client import url_path
from hvstack.errors import HypervisorError, NoSpace
from hvstack.host.service import HostService
from hvstack.storage.qcow2_header import read_links
from tests.functional.fake_capabilities import FakeBlockJobs
from tests.functional.fakes import (
    API,
    FakeDriver,
    assert_problem,
    create_vm,
    finish_job,
    run_job,
    show_vm,
)


def cp_path(vm: str, *rest: str) -> str:
    return API + url_path("vms", vm, "checkpoints", *rest)


async def checkpoint(api: httpx.AsyncClient, vm: str, name: str | None = None,
                     ok: bool = True) -> dict[str, Any]:
    response = await api.post(cp_path(vm), json={"name": name} if name else None)
    assert response.status_code == 202, response.text
    job = await finish_job(api, response.json())
    if ok:
        assert job["state"] == "completed", job
    return job


async def apply(api: httpx.AsyncClient, vm: str, name: str,
                save_current: bool = False) -> dict[str, Any]:
    response = await api.post(cp_path(vm, name, "apply"), json={"save_current": save_current})
    assert response.status_code == 202, response.text
    job = await finish_job(api, response.json())
    assert job["state"] == "completed", job
    return job


async def listing(api: httpx.AsyncClient, vm: str) -> dict[str, Any]:
    response = await api.get(cp_path(vm))
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def backing_of(path: str) -> str | None:
    links = read_links(Path(path))
    assert links is not None
    return links.backing_file


async def test_off_vm_checkpoint_makes_an_overlay_and_a_production_checkpoint(
        api: httpx.AsyncClient) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    first = vm["disks"][0]["path"]
    job = await checkpoint(api, "web", "before")
    assert job["result"]["kind"] == "production"
    after = await show_vm(api, "web")
    overlay = after["disks"][0]["path"]
    assert overlay != first and after["disks"][0]["format"] == "qcow2"
    assert Path(overlay).parent == Path(first).parent
    assert Path(overlay).name.startswith(Path(first).stem + "_")
    assert backing_of(overlay) == first
    assert after["disks"][0]["id"] == vm["disks"][0]["id"]
    tree = await listing(api, "web")
    assert [c["name"] for c in tree["checkpoints"]] == ["before"]
    assert tree["current"] == tree["checkpoints"][0]["id"]
    assert tree["checkpoints"][0]["disks"] == {vm["disks"][0]["id"]: first}
    assert tree["checkpoints"][0]["current"] is True
    # A second checkpoint names its overlay from the original stem, not stacked suffixes.
    await checkpoint(api, "web", "second")
    again = (await show_vm(api, "web"))["disks"][0]["path"]
    assert Path(again).stem.count("_") == Path(overlay).stem.count("_")
    assert backing_of(again) == overlay


async def test_default_names_and_clashes(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web", new_disk="16M")
    one = await checkpoint(api, "web")
    assert one["result"]["name"].startswith("web - (")
    two = await checkpoint(api, "web")
    assert two["result"]["name"] != one["result"]["name"]
    response = await api.post(cp_path("web"), json={"name": one["result"]["name"]})
    assert_problem(response, 409, "already-exists")
    response = await api.post(cp_path("web"), json={"name": "a/b"})
    assert response.status_code in (400, 422)
    assert len((await listing(api, "web"))["checkpoints"]) == 2


async def test_apply_goes_back_and_branches_stay_whole(api: httpx.AsyncClient) -> None:
    vm = await create_vm(api, "web", new_disk="16M", cpus=1)
    base = vm["disks"][0]["path"]
    await checkpoint(api, "web", "one")
    first_overlay = (await show_vm(api, "web"))["disks"][0]["path"]
    await api.patch(API + "/vms/web", json={"cpus": 2, "notes": "kept"})
    await checkpoint(api, "web", "two")
    job = await apply(api, "web", "one")
    assert job["result"]["state"] == "Off"
    now = await show_vm(api, "web")
    assert now["cpus"] == 1  # the checkpoint's settings
    assert now["notes"] == "kept"  # but notes stay
    assert backing_of(now["disks"][0]["path"]) == base
    # "two"'s file (the first overlay) stays: a checkpoint names it.
    assert Path(first_overlay).exists()
    tree = await listing(api, "web")
    assert tree["current"] == next(c["id"] for c in tree["checkpoints"] if c["name"] == "one")
    # Branch: a checkpoint now hangs under "one", beside "two".
    await checkpoint(api, "web", "three")
    tree = await listing(api, "web")
    parents = {c["name"]: c["parent"] for c in tree["checkpoints"]}
    ids = {c["name"]: c["id"] for c in tree["checkpoints"]}
    assert parents == {"one": None, "two": ids["one"], "three": ids["one"]}
    await apply(api, "web", "two")
    assert (await show_vm(api, "web"))["cpus"] == 2


async def test_apply_deletes_only_the_unsaved_overlay(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web", new_disk="16M")
    await checkpoint(api, "web", "one")
    unsaved = (await show_vm(api, "web"))["disks"][0]["path"]
    await apply(api, "web", "one")
    assert not Path(unsaved).exists()
    again = (await show_vm(api, "web"))["disks"][0]["path"]
    await apply(api, "web", "one", save_current=True)
    assert Path(again).exists()  # the saved current state's checkpoint names it
    names = [c["name"] for c in (await listing(api, "web"))["checkpoints"]]
    assert len(names) == 2 and names[0] == "one"


async def test_running_vm_standard_checkpoint_saves_memory_and_keeps_running(
        api: httpx.AsyncClient, driver: FakeDriver) -> None:
    await create_vm(api, "web", new_disk="16M")
    await api.patch(API + "/vms/web", json={"checkpoint_type": "standard"})
    await run_job(api, "web", "start")
    job = await checkpoint(api, "web", "live")
    assert job["result"]["kind"] == "standard"
    now = await show_vm(api, "web")
    assert now["state"] == "Running"
    machine = driver.live_machines()[0]
    assert machine.status_value == "running"
    overlay = now["disks"][0]["path"]
    assert any(node.filename == overlay for node in machine.block_jobs.nodes.values())
    tree = await listing(api, "web")
    assert tree["checkpoints"][0]["memory_state"] is True
    # Applying it leaves the VM Saved; its start restores the checkpoint's memory.
    await apply(api, "web", "live")
    assert (await show_vm(api, "web"))["state"] == "Saved"
    await run_job(api, "web", "start")
    assert (await show_vm(api, "web"))["state"] == "Running"
    # The checkpoint keeps its memory state after the start used the saved one.
    await run_job(api, "web", "stop", {"mode": "turn-off"})
    await apply(api, "web", "live")
    assert (await show_vm(api, "web"))["state"] == "Saved"


async def test_production_without_an_agent_falls_back_or_fails(
        api: httpx.AsyncClient) -> None:
    await create_vm(api, "web", new_disk="16M")
    await run_job(api, "web", "start")
    job = await checkpoint(api, "web", "p")
    assert job["result"]["kind"] == "standard"
    assert "standard checkpoint instead" in job["result"]["note"]
    await api.patch(API + "/vms/web", json={"checkpoint_type": "production-only"})
    before = await show_vm(api, "web")
    job = await checkpoint(api, "web", "q", ok=False)
    assert job["state"] == "failed"
    assert job["error"]["status"] == 409
    assert "production-only" in job["error"]["detail"]
    after = await show_vm(api, "web")
    assert after["disks"] == before["disks"] and after["state"] == "Running"
    folder = Path(before["disks"][0]["path"]).parent
    assert len(list(folder.glob("*.qcow2"))) == 2  # no overlay left behind


async def test_saved_vm_checkpoint_keeps_the_saved_state(api: httpx.AsyncClient) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    await run_job(api, "web", "start")
    await run_job(api, "web", "save")
    job = await checkpoint(api, "web", "saved")
    assert job["result"]["kind"] == "standard"
    assert (await show_vm(api, "web"))["state"] == "Saved"
    await run_job(api, "web", "start")
    await run_job(api, "web", "stop", {"mode": "turn-off"})
    await apply(api, "web", "saved")
    assert (await show_vm(api, "web"))["state"] == "Saved"
    assert Path(vm["folder"], "saved-state.bin").exists()


async def test_settings_shown_and_checked(api: httpx.AsyncClient) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    assert (vm["checkpoint_type"], vm["automatic_checkpoints"], vm["checkpoint_limit"]) == (
        "production", False, 50)
    response = await api.patch(API + "/vms/web", json={
        "checkpoint_type": "standard", "automatic_checkpoints": True, "checkpoint_limit": 2})
    assert response.status_code == 200, response.text
    shown = response.json()
    assert (shown["checkpoint_type"], shown["automatic_checkpoints"],
            shown["checkpoint_limit"]) == ("standard", True, 2)
    for bad in ({"checkpoint_type": "nope"}, {"checkpoint_limit": 0},
                {"checkpoint_limit": 1001}):
        response = await api.patch(API + "/vms/web", json=bad)
        assert 400 <= response.status_code < 500, bad


async def test_limit_and_disabled(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web", new_disk="16M")
    await api.patch(API + "/vms/web", json={"checkpoint_limit": 1})
    await checkpoint(api, "web", "one")
    response = await api.post(cp_path("web"), json={"name": "two"})
    problem = assert_problem(response, 409, "conflict")
    assert "limit" in problem["detail"]
    await api.patch(API + "/vms/web", json={"checkpoint_type": "disabled",
                                            "checkpoint_limit": 5})
    response = await api.post(cp_path("web"), json={"name": "two"})
    assert "disabled" in assert_problem(response, 409, "conflict")["detail"]


async def test_automatic_checkpoint_at_start_and_at_the_limit(
        api: httpx.AsyncClient) -> None:
    await create_vm(api, "web", new_disk="16M")
    await api.patch(API + "/vms/web", json={"automatic_checkpoints": True,
                                            "checkpoint_limit": 1})
    await run_job(api, "web", "start")
    tree = await listing(api, "web")
    assert len(tree["checkpoints"]) == 1
    assert tree["checkpoints"][0]["automatic"] is True
    assert tree["checkpoints"][0]["name"].startswith("Automatic Checkpoint - web - (")
    await run_job(api, "web", "stop", {"mode": "turn-off"})
    await run_job(api, "web", "start")  # at the limit: no checkpoint, the start goes on
    assert (await show_vm(api, "web"))["state"] == "Running"
    assert len((await listing(api, "web"))["checkpoints"]) == 1


async def test_rename_show_and_missing(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web", new_disk="16M")
    await checkpoint(api, "web", "one")
    await checkpoint(api, "web", "two")
    response = await api.patch(cp_path("web", "one"), json={"name": "first"})
    assert response.status_code == 200 and response.json()["name"] == "first"
    assert (await api.get(cp_path("web", "first"))).json()["name"] == "first"
    response = await api.patch(cp_path("web", "first"), json={"name": "two"})
    assert_problem(response, 409, "already-exists")
    assert_problem(await api.get(cp_path("web", "one")), 404, "not-found")
    assert_problem(await api.post(cp_path("web", "nope", "apply"), json={}), 404,
                   "not-found")


async def test_one_disk_job_at_a_time(api: httpx.AsyncClient, service: HostService) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    with service.block_work.claim(vm["id"], "web", "a checkpoint merge"):
        response = await api.post(cp_path("web"), json={"name": "x"})
        assert "checkpoint merge" in assert_problem(response, 409, "resource-busy")["detail"]
    await checkpoint(api, "web", "x")


async def test_delete_with_disks_removes_the_tree_files(api: httpx.AsyncClient) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    base = vm["disks"][0]["path"]
    await checkpoint(api, "web", "one")
    await checkpoint(api, "web", "two")
    overlay = (await show_vm(api, "web"))["disks"][0]["path"]
    folder = Path(base).parent
    files = sorted(folder.glob("*.qcow2"))
    assert len(files) == 3
    response = await api.delete(API + "/vms/web", params={"delete_disks": "true"})
    assert response.status_code == 200, response.text
    assert sorted(response.json()["deleted_disks"]) == sorted(str(f) for f in files)
    assert not any(f.exists() for f in files)
    assert not Path(overlay).exists()


async def test_delete_without_disks_keeps_every_checkpoint_file(
        api: httpx.AsyncClient, tmp_path: Path) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    await checkpoint(api, "web", "one")
    files = sorted(Path(vm["disks"][0]["path"]).parent.glob("*.qcow2"))
    response = await api.delete(API + "/vms/web")
    assert response.status_code == 200, response.text
    assert all(f.exists() for f in files)
    assert os.path.exists(vm["disks"][0]["path"])


async def test_names_are_text_in_the_listing(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web", new_disk="16M")
    await checkpoint(api, "web", "[bold]x[red]")
    tree = await listing(api, "web")
    assert json.dumps(tree).count("[bold]x[red]") == 1


@pytest.mark.parametrize("state_op", [None, "pause"])
async def test_running_or_paused_stays_so(api: httpx.AsyncClient, driver: FakeDriver,
                                          state_op: str | None) -> None:
    await create_vm(api, "web", new_disk="16M")
    await api.patch(API + "/vms/web", json={"checkpoint_type": "standard"})
    await run_job(api, "web", "start")
    if state_op:
        await api.post(API + "/vms/web/pause")
    want = (await show_vm(api, "web"))["state"]
    await checkpoint(api, "web", "x")
    assert (await show_vm(api, "web"))["state"] == want
    assert driver.live_machines()[0].status_value == ("paused" if state_op else "running")


async def _ready_undo_jobs(jobs: FakeBlockJobs) -> None:
    """Play QEMU for the commits that undo a snapshot: each becomes ready at once."""
    while True:
        for job_id, info in list(jobs.running.items()):
            if job_id.startswith("undo-") and info.status == "running":
                jobs.running[job_id] = replace(info, status="ready", ready=True, offset=100)
        await asyncio.sleep(0.01)


async def test_memory_full_undoes_the_snapshot(
        api: httpx.AsyncClient, driver: FakeDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    await create_vm(api, "web", new_disk="16M")
    await api.patch(API + "/vms/web", json={"checkpoint_type": "standard"})
    await run_job(api, "web", "start")
    before = await show_vm(api, "web")
    jobs = driver.live_machines()[0].block_jobs
    launched = dict(jobs.nodes)

    async def complete(job_id: str) -> None:  # as QEMU: concluded until dismissed
        jobs.running[job_id] = replace(jobs.running[job_id], status="concluded")

    monkeypatch.setattr(jobs, "complete", complete)
    driver.save_error = NoSpace("No space left on device")
    player = asyncio.create_task(_ready_undo_jobs(jobs))
    try:
        job = await checkpoint(api, "web", "x", ok=False)
    finally:
        player.cancel()
    assert job["state"] == "failed" and job["error"]["status"] == 507
    after = await show_vm(api, "web")
    assert after["state"] == "Running" and after["disks"] == before["disks"]
    assert jobs.nodes == launched  # the overlay's node went again
    assert (await listing(api, "web"))["checkpoints"] == []
    folder = Path(before["folder"])
    assert list(folder.glob("*_*.qcow2")) == []
    assert list((folder / "checkpoints").glob("*")) == []


async def test_a_snapshot_that_cannot_be_undone_is_kept_as_disks_only(
        api: httpx.AsyncClient, driver: FakeDriver) -> None:
    """The fake's commit never gets ready here: the machine stays on the overlays, so
    the store must name them (a disks-only checkpoint), never the old files."""
    await create_vm(api, "web", new_disk="16M")
    await api.patch(API + "/vms/web", json={"checkpoint_type": "standard"})
    await run_job(api, "web", "start")
    jobs = driver.live_machines()[0].block_jobs
    driver.save_error = NoSpace("No space left on device")

    async def refuse(job_id: str, node: str, top: str | None = None,
                     base: str | None = None) -> None:
        raise HypervisorError("commit refused")

    jobs.commit = refuse  # type: ignore[method-assign]
    job = await checkpoint(api, "web", "x", ok=False)
    assert job["state"] == "failed"
    tree = await listing(api, "web")
    assert [(c["name"], c["kind"], c["memory_state"]) for c in tree["checkpoints"]] == [
        ("x", "production", False)]
    overlay = (await show_vm(api, "web"))["disks"][0]["path"]
    assert any(n.filename == overlay for n in jobs.nodes.values())
    assert Path(overlay).exists()
