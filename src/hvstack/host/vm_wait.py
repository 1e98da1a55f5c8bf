"""Waiting until a VM reaches a condition (Hyper-V's Wait-VM): Running, Off, heartbeat
OK, or an IP address reported by the guest.

Contract:

* :func:`wait_for` returns a :class:`Reached` as soon as the condition holds (at once if
  it already does) and raises :class:`~hvstack.errors.WaitTimedOut` (504) when
  ``timeout`` seconds pass first, :class:`~hvstack.errors.NotFound` if the VM is deleted
  meanwhile, :class:`~hvstack.errors.ServiceDisabled` at once for ``heartbeat`` when the
  VM's heartbeat service is turned off. A VM that stops while waited for is waited for
  still (a script may start it again).
* It is driven by the event bus: it subscribes before its first look, and looks again on
  every event of the VM (state changes, heartbeat changes, settings changes). No
  sleeping loop: except for ``ip`` while the agent answers, because the guest agent
  tells addresses only when asked; then the agent is asked again every
  :data:`IP_RECHECK` seconds, or sooner on an event.
* :func:`condition_met` is the pure part: whether a condition holds for a VM's facts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from dataclasses import dataclass

from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import ServiceStatus, VmState
from hvstack.errors import HvError, NotFound, ServiceDisabled, WaitTimedOut
from hvstack.host.events import Subscription
from hvstack.host.service import HostService
from hvstack.integration.rules import intrinsic_data, reachable_addresses

log = logging.getLogger(__name__)

IP_RECHECK = 2.0
AGENT_TIMEOUT = 5.0


class WaitFor(enum.StrEnum):
    HEARTBEAT = "heartbeat"
    IP = "ip"
    RUNNING = "running"
    OFF = "off"


@dataclass(frozen=True)
class Reached:
    vm: str
    condition: WaitFor
    state: VmState
    heartbeat: ServiceStatus
    addresses: tuple[str, ...] = ()


def condition_met(condition: WaitFor, state: VmState, heartbeat: ServiceStatus,
                  addresses: tuple[str, ...] = ()) -> bool:
    """Whether ``condition`` holds for a VM in ``state`` with these facts."""
    if condition is WaitFor.OFF:
        return state is VmState.OFF
    if state is not VmState.RUNNING:
        return False
    if condition is WaitFor.HEARTBEAT:
        return heartbeat is ServiceStatus.OK
    if condition is WaitFor.IP:
        return bool(addresses)
    return True


def _not_met(vm: str, condition: WaitFor, timeout: float, state: VmState,
             heartbeat: ServiceStatus) -> str:
    within = f"within {timeout:g} s"
    if condition is WaitFor.HEARTBEAT:
        return (f"VM '{vm}' sent no heartbeat {within} (it is {state.value}, "
                f"heartbeat {heartbeat.value})")
    if condition is WaitFor.IP:
        return f"VM '{vm}' reported no IP address {within} (it is {state.value})"
    return (f"VM '{vm}' was not {'Running' if condition is WaitFor.RUNNING else 'Off'} "
            f"{within} (it is {state.value})")


async def _addresses(vm: VmController) -> tuple[str, ...]:
    """The guest's reachable addresses; none while the agent does not answer."""
    if vm.state is not VmState.RUNNING or vm.link.status is not ServiceStatus.OK:
        return ()
    try:
        answer = await vm.agent.call("guest-network-get-interfaces", timeout=AGENT_TIMEOUT)
    except HvError as exc:
        log.debug("VM %s: no addresses from the agent: %s", vm.record.name, exc)
        return ()
    adapters = intrinsic_data({"guest-network-get-interfaces": answer}, {}).adapters
    return tuple(reachable_addresses(adapters))


async def _next_event_of(events: Subscription, vm_id: str, within: float | None) -> None:
    """Return on the next event of VM ``vm_id``, or after ``within`` seconds."""
    async def one() -> None:
        async for event in events:
            if event.data.get("id") == vm_id:
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(one(), within)


async def wait_for(service: HostService, ref: str, condition: WaitFor,
                   timeout: float) -> Reached:
    vm = service.get_vm(ref)
    vm_id, name = vm.record.id, vm.record.name
    if condition is WaitFor.HEARTBEAT and not vm.record.config.integration_services.heartbeat:
        raise ServiceDisabled(name, "heartbeat")
    events = service.events.subscribe()
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    vm = service.get_vm(vm_id)
                except NotFound:
                    raise NotFound(f"VM '{name}' was deleted while waited for",
                                   vm=name) from None
                name = vm.record.name
                addresses = await _addresses(vm) if condition is WaitFor.IP else ()
                if condition_met(condition, vm.state, vm.link.heartbeat, addresses):
                    return Reached(name, condition, vm.state, vm.link.heartbeat, addresses)
                asking = condition is WaitFor.IP and vm.link.status is ServiceStatus.OK
                await _next_event_of(events, vm_id, IP_RECHECK if asking else None)
    except TimeoutError:
        raise WaitTimedOut(_not_met(name, condition, timeout, vm.state, vm.link.heartbeat),
                           vm=name, condition=condition.value, timeout_seconds=timeout,
                           state=vm.state.value) from None
    finally:
        await events.aclose()
