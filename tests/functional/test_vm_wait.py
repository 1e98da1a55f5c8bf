"""``vm wait`` (Hyper-V's Wait-VM) and ``vm stop --discard-saved-state``
(Remove-VMSavedState) through the API and the CLI, on the fake driver and guest agent;
and the controller refusing a state change its state machine lacks."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from hvstack.compute.model import IntegrationServices, ServiceStatus, VmState
from hvstack.errors import InvalidTransition
from hvstack.host.service import HostService
from hvstack.host.vm_wait import WaitFor, condition_met
from hvstack.integration.rules import AdapterInfo, reachable_addresses
from tests.functional.fakes import (
    API,
    FakeDriver,
    assert_problem,
    create_vm,
    eventually,
    run_job,
    show_vm,
)
from tests.functional.guest_cli import hv

if TYPE_CHECKING:
    from tests.functional.guest_support import Guests

pytest_plugins = ("tests.functional.guest_support",)


# -- the pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(("condition", "state", "heartbeat", "addresses", "met"), [
    (WaitFor.RUNNING, VmState.RUNNING, ServiceStatus.NO_CONTACT, (), True),
    (WaitFor.RUNNING, VmState.PAUSED, ServiceStatus.OK, (), False),
    (WaitFor.OFF, VmState.OFF, ServiceStatus.NO_CONTACT, (), True),
    (WaitFor.OFF, VmState.SAVED, ServiceStatus.NO_CONTACT, (), False),
    (WaitFor.HEARTBEAT, VmState.RUNNING, ServiceStatus.OK, (), True),
    (WaitFor.HEARTBEAT, VmState.RUNNING, ServiceStatus.LOST_COMMUNICATION, (), False),
    (WaitFor.HEARTBEAT, VmState.STOPPING, ServiceStatus.OK, (), False),
    (WaitFor.IP, VmState.RUNNING, ServiceStatus.OK, ("10.0.2.15",), True),
    (WaitFor.IP, VmState.RUNNING, ServiceStatus.OK, (), False),
])
def test_condition_met(condition: WaitFor, state: VmState, heartbeat: ServiceStatus,
                       addresses: tuple[str, ...], met: bool) -> None:
    assert condition_met(condition, state, heartbeat, addresses) is met


def test_reachable_addresses_leave_out_loopback_and_link_local() -> None:
    adapters = [AdapterInfo("lo", None, ("127.0.0.1",), ("::1",)),
                AdapterInfo("eth0", "52:54:00:00:00:01", ("169.254.3.4", "10.0.2.15"),
                            ("fe80::1%eth0", "fec0::5054:ff:fe12:3456", "bogus"))]
    assert reachable_addresses(adapters) == ["10.0.2.15", "fec0::5054:ff:fe12:3456"]
    assert reachable_addresses(adapters[:1]) == []


# -- vm wait through the API ------------------------------------------------------------------


def _subscribers(service: HostService) -> int:
    return len(service.events._subscribers)


async def _waiting(api: httpx.AsyncClient, service: HostService, name: str,
                   condition: str, timeout: float = 30) -> asyncio.Task[httpx.Response]:
    """Start a wait and return once the server is waiting (subscribed to events)."""
    before = _subscribers(service)
    task = asyncio.create_task(api.get(f"{API}/vms/{name}/wait",
                                       params={"for": condition, "timeout": timeout}))
    await eventually(lambda: _subscribers(service) > before or task.done(),
                     "the server waits")
    return task


async def test_wait_for_running_answers_when_the_vm_starts(
        api: httpx.AsyncClient, service: HostService) -> None:
    await create_vm(api, "web")
    waiter = await _waiting(api, service, "web", "running")
    assert not waiter.done()
    await run_job(api, "web", "start")
    response = await asyncio.wait_for(waiter, 10)
    assert response.status_code == 200, response.text
    assert response.json() == {"vm": "web", "condition": "running", "state": "Running",
                               "heartbeat": "No Contact", "ip_addresses": []}
    assert _subscribers(service) == 0


async def test_wait_for_off_answers_when_the_vm_stops(
        api: httpx.AsyncClient, service: HostService) -> None:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    waiter = await _waiting(api, service, "web", "off")
    await run_job(api, "web", "stop", {"mode": "turn-off"})
    response = await asyncio.wait_for(waiter, 10)
    assert (response.status_code, response.json()["state"]) == (200, "Off")


async def test_a_condition_that_holds_answers_at_once(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    response = await api.get(f"{API}/vms/web/wait", params={"for": "off", "timeout": 30})
    assert response.json()["state"] == "Off"


async def test_the_deadline_passing_is_a_504_sentence(
        api: httpx.AsyncClient, service: HostService) -> None:
    await create_vm(api, "web")
    response = await api.get(f"{API}/vms/web/wait", params={"for": "running",
                                                            "timeout": 0.05})
    problem = assert_problem(response, 504, "wait-timeout")
    assert problem["detail"] == "VM 'web' was not Running within 0.05 s (it is Off)"
    assert (problem["vm"], problem["condition"], problem["state"]) == ("web", "running",
                                                                      "Off")
    assert _subscribers(service) == 0


@pytest.mark.parametrize(("params", "why"), [
    ({"for": "coffee"}, "for"),
    ({"for": "ip", "timeout": 0}, "timeout"),
    ({"for": "ip", "timeout": 86401}, "timeout"),
    ({}, "for"),
])
async def test_bad_wait_requests(api: httpx.AsyncClient, params: dict[str, Any],
                                 why: str) -> None:
    await create_vm(api, "web")
    problem = assert_problem(await api.get(f"{API}/vms/web/wait", params=params), 400,
                             "invalid-input")
    assert why in problem["detail"]


async def test_deleting_the_vm_ends_the_wait(api: httpx.AsyncClient,
                                             service: HostService) -> None:
    await create_vm(api, "web")
    waiter = await _waiting(api, service, "web", "running")
    assert (await api.delete(f"{API}/vms/web")).status_code == 200
    problem = assert_problem(await asyncio.wait_for(waiter, 10), 404, "not-found")
    assert problem["detail"] == "VM 'web' was deleted while waited for"


async def test_a_client_that_goes_away_ends_the_wait(service: HostService,
                                                     guest_served: str) -> None:
    transport = httpx.AsyncHTTPTransport(uds=guest_served.removeprefix("unix:"))
    async with httpx.AsyncClient(transport=transport, base_url="http://hv") as client:
        await create_vm(client, "web")
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"{API}/vms/web/wait", params={"for": "running", "timeout": 600},
                             timeout=httpx.Timeout(0.3))
    await eventually(lambda: _subscribers(service) == 0, "the server stopped waiting")


async def test_wait_for_heartbeat_and_ip(guests: Guests, guest_api: httpx.AsyncClient,
                                         service: HostService) -> None:
    await guests.boot("g1", agent=False)
    heartbeat = await _waiting(guest_api, service, "g1", "heartbeat")
    ip = await _waiting(guest_api, service, "g1", "ip")
    assert not heartbeat.done() and not ip.done()
    await guests.attach("g1")  # the guest agent starts answering
    response = await asyncio.wait_for(heartbeat, 30)
    assert response.json() == {"vm": "g1", "condition": "heartbeat", "state": "Running",
                               "heartbeat": "OK", "ip_addresses": []}
    response = await asyncio.wait_for(ip, 30)
    assert response.json()["ip_addresses"] == ["10.0.2.15"]


async def test_wait_for_ip_times_out_without_an_agent(guests: Guests,
                                                      guest_api: httpx.AsyncClient) -> None:
    await guests.boot("g1", agent=False)
    response = await guest_api.get(f"{API}/vms/g1/wait", params={"for": "ip",
                                                                 "timeout": 0.1})
    problem = assert_problem(response, 504, "wait-timeout")
    assert problem["detail"] == "VM 'g1' reported no IP address within 0.1 s (it is Running)"


async def test_wait_for_heartbeat_needs_the_heartbeat_service(
        api: httpx.AsyncClient, service: HostService) -> None:
    await create_vm(api, "web")
    await service.update_vm("web", integration_services=IntegrationServices(heartbeat=False))
    problem = assert_problem(await api.get(f"{API}/vms/web/wait", params={
        "for": "heartbeat", "timeout": 30}), 409, "integration-service-disabled")
    assert "hv vm set web --enable heartbeat" in problem["detail"]


# -- vm wait through the CLI ----------------------------------------------------------------


async def test_cli_wait(service: HostService, guest_served: str) -> None:
    assert (await hv(guest_served, "vm", "create", "web", "--memory", "64M")).exit_code == 0
    result = await hv(guest_served, "vm", "wait", "web", "--for", "running",
                      "--timeout", "0.05")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: VM 'web' was not Running within 0.05 s (it is Off)")
    assert result.stdout == ""

    waiter = asyncio.create_task(hv(guest_served, "vm", "wait", "web", "--for", "running"))
    await eventually(lambda: _subscribers(service) > 0 or waiter.done(), "the CLI waits")
    # not a second CLI run: CliRunner swaps sys.stdout, one run at a time
    await service.start_vm("web").done.wait()
    result = await asyncio.wait_for(waiter, 30)
    assert (result.exit_code, result.stdout) == (0, "VM 'web' is Running\n")

    result = await hv(guest_served, "vm", "wait", "web", "--for", "running", "-o", "json")
    assert json.loads(result.stdout)["state"] == "Running"

    result = await hv(guest_served, "vm", "wait", "web", "--for", "tea")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --for 'tea' is not one of heartbeat, ip, running, off")
    for bad in ("0", "-1", "86401"):
        result = await hv(guest_served, "vm", "wait", "web", "--for", "off", "--timeout", bad)
        assert result.exit_code == 2
        assert result.stderr.strip() == (
            "error: --timeout must be more than 0 and at most 86400 seconds")


# -- vm stop --discard-saved-state --------------------------------------------------------------


async def test_discard_saved_state(api: httpx.AsyncClient, service: HostService,
                                   driver: FakeDriver) -> None:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    await run_job(api, "web", "save")
    saved = service.get_vm("web").files.saved_state
    assert saved.exists()

    job = await run_job(api, "web", "stop", {"mode": "discard-saved-state"})
    assert job["result"] == {"state": "Off", "how": "saved state discarded"}
    vm = await show_vm(api, "web")
    assert (vm["state"], vm["state_reason"]) == ("Off", "saved state discarded")
    assert not saved.exists()
    assert len(driver.machines) == 1  # nothing was started to get there

    await run_job(api, "web", "start")
    assert driver.restored == []
    assert driver.machines[-1].spec is not None and not driver.machines[-1].spec.incoming


async def test_discard_saved_state_of_a_running_vm_is_refused(api: httpx.AsyncClient,
                                                             service: HostService) -> None:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    response = await api.post(f"{API}/vms/web/stop", json={"mode": "discard-saved-state"})
    problem = assert_problem(response, 409, "invalid-state")
    assert problem["detail"] == ("cannot discard the saved state of VM 'web' while it is "
                                 "Running: it must be Saved")
    assert (await show_vm(api, "web"))["state"] == "Running"


async def test_cli_discard_saved_state(service: HostService, guest_served: str) -> None:
    for args in (("vm", "create", "web", "--memory", "64M"), ("vm", "start", "web"),
                 ("vm", "save", "web")):
        assert (await hv(guest_served, *args)).exit_code == 0
    result = await hv(guest_served, "vm", "stop", "web", "--discard-saved-state")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == ("Discarding the saved state of web: done, VM is Off "
                                     "(saved state discarded)")
    assert not service.get_vm("web").files.saved_state.exists()
    result = await hv(guest_served, "vm", "stop", "web", "--discard-saved-state", "--save")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --save and --discard-saved-state exclude each other: give one")


# -- the controller refuses moves the state machine lacks ------------------------------------


async def test_an_unexpected_state_change_is_logged_and_refused(
        api: httpx.AsyncClient, service: HostService,
        caplog: pytest.LogCaptureFixture) -> None:
    await create_vm(api, "web")
    vm = service.get_vm("web")
    with caplog.at_level(logging.ERROR), pytest.raises(InvalidTransition) as info:
        vm._set(VmState.SAVING, "by mistake")
    assert info.value.message == "VM 'web' cannot move from Off to Saving"
    assert vm.state is VmState.OFF
    assert (await show_vm(api, "web"))["state"] == "Off"
    assert "refused the move from Off to Saving" in caplog.text


async def test_shut_down_falls_back_to_acpi_when_the_agent_fails(
        guests: Guests, guest_api: httpx.AsyncClient, service: HostService) -> None:
    """Stopping → Stopping with a new reason, not a step on to Off while QEMU runs."""
    fake = await guests.boot("g1")
    response = await guest_api.get(f"{API}/vms/g1/wait", params={"for": "heartbeat",
                                                                 "timeout": 30})
    assert response.json()["heartbeat"] == "OK"
    fake.hang = True  # the agent stops answering: guest-shutdown times out
    job = await run_job(guest_api, "g1", "stop")
    assert job["result"] == {"state": "Off", "how": "the guest shut down (ACPI power button)"}


async def test_client_waits_for_good_one_long_poll_after_another(
        service: HostService, guest_served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from hvstack import client as client_module

    monkeypatch.setattr(client_module, "WAIT_CHUNK", 0.05)  # many polls time out first
    polls: list[str] = []
    with client_module.Client(guest_served) as api:
        # the server runs in this loop: the blocking client runs in threads
        await asyncio.to_thread(api.post, "/vms", {"name": "web", "memory": "64M"})
        original = api.request

        def counting(method: str, path: str, **kwargs: Any) -> Any:
            polls.append(path)
            return original(method, path, **kwargs)

        monkeypatch.setattr(api, "request", counting)
        waiter = asyncio.create_task(asyncio.to_thread(api.wait_vm, "web", "running"))
        await eventually(lambda: len(polls) >= 3, "several polls timed out", timeout=30)
        await service.start_vm("web").done.wait()
        reached = await asyncio.wait_for(waiter, 30)
    assert reached["state"] == "Running"
    assert set(polls) == {"/vms/web/wait"}
