"""Processor resource controls through the service and its API, on the fake driver and a
directory tree imitating the cgroup file systems (v1 and v2): settings and their
validation, each running VM's QEMU in its cgroup, live changes, removal, admission of
reserves, reattach after a restart, and VMs that keep running without usable cgroups."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from hvstack.api.app import create_app
from hvstack.cli.main import app as cli_app
from hvstack.client import ApiError, Client
from hvstack.host.config import HostConfig
from hvstack.host.events import Event
from hvstack.host.facts import FixedHost
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from hvstack.host.store import MemoryStore
from hvstack.network.names import service_tag
from hvstack.resources.cgroups import Cgroups, probe
from tests.fake_cgroups import FakeKernel, v1_tree, v2_tree
from tests.functional.conftest import make_config
from tests.functional.fakes import (
    API,
    FakeDriver,
    assert_problem,
    create_vm,
    eventually,
    finish_job,
    serve_on_unix_socket,
    show_vm,
)

runner = CliRunner()


@dataclass
class Lab:
    """A host service over an imitated cgroup tree; ``lingering`` pids stay "alive" in
    the fake kernel after their machine exited (a process that takes its time)."""

    config: HostConfig
    store: MemoryStore
    driver: FakeDriver
    kernel: FakeKernel
    mount: Path  # where the cpu controller's hierarchy is
    table: str  # the mount table
    lingering: set[int]
    service: HostService
    api: httpx.AsyncClient
    events: list[Event]

    @property
    def parent(self) -> Path:
        return self.mount / f"hvstack-{service_tag(str(self.config.data_dir))}"

    def group(self, vm_id: str) -> Path:
        return self.parent / f"vm-{vm_id}"


@contextlib.asynccontextmanager
async def serving(lab_args: dict[str, Any], host_cpus: int) -> AsyncIterator[Lab]:
    def cgroups_of(parent: str) -> Cgroups:
        return probe(parent, lab_args["table"], dirs=lab_args["kernel"])

    host = FixedHost(cpus=host_cpus, cgroups_of=cgroups_of)
    service = HostService(lab_args["config"], lab_args["store"], lab_args["driver"], host)
    events: list[Event] = []
    subscription = service.events.subscribe()

    async def collect() -> None:
        async for event in subscription:
            events.append(event)

    collector = asyncio.create_task(collect())
    transport = httpx.ASGITransport(app=create_app(HostRoot(service)))
    async with httpx.AsyncClient(transport=transport, base_url="http://hv") as api:
        lab = Lab(service=service, api=api, events=events, **lab_args)
        await service.startup()
        try:
            yield lab
        finally:
            lab.driver.release()
            await asyncio.wait_for(service.shutdown(), 10)
            collector.cancel()


def _lab_args(tmp_path: Path, layout: str, **tree: Any) -> dict[str, Any]:
    driver = FakeDriver()
    lingering: set[int] = set()
    kernel = FakeKernel(lambda pid: pid in driver.alive_pids or pid in lingering)
    root = tmp_path / "cgroup"
    table = v1_tree(root, **tree) if layout == "v1" else v2_tree(root, **tree)
    return {"config": make_config(tmp_path), "store": MemoryStore(), "driver": driver,
            "kernel": kernel, "mount": root / "cpu" if layout == "v1" else root,
            "table": table, "lingering": lingering}


@pytest.fixture(params=["v1", "v2"])
async def lab(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Lab]:
    async with serving(_lab_args(tmp_path, request.param), host_cpus=2) as lab:
        yield lab
    shutil.rmtree(tmp_path / "data" / "run", ignore_errors=True)


def quota_and_weight(lab: Lab, vm_id: str) -> tuple[int | None, int]:
    found = lab.service.processor.cgroups.read(vm_id)
    assert found is not None, f"VM {vm_id} has no cgroup"
    return found.quota_us, found.weight


async def patch(lab: Lab, name: str, **body: Any) -> httpx.Response:
    return await lab.api.patch(f"{API}/vms/{name}", json=body)


async def start(lab: Lab, name: str) -> dict[str, Any]:
    response = await lab.api.post(f"{API}/vms/{name}/start")
    assert response.status_code == 202, response.text
    return await finish_job(lab.api, response.json())


async def turn_off(lab: Lab, name: str) -> None:
    response = await lab.api.post(f"{API}/vms/{name}/stop", json={"mode": "turn-off"})
    job = await finish_job(lab.api, response.json())
    assert job["state"] == "completed", job


def events_of(lab: Lab, type_: str) -> list[dict[str, Any]]:
    return [e.data for e in lab.events if e.type == type_]


# -- settings and their validation ---------------------------------------------------------

async def test_settings_are_stored_shown_and_changed_in_any_state(lab: Lab) -> None:
    vm = await create_vm(lab.api, "cpu", cpus=2)
    assert (vm["processor_reserve_percent"], vm["processor_limit_percent"],
            vm["processor_weight"]) == (0, 100, 100)
    assert (vm["processor_controls"], vm["processor_controls_in_force"]) == (
        "applied when the VM starts", False)
    response = await patch(lab, "cpu", processor_reserve_percent=10,
                           processor_limit_percent=25, processor_weight=300)
    assert response.status_code == 200, response.text
    assert not lab.group(vm["id"]).exists()  # nothing runs: no cgroup yet
    shown = await show_vm(lab.api, "cpu")
    assert (shown["processor_reserve_percent"], shown["processor_limit_percent"],
            shown["processor_weight"]) == (10, 25, 300)
    host = (await lab.api.get(f"{API}/host")).json()
    assert host["processor_controls"].startswith(
        f"cgroup {'v1' if lab.mount.name == 'cpu' else 'v2'}")


@pytest.mark.parametrize(("body", "words"), [
    ({"processor_reserve_percent": 101}, "processor reserve 101% is out of range"),
    ({"processor_reserve_percent": -1}, "processor reserve -1% is out of range"),
    ({"processor_limit_percent": 0}, "processor limit 0% is out of range"),
    ({"processor_limit_percent": 101}, "processor limit 101% is out of range"),
    ({"processor_reserve_percent": 50, "processor_limit_percent": 40},
     "processor limit 40% is below the processor reserve 50%"),
    ({"processor_weight": 0}, "processor weight 0 is out of range; 1 to 10000"),
    ({"processor_weight": 10001}, "processor weight 10001 is out of range"),
    ({"processor_weight": "heavy"}, ""),
])
async def test_bad_settings_are_refused_and_nothing_changes(
        lab: Lab, body: dict[str, Any], words: str) -> None:
    await create_vm(lab.api, "cpu")
    response = await patch(lab, "cpu", **body)
    problem = assert_problem(response, 400, "invalid-input")
    assert words in problem["detail"]
    shown = await show_vm(lab.api, "cpu")
    assert (shown["processor_reserve_percent"], shown["processor_limit_percent"],
            shown["processor_weight"]) == (0, 100, 100)


# -- a running VM's cgroup ---------------------------------------------------------------------

async def test_the_vms_qemu_runs_in_its_cgroup_with_live_changes(lab: Lab) -> None:
    vm = await create_vm(lab.api, "cpu", cpus=2)
    await patch(lab, "cpu", processor_limit_percent=25, processor_weight=300)
    assert (await start(lab, "cpu"))["state"] == "completed"
    pid = lab.driver.machine_of(vm["id"]).pid
    group = lab.group(vm["id"])
    assert lab.service.processor.cgroups.pids(vm["id"]) == [pid]
    # 25 % of 2 processors: half a host processor per 100 ms period.
    assert quota_and_weight(lab, vm["id"]) == (50_000, 300)
    shown = await show_vm(lab.api, "cpu")
    assert (shown["processor_controls"], shown["processor_controls_in_force"]) == (
        "in force", True)

    # Changed while it runs: written at once, and the answer says it is in force.
    response = await patch(lab, "cpu", processor_limit_percent=100, processor_weight=50)
    assert response.status_code == 200, response.text
    assert response.json()["processor_controls_in_force"] is True
    assert quota_and_weight(lab, vm["id"]) == (None, 50)
    await eventually(lambda: events_of(lab, "vm.processor-controls") == [
        {"vm": "cpu", "id": vm["id"], "in_force": True, "detail": "in force"}],
        "the change is published")
    # Other changes leave the cgroup alone; paused, it stays in force.
    await patch(lab, "cpu", notes="hello")
    assert (await lab.api.post(f"{API}/vms/cpu/pause")).status_code == 200
    assert (await show_vm(lab.api, "cpu"))["processor_controls_in_force"] is True
    assert (await lab.api.post(f"{API}/vms/cpu/resume")).status_code == 200

    await turn_off(lab, "cpu")
    await eventually(lambda: not group.exists(), "the stopped VM's cgroup is removed")
    shown = await show_vm(lab.api, "cpu")
    assert (shown["processor_controls"], shown["processor_controls_in_force"]) == (
        "applied when the VM starts", False)
    # Started again: a new process in a new cgroup with the stored settings.
    await start(lab, "cpu")
    assert lab.service.processor.cgroups.pids(vm["id"]) == [
        lab.driver.machine_of(vm["id"]).pid]
    assert quota_and_weight(lab, vm["id"]) == (None, 50)


async def test_a_busy_cgroup_is_removed_once_its_last_process_is_gone(lab: Lab) -> None:
    vm = await create_vm(lab.api, "cpu")
    await start(lab, "cpu")
    pid = lab.driver.machine_of(vm["id"]).pid
    lab.lingering.add(pid)  # the kernel still counts the exiting process
    await turn_off(lab, "cpu")
    await eventually(lambda: lab.kernel.busy_answers >= 2, "removal is retried while busy")
    assert lab.group(vm["id"]).is_dir()
    lab.lingering.clear()
    await eventually(lambda: not lab.group(vm["id"]).exists(), "the cgroup is removed")


async def test_a_restarted_vm_keeps_a_cgroup_whose_removal_was_pending(lab: Lab) -> None:
    vm = await create_vm(lab.api, "cpu")
    await start(lab, "cpu")
    lab.lingering.add(lab.driver.machine_of(vm["id"]).pid)
    await turn_off(lab, "cpu")
    await start(lab, "cpu")  # while the old process lingers
    lab.lingering.clear()
    assert not lab.service.processor.removal_pending(vm["id"])  # it would remove it
    assert lab.group(vm["id"]).is_dir()
    assert lab.service.processor.cgroups.pids(vm["id"]) == [
        lab.driver.machine_of(vm["id"]).pid]


# -- admission of reserves ---------------------------------------------------------------------

async def test_reserves_are_admitted_within_the_hosts_processors(lab: Lab) -> None:
    await create_vm(lab.api, "big", cpus=2)
    await create_vm(lab.api, "small", cpus=1)
    await patch(lab, "big", processor_reserve_percent=75)  # 1.5 of the host's 2
    await patch(lab, "small", processor_reserve_percent=60)  # 0.6
    assert (await start(lab, "big"))["state"] == "completed"
    job = await start(lab, "small")
    assert job["state"] == "failed"
    assert job["error"]["status"] == 422
    assert job["error"]["detail"] == (
        "cannot start VM 'small': it reserves 60% of its 1 processor(s), 0.6 host "
        "processor(s), and the running VMs reserve 1.5 of this host's 2 (0.5 left); "
        "lower a processor reserve")
    assert (await show_vm(lab.api, "small"))["state"] == "Off"
    await patch(lab, "small", processor_reserve_percent=50)
    assert (await start(lab, "small"))["state"] == "completed"
    # Raising a running VM's reserve beyond the room left is refused, nothing changes.
    response = await patch(lab, "small", processor_reserve_percent=51)
    problem = assert_problem(response, 422, "insufficient-resources")
    assert "cannot raise the processor reserve of VM 'small'" in problem["detail"]
    assert (await show_vm(lab.api, "small"))["processor_reserve_percent"] == 50
    # Lowering it is fine; an Off VM's reserve is not admitted until it starts.
    assert (await patch(lab, "small", processor_reserve_percent=10)).status_code == 200
    await turn_off(lab, "big")
    assert (await patch(lab, "big", processor_reserve_percent=100)).status_code == 200


async def test_a_reserve_raises_the_cgroup_weight_to_its_floor(lab: Lab) -> None:
    vm = await create_vm(lab.api, "cpu", cpus=1)
    await patch(lab, "cpu", processor_reserve_percent=50)  # half of one of 2 processors
    await start(lab, "cpu")
    assert quota_and_weight(lab, vm["id"]) == (None, 2500)
    assert (await show_vm(lab.api, "cpu"))["processor_weight"] == 100  # as the user set it


# -- after a restart of the service ------------------------------------------------------------

async def test_reattach_finds_the_cgroup_again_and_reapplies(tmp_path: Path) -> None:
    args = _lab_args(tmp_path, "v1")
    args["config"] = replace(args["config"], detach_on_exit=True)
    async with serving(args, host_cpus=2) as lab:
        vm = await create_vm(lab.api, "cpu")
        await create_vm(lab.api, "gone")
        await patch(lab, "cpu", processor_limit_percent=25)
        await start(lab, "cpu")
        await start(lab, "gone")
        gone = (await show_vm(lab.api, "gone"))["id"]
    pid = lab.driver.machine_of(vm["id"]).pid
    assert lab.group(vm["id"]).is_dir()  # the service detached: its VMs keep their cgroups
    (lab.group(vm["id"]) / "cpu.cfs_quota_us").write_text("-1")  # changed behind our back
    lab.driver.machine_of(gone).exit()  # this one died while the service was down

    async with serving(args, host_cpus=2) as again:
        shown = await show_vm(again.api, "cpu")
        assert (shown["state"], shown["processor_controls_in_force"]) == ("Running", True)
        assert quota_and_weight(again, vm["id"]) == (25_000, 100)
        assert again.service.processor.cgroups.pids(vm["id"]) == [pid]
        await eventually(lambda: not again.group(gone).exists(),
                         "the cgroup of the VM that died is removed")
        shutil.rmtree(tmp_path / "data" / "run", ignore_errors=True)


# -- without usable cgroups ------------------------------------------------------------------

async def test_read_only_cgroups_keep_the_vm_running_and_say_why(tmp_path: Path) -> None:
    async with serving(_lab_args(tmp_path, "v1", read_only=True), host_cpus=2) as lab:
        why = f"the cgroup v1 cpu controller at {lab.mount} is mounted read-only"
        host = (await lab.api.get(f"{API}/host")).json()
        assert host["processor_controls"] == f"none: {why}"
        vm = await create_vm(lab.api, "cpu")
        assert vm["processor_controls"] == f"not applied: {why}"
        assert (await start(lab, "cpu"))["state"] == "completed"
        shown = await show_vm(lab.api, "cpu")
        assert (shown["state"], shown["processor_controls"],
                shown["processor_controls_in_force"]) == ("Running", f"not applied: {why}",
                                                          False)
        await eventually(lambda: events_of(lab, "vm.processor-controls") == [
            {"vm": "cpu", "id": vm["id"], "in_force": False,
             "detail": f"not applied: {why}"}], "the failure is published")
        # A limit set now is stored; the answer says it is not in force.
        response = await patch(lab, "cpu", processor_limit_percent=25)
        assert response.status_code == 200, response.text
        assert (response.json()["processor_limit_percent"],
                response.json()["processor_controls_in_force"]) == (25, False)
        assert response.json()["processor_controls"] == f"not applied: {why}"
        assert not lab.parent.exists()
        await turn_off(lab, "cpu")


async def test_a_cgroup_that_cannot_be_made_is_retried_on_the_next_change(lab: Lab) -> None:
    vm = await create_vm(lab.api, "cpu")
    lab.parent.parent.mkdir(parents=True, exist_ok=True)
    lab.parent.write_text("in the way\n")  # a file where the service's parent should be
    await start(lab, "cpu")
    shown = await show_vm(lab.api, "cpu")
    assert shown["state"] == "Running" and shown["processor_controls_in_force"] is False
    assert shown["processor_controls"].startswith(f"not applied: cannot create cgroup "
                                                  f"{lab.parent}")
    lab.parent.unlink()
    response = await patch(lab, "cpu", processor_limit_percent=50)
    assert response.json()["processor_controls_in_force"] is True
    assert quota_and_weight(lab, vm["id"]) == (50_000, 100)
    assert lab.service.processor.cgroups.pids(vm["id"]) == [
        lab.driver.machine_of(vm["id"]).pid]


# -- the CLI -----------------------------------------------------------------------------------

async def test_cli_sets_and_shows_processor_controls(lab: Lab, tmp_path: Path) -> None:
    app = create_app(HostRoot(lab.service))
    async with serve_on_unix_socket(app, tmp_path / "cli.sock") as host:
        def hv(*args: str) -> Any:
            return runner.invoke(cli_app, list(args), env={"HV_HOST": host})

        run: Callable[..., Any] = lambda *a: asyncio.to_thread(hv, *a)  # noqa: E731
        assert (await run("vm", "create", "cpu", "--memory", "64M")).exit_code == 0
        result = await run("vm", "set", "cpu", "--processor-reserve", "10",
                           "--processor-limit", "30", "--processor-weight", "250")
        assert result.exit_code == 0, result.output
        assert "processor_limit_percent" in result.stdout
        result = await run("vm", "show", "cpu", "-o", "json")
        shown = json.loads(result.stdout)
        assert (shown["processor_reserve_percent"], shown["processor_limit_percent"],
                shown["processor_weight"]) == (10, 30, 250)
        result = await run("vm", "set", "cpu", "--processor-limit", "5")
        assert result.exit_code == 2
        assert result.stderr.strip() == ("error: processor limit 5% is below the processor "
                                         "reserve 10%; the limit must be at least the reserve")
        result = await run("vm", "set", "cpu", "--processor-weight", "many")
        assert result.exit_code == 2
        result = await run("host", "info")
        assert result.exit_code == 0 and "processor_controls" in result.stdout

        def through_client() -> dict[str, Any]:
            with Client(host) as client:
                return client.set_processor("cpu", reserve=0, limit=60, weight=7)

        view = await asyncio.to_thread(through_client)
        assert (view["processor_reserve_percent"], view["processor_limit_percent"],
                view["processor_weight"]) == (0, 60, 7)

        def refused() -> None:
            with Client(host) as client:
                client.set_processor("cpu", weight=0)

        with pytest.raises(ApiError) as caught:
            await asyncio.to_thread(refused)
        assert caught.value.status == 400
