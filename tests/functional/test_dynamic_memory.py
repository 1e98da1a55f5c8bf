"""Dynamic memory through the API on the fake driver: settings and their rules, the
balancer's rounds (targets applied, a stuck guest, a guest without the driver or the
statistics), admission of a start, the host's summary, events, and the CLI.

The balancer's own loop waits an hour here: each test drives its rounds itself
(``service.memory.round()``), so what it asserts follows from the rounds it ran."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import Result
from typer.testing import CliRunner

from hvstack.api.app import create_app
from hvstack.cli.main import app
from hvstack.client import url_path
from hvstack.host import memory_balancer
from hvstack.host.config import HostConfig
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from hvstack.hypervisor.capabilities import BalloonStats
from hvstack.hypervisor.spec import MEMORY_DEVICE
from tests.functional.conftest import make_config
from tests.functional.fake_capabilities import FakeMemory
from tests.functional.fakes import (
    API,
    FakeDriver,
    assert_problem,
    create_vm,
    run_job,
    serve_on_unix_socket,
    show_vm,
)

MIB = 1024 * 1024
GIB = 1024 * MIB


@pytest.fixture
def host_config(tmp_path: Path) -> HostConfig:
    return make_config(tmp_path, memory_interval=3600.0)


async def patch(api: httpx.AsyncClient, name: str, **body: object) -> httpx.Response:
    return await api.patch(API + url_path("vms", name), json=body)


async def dynamic_vm(api: httpx.AsyncClient, name: str = "dyn", *, start: bool = True,
                     **settings: object) -> dict[str, Any]:
    await create_vm(api, name, memory="256M")
    response = await patch(api, name, dynamic_memory=True, memory_minimum="128M",
                           memory_maximum="1G", **settings)
    assert response.status_code == 200, response.text
    if start:
        await run_job(api, name, "start")
    return await show_vm(api, name)


def guest(driver: FakeDriver, vm: dict[str, Any]) -> FakeMemory:
    memory = driver.machine_of(vm["id"]).memory
    assert isinstance(memory, FakeMemory)
    return memory


def uses(memory: FakeMemory, demand: int, total: int = 2 * GIB) -> None:
    """The guest reports ``demand`` bytes in use."""
    memory.stats = BalloonStats(last_update=1, total=total, available=total - demand)


async def rounds(service: HostService, count: int = 1) -> None:
    for _ in range(count):
        await service.memory.round()


SETTLE = 12  # rounds enough for the policy's gentle steps to reach a target


# -- settings ---------------------------------------------------------------------------------


async def test_turning_dynamic_memory_on_fills_in_the_bounds(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web", memory="1G")
    response = await patch(api, "web", dynamic_memory=True)
    assert response.status_code == 200, response.text
    vm = response.json()
    # FixedHost: 8 GiB
    assert (vm["dynamic_memory"], vm["memory_minimum_bytes"], vm["memory_maximum_bytes"],
            vm["memory_buffer_percent"], vm["memory_weight"]) == (True, 512 * MIB, 8 * GIB,
                                                                  20, 5000)
    assert (vm["memory_assigned_bytes"], vm["memory_status"]) == (None, None)  # Off
    response = await patch(api, "web", memory_startup="2G", memory_buffer_percent=50,
                           memory_weight=100)
    assert response.json()["memory_bytes"] == 2 * GIB


@pytest.mark.parametrize(("body", "status", "detail"), [
    ({"memory_buffer_percent": 4}, 400, "memory buffer 4% is out of range; 5 to 2000%"),
    ({"memory_weight": 10001}, 400, "memory weight 10001 is out of range"),
    ({"memory_minimum": "512M"}, 400, "out of order: minimum 512 MiB, startup 256 MiB"),
    ({"memory_maximum": "128M"}, 400, "out of order"),
    ({"memory_minimum": "many"}, 400, "minimum memory 'many' is not a size"),
    ({"memory_maximum": "9G"}, 422, "maximum memory 9 GiB is more than this host has"),
    ({"memory": "512M", "memory_startup": "512M"}, 400, "give the startup memory once"),
])
async def test_bad_memory_settings_are_refused(api: httpx.AsyncClient, body: dict[str, Any],
                                               status: int, detail: str) -> None:
    before = await dynamic_vm(api, start=False)
    response = await patch(api, "dyn", **body)
    problem = assert_problem(response, status, "invalid-input" if status == 400
                             else "insufficient-resources")
    assert detail in problem["detail"]
    assert await show_vm(api, "dyn") == before  # nothing changed


async def test_while_running_only_the_hyper_v_changes_are_allowed(
        api: httpx.AsyncClient) -> None:
    await dynamic_vm(api)
    for body, detail in (
            ({"dynamic_memory": False}, "dynamic memory is turned on or off and the startup "
                                        "memory changed only while the VM is Off"),
            ({"memory_startup": "512M"}, "cannot change the memory of VM 'dyn' while it is "
                                         "Running"),
            ({"memory_minimum": "192M"}, "cannot raise the minimum memory of VM 'dyn'"),
            ({"memory_maximum": "512M"}, "cannot lower the maximum memory of VM 'dyn'")):
        problem = assert_problem(await patch(api, "dyn", **body), 409, "invalid-state")
        assert detail in problem["detail"], problem
    response = await patch(api, "dyn", memory_minimum="64M", memory_maximum="2G",
                           memory_buffer_percent=30, memory_weight=9000)
    assert response.status_code == 200, response.text
    vm = response.json()
    assert (vm["memory_minimum_bytes"], vm["memory_maximum_bytes"], vm["memory_buffer_percent"],
            vm["memory_weight"]) == (64 * MIB, 2 * GIB, 30, 9000)


# -- the balancer ------------------------------------------------------------------------------


async def test_targets_follow_demand_plus_buffer_within_the_bounds(
        service: HostService, api: httpx.AsyncClient, driver: FakeDriver) -> None:
    vm = await dynamic_vm(api)
    memory = guest(driver, vm)
    assert memory.requested == {MEMORY_DEVICE: 0} and memory.size == 256 * MIB
    uses(memory, 400 * MIB)  # wants 480 MiB: 224 MiB plugged above the startup
    await rounds(service, SETTLE)
    assert memory.stats_interval == memory_balancer.STATS_INTERVAL
    assert (memory.requested[MEMORY_DEVICE], memory.size) == (224 * MIB, 256 * MIB)
    shown = await show_vm(api, "dyn")
    assert (shown["memory_assigned_bytes"], shown["memory_demand_bytes"],
            shown["memory_status"], shown["memory_status_reason"]) == (
        480 * MIB, 400 * MIB, "OK", "")

    uses(memory, 2 * GIB)  # more than the maximum: 1 GiB and no more
    await rounds(service, SETTLE)
    assert memory.plugged[MEMORY_DEVICE] + memory.size == 1 * GIB
    shown = await show_vm(api, "dyn")
    assert (shown["memory_assigned_bytes"], shown["memory_status"]) == (1 * GIB, "Warning")

    uses(memory, 50 * MIB)  # wants 60 MiB: down to the minimum, through the balloon
    await rounds(service, SETTLE)
    assert (memory.requested[MEMORY_DEVICE], memory.size) == (0, 128 * MIB)
    assert (await show_vm(api, "dyn"))["memory_assigned_bytes"] == 128 * MIB


async def test_demand_counts_what_the_guest_has_but_does_not_report(
        service: HostService, api: httpx.AsyncClient, driver: FakeDriver) -> None:
    memory = guest(driver, await dynamic_vm(api))
    # The guest counts 220 MiB of its 256 MiB (its kernel keeps the rest) and uses 100.
    memory.stats = BalloonStats(last_update=1, total=220 * MIB, available=120 * MIB)
    await rounds(service)
    shown = await show_vm(api, "dyn")
    assert shown["memory_demand_bytes"] == (100 + 36) * MIB


async def test_a_guest_that_keeps_its_memory_is_noticed_and_left_alone(
        service: HostService, api: httpx.AsyncClient, driver: FakeDriver) -> None:
    memory = guest(driver, await dynamic_vm(api))
    memory.floor = 200 * MIB  # gives nothing back below 200 MiB
    uses(memory, 50 * MIB)
    await rounds(service, memory_balancer.STUCK_ROUNDS + 2)
    shown = await show_vm(api, "dyn")
    assert shown["memory_assigned_bytes"] == 200 * MIB
    assert re.search(r"did not reach its target of \d+ MiB \(it has 200 MiB\)",
                     shown["memory_status_reason"]), shown
    assert memory.target == 200 * MIB  # asked to stay where it is meanwhile
    memory.floor = None  # it lets go later: asked again after a while
    await rounds(service, memory_balancer.RETRY_ROUNDS + SETTLE)
    shown = await show_vm(api, "dyn")
    assert (shown["memory_assigned_bytes"], shown["memory_status_reason"]) == (128 * MIB, "")


async def test_a_guest_without_the_virtio_mem_driver_stays_at_startup(
        service: HostService, api: httpx.AsyncClient, driver: FakeDriver) -> None:
    memory = guest(driver, await dynamic_vm(api))
    memory.driver = False
    uses(memory, 600 * MIB)
    await rounds(service, memory_balancer.NO_DRIVER_ROUNDS + 1)
    assert memory.requested[MEMORY_DEVICE] == 0  # asked back: it never came
    shown = await show_vm(api, "dyn")
    assert shown["memory_assigned_bytes"] == 256 * MIB
    assert shown["memory_status"] == "Warning"
    assert "no virtio-mem driver" in shown["memory_status_reason"]


async def test_a_guest_without_statistics_keeps_its_memory(
        service: HostService, api: httpx.AsyncClient, driver: FakeDriver) -> None:
    memory = guest(driver, await dynamic_vm(api))
    await rounds(service, 3)
    assert (memory.requested[MEMORY_DEVICE], memory.size) == (0, 256 * MIB)
    shown = await show_vm(api, "dyn")
    assert (shown["memory_assigned_bytes"], shown["memory_demand_bytes"]) == (256 * MIB, None)
    assert "no memory statistics from the guest" in shown["memory_status_reason"]


async def test_a_static_vm_is_shown_with_its_memory_and_no_status(
        service: HostService, api: httpx.AsyncClient) -> None:
    await create_vm(api, "static", memory="128M")
    await run_job(api, "static", "start")
    await rounds(service)
    shown = await show_vm(api, "static")
    assert (shown["memory_assigned_bytes"], shown["memory_status"]) == (128 * MIB, None)
    assert service.memory.reading(shown["id"]) is not None


# -- the host: short of memory, admission, summary ---------------------------------------------


@pytest.fixture
async def small_host(tmp_path: Path, store: Any, driver: FakeDriver
                     ) -> AsyncIterator[tuple[HostService, httpx.AsyncClient]]:
    """A service whose VMs may have 640 MiB together."""
    from hvstack.host.facts import FixedHost

    config = make_config(tmp_path, memory_interval=3600.0, memory_limit=640 * MIB)
    service = HostService(config, store, driver, FixedHost())
    await service.startup()
    transport = httpx.ASGITransport(app=create_app(HostRoot(service)))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hv") as api:
            yield service, api
    finally:
        await asyncio.wait_for(service.shutdown(), 10)


async def test_a_start_the_host_cannot_make_room_for_is_refused(
        small_host: tuple[HostService, httpx.AsyncClient]) -> None:
    _, api = small_host
    await create_vm(api, "a", memory="256M")
    await create_vm(api, "b", memory="256M")
    await create_vm(api, "c", memory="192M")
    for name in ("a", "b"):
        await run_job(api, name, "start")
    job = await run_job(api, "c", "start", ok=False)
    assert job["state"] == "failed"
    assert job["error"]["status"] == 422
    assert ("cannot start VM 'c': it needs 192 MiB of memory to start and the host cannot "
            "free that much") in job["error"]["detail"]
    assert (await show_vm(api, "c"))["state"] == "Off"

    info = (await api.get(f"{API}/host")).json()
    assert (info["memory_bytes"], info["memory_limit_bytes"], info["memory_reserved_bytes"],
            info["memory_assigned_bytes"], info["memory_available_bytes"]) == (
        8 * GIB, 640 * MIB, 1 * GIB, 512 * MIB, 128 * MIB)


async def test_a_dynamic_vm_gives_back_what_it_does_not_need_for_a_start(
        small_host: tuple[HostService, httpx.AsyncClient], driver: FakeDriver) -> None:
    service, api = small_host
    memory = guest(driver, await dynamic_vm(api, "dyn"))  # startup 256M, min 128M
    uses(memory, 100 * MIB)
    await rounds(service, SETTLE)
    await create_vm(api, "big", memory="448M")  # fits next to the 128 MiB minimum
    await run_job(api, "big", "start")
    await rounds(service, SETTLE)
    assert (await show_vm(api, "dyn"))["memory_assigned_bytes"] <= 192 * MIB


async def test_a_vm_that_cannot_get_its_demand_is_told_by_an_event(
        small_host: tuple[HostService, httpx.AsyncClient], driver: FakeDriver) -> None:
    service, api = small_host
    subscription = service.events.subscribe()
    memory = guest(driver, await dynamic_vm(api, "dyn"))
    uses(memory, 900 * MIB)  # wants 1 GiB (its maximum); the host lets it have 640 MiB
    await rounds(service, 2)
    events = []
    with contextlib.suppress(TimeoutError):  # a read cancelled by a timeout: all read
        while True:
            events.append(await asyncio.wait_for(anext(subscription), 0.2))
    memory_events = [e for e in events if e.type == "vm.memory"]
    assert memory_events, [e.type for e in events]
    assert memory_events[0].data["vm"] == "dyn"
    assert memory_events[0].data["status"] == "Warning"
    assert "the host is short of memory" in str(memory_events[-1].data["reason"])
    shown = await show_vm(api, "dyn")
    assert shown["memory_assigned_bytes"] <= 640 * MIB
    await subscription.aclose()


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
async def served(service: HostService, tmp_path: Path) -> AsyncIterator[str]:
    async with serve_on_unix_socket(create_app(HostRoot(service)), tmp_path / "hv.sock") as host:
        yield host


async def hv(host: str, *args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env={"HV_HOST": host})


async def test_cli_sets_and_shows_dynamic_memory(served: str) -> None:
    assert (await hv(served, "vm", "create", "web", "--memory", "256M")).exit_code == 0
    result = await hv(served, "vm", "set", "web", "--dynamic-memory", "--memory-min", "128M",
                      "--memory-max", "1G", "--memory-buffer", "25", "--memory-weight", "7000",
                      "--memory-startup", "512M", "-o", "json")
    assert result.exit_code == 0, result.output
    vm = json.loads(result.stdout)
    assert (vm["dynamic_memory"], vm["memory_bytes"], vm["memory_minimum_bytes"],
            vm["memory_maximum_bytes"], vm["memory_buffer_percent"], vm["memory_weight"]) == (
        True, 512 * MIB, 128 * MIB, 1 * GIB, 25, 7000)
    result = await hv(served, "vm", "show", "web")
    assert result.exit_code == 0, result.output
    assert "memory_maximum_bytes" in result.stdout and "1 GiB" in result.stdout
    result = await hv(served, "host", "info")
    assert result.exit_code == 0 and "memory_available_bytes" in result.stdout

    for args, message in ((["--memory-min", "lots"], "--memory-min 'lots' is not a size"),
                          (["--memory-buffer", "1"], "memory buffer 1% is out of range")):
        result = await hv(served, "vm", "set", "web", *args)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "Traceback" not in result.output
