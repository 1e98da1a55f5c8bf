"""The backup service's file system freeze (fake agent): always thawed, on errors and
cancellation too; nested holds; the API with its automatic thaw; the leftover marker."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import httpx
import pytest

from hvstack.errors import HvError
from hvstack.host.service import HostService
from hvstack.hypervisor.qemu.agent import AgentUnavailable
from hvstack.integration.freeze import MARKER
from hvstack.integration.ops import thaw_leftovers
from tests.functional.fakes import API, assert_problem, eventually, run_job

if TYPE_CHECKING:
    from hvstack.integration.ops import GuestOperations
    from tests.functional.guest_fake import FakeGuestAgent
    from tests.functional.guest_support import Guests

pytest_plugins = ("tests.functional.guest_support",)


def freezes(fake: FakeGuestAgent) -> list[str]:
    return [c for c in fake.calls if c.startswith("guest-fsfreeze-")]


async def test_frozen_freezes_and_thaws(guests: Guests, guest_ops: GuestOperations,
                                        service: HostService) -> None:
    fake = await guests.boot("g1")
    fake.frozen_count = 2
    vm = service.get_vm("g1")
    marker = vm.files.folder / MARKER
    async with guest_ops.frozen(vm) as count:
        assert (count, fake.frozen, marker.exists()) == (2, True, True)
        assert json.loads(marker.read_text())["since"] > 0
    assert (fake.frozen, marker.exists()) == (False, False)
    assert freezes(fake) == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


async def test_thawed_when_the_body_raises(guests: Guests, guest_ops: GuestOperations,
                                           service: HostService) -> None:
    fake = await guests.boot("g1")
    vm = service.get_vm("g1")
    with pytest.raises(RuntimeError, match="snapshot failed"):
        async with guest_ops.frozen(vm):
            assert fake.frozen
            raise RuntimeError("snapshot failed")
    assert not fake.frozen
    assert not (vm.files.folder / MARKER).exists()


async def test_thawed_when_cancelled_even_twice(guests: Guests, guest_ops: GuestOperations,
                                                service: HostService) -> None:
    fake = await guests.boot("g1")
    vm = service.get_vm("g1")
    inside = asyncio.Event()

    async def checkpoint() -> None:
        async with guest_ops.frozen(vm):
            inside.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(checkpoint())
    await inside.wait()
    # The first cancellation starts the thaw; a second one must not stop it.
    def cancel_again(command: str) -> None:
        if command == "guest-fsfreeze-thaw":
            task.cancel()

    fake.on_call = cancel_again
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: not fake.frozen, "the guest is thawed")
    await eventually(lambda: not (vm.files.folder / MARKER).exists(), "the marker is gone")


async def test_holds_nest(guests: Guests, guest_ops: GuestOperations, service: HostService) -> None:
    fake = await guests.boot("g1")
    vm = service.get_vm("g1")
    async with guest_ops.frozen(vm):
        async with guest_ops.frozen(vm):
            assert guest_ops.freezer.holds(vm) == 2
        assert fake.frozen, "the inner hold must not thaw"
    assert not fake.frozen
    assert freezes(fake) == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


async def test_a_freeze_that_times_out_is_thawed_later(guests: Guests, guest_ops: GuestOperations,
                                                       service: HostService) -> None:
    fake = await guests.boot("g1")
    vm = service.get_vm("g1")

    def stall_after_freeze(command: str) -> None:
        if command == "guest-fsfreeze-freeze":
            fake.frozen, fake.hang = True, True  # froze, but the answer never comes

    fake.on_call = stall_after_freeze
    with pytest.raises(AgentUnavailable):
        async with guest_ops.frozen(vm):
            raise AssertionError("the body must not run")
    fake.on_call, fake.hang = None, False
    await eventually(lambda: not fake.frozen, "the guest is thawed", timeout=20)


async def test_api_freeze_thaw_status(guest_api: httpx.AsyncClient, guests: Guests) -> None:
    fake = await guests.boot("g1")
    status = (await guest_api.post(f"{API}/vms/g1/fsfreeze", json={"action": "status"})).json()
    assert (status["status"], status["holds"]) == ("thawed", 0)
    frozen = (await guest_api.post(f"{API}/vms/g1/fsfreeze", json={"action": "freeze"})).json()
    assert (frozen["status"], frozen["filesystems"], frozen["holds"]) == ("frozen", 1, 1)
    assert frozen["auto_thaw_at"] is not None and fake.frozen
    again = (await guest_api.post(f"{API}/vms/g1/fsfreeze", json={"action": "freeze"})).json()
    assert again["holds"] == 1  # a second freeze extends the first
    status = (await guest_api.post(f"{API}/vms/g1/fsfreeze", json={"action": "status"})).json()
    assert status["status"] == "frozen"
    # Guest commands are refused with a clear reason while frozen.
    blocked = await guest_api.post(f"{API}/vms/g1/exec", json={"command": ["true"]})
    assert assert_problem(blocked, 409, "conflict")["detail"].startswith(
        "cannot run a command in VM 'g1': its file systems are frozen for a backup")
    thawed = (await guest_api.post(f"{API}/vms/g1/fsfreeze", json={"action": "thaw"})).json()
    assert (thawed["status"], thawed["filesystems"], thawed["holds"]) == ("thawed", 1, 0)
    assert not fake.frozen
    after = await guest_api.post(f"{API}/vms/g1/exec", json={"command": ["true"]})
    assert after.status_code == 200


async def test_api_freeze_thaws_by_itself(guest_api: httpx.AsyncClient, guests: Guests) -> None:
    fake = await guests.boot("g1")
    reply = await guest_api.post(f"{API}/vms/g1/fsfreeze", json={"action": "freeze",
                                                            "hold_seconds": 0.2})
    assert reply.json()["status"] == "frozen"
    await eventually(lambda: not fake.frozen, "the freeze ran out")


async def test_api_thaw_of_a_foreign_freeze(guest_api: httpx.AsyncClient, guests: Guests) -> None:
    fake = await guests.boot("g1")
    fake.frozen = True  # frozen by someone else (fsfreeze in the guest, an old service)
    thawed = (await guest_api.post(f"{API}/vms/g1/fsfreeze", json={"action": "thaw"})).json()
    assert (thawed["status"], thawed["filesystems"]) == ("thawed", 1)
    assert not fake.frozen


async def test_api_thaw_does_not_break_a_running_checkpoint(
        guest_api: httpx.AsyncClient, guests: Guests, guest_ops: GuestOperations,
        service: HostService) -> None:
    fake = await guests.boot("g1")
    async with guest_ops.frozen(service.get_vm("g1")):
        reply = await guest_api.post(f"{API}/vms/g1/fsfreeze", json={"action": "thaw"})
        assert assert_problem(reply, 409, "conflict")["holds"] == 1
        assert fake.frozen
    assert not fake.frozen


async def test_backup_service_and_state_required(guest_api: httpx.AsyncClient, guests: Guests,
                                                 guest_ops: GuestOperations,
                                                 service: HostService) -> None:
    await guests.boot("g1", backup=False)
    reply = await guest_api.post(f"{API}/vms/g1/fsfreeze", json={"action": "freeze"})
    assert assert_problem(reply, 409, "integration-service-disabled")["service"] == "backup"
    with pytest.raises(HvError, match="backup integration service"):
        async with guest_ops.frozen(service.get_vm("g1")):
            pass
    await guests.boot("g2", agent=False)
    await run_job(guest_api, "g2", "stop", {"mode": "turn-off"})
    reply = await guest_api.post(f"{API}/vms/g2/fsfreeze", json={"action": "freeze"})
    assert assert_problem(reply, 409, "invalid-state")["detail"] == (
        "cannot freeze the file systems of VM 'g2' while it is Off: start it first")


async def test_leftover_freezes_are_thawed(guests: Guests, service: HostService,
                                           guest_ops: GuestOperations) -> None:
    fake = await guests.boot("g1")
    vm = service.get_vm("g1")
    fake.frozen = True  # as a crashed service left it
    (vm.files.folder / MARKER).write_text("{}\n")
    await guests.boot("off", agent=False)
    off = service.get_vm("off")
    await run_job(guests.api, "off", "stop", {"mode": "turn-off"})
    (off.files.folder / MARKER).write_text("{}\n")
    assert await thaw_leftovers(service.list_vms()) == ["g1"]
    assert not fake.frozen
    assert not (vm.files.folder / MARKER).exists()
    assert not (off.files.folder / MARKER).exists()

    # An agent that does not answer yet keeps the marker until contact is made.
    fake.frozen, fake.hang = True, True
    (vm.files.folder / MARKER).write_text("{}\n")
    assert await thaw_leftovers(service.list_vms(), timeout=0.5) == []
    assert (vm.files.folder / MARKER).exists()
    fake.hang = False
    await guest_ops.on_contact(vm)
    assert not fake.frozen and not (vm.files.folder / MARKER).exists()
