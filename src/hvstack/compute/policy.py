"""Pure policy of a VM's power: what to do, decided from facts, with no I/O.

The effects live in :mod:`hvstack.compute.lifecycle` and :mod:`hvstack.host.service`;
they ask these functions what to do. Each is tested with worked examples
(``tests/unit/test_policy.py``):

* :func:`auto_start`: whether (and after what delay) the host starts a VM when it starts;
* :func:`auto_stop`: what the host does to a VM when it stops;
* :func:`stop_action`: which action a stop request means (mode, ``--force``, state);
* :func:`shutdown_chain`: the steps of a shut-down (guest agent, ACPI, turn off);
* :func:`admit_memory`: whether the host has the memory to start a VM.
"""

from __future__ import annotations

import enum

from hvstack.compute.model import AutoStartAction, AutoStopAction, VmState
from hvstack.compute.states import Operation
from hvstack.errors import InsufficientResources


def auto_start(action: AutoStartAction, delay: float, state: VmState,
               was_running: bool) -> float | None:
    """The delay after which the host starts the VM when the host service starts, or
    None to leave it. Only an Off or Saved VM is started (a VM the service reattached
    to runs already); "start if running" means running when the service last stopped.
    """
    if state not in (VmState.OFF, VmState.SAVED):
        return None
    if action is AutoStartAction.ALWAYS_START:
        return delay
    if action is AutoStartAction.START_IF_RUNNING and was_running:
        return delay
    return None


def auto_stop(action: AutoStopAction, state: VmState) -> AutoStopAction | None:
    """What the host does to the VM when the host service stops: its automatic stop
    action if the VM runs (Running or Paused), else nothing."""
    return action if state in (VmState.RUNNING, VmState.PAUSED) else None


class StopMode(enum.StrEnum):
    """What a stop request asks for."""

    SHUT_DOWN = "shut-down"
    TURN_OFF = "turn-off"
    SAVE = "save"
    DISCARD_SAVED_STATE = "discard-saved-state"


class StopAction(enum.StrEnum):
    SHUT_DOWN = "shut down"
    TURN_OFF = "turn off"
    SAVE = "save"
    DISCARD_SAVED_STATE = "discard saved state"

    @property
    def operation(self) -> Operation:
        """The operation of the state machine the action is checked against."""
        return _OPERATIONS[self]


_OPERATIONS = {StopAction.SHUT_DOWN: Operation.SHUT_DOWN,
               StopAction.TURN_OFF: Operation.TURN_OFF,
               StopAction.SAVE: Operation.SAVE,
               StopAction.DISCARD_SAVED_STATE: Operation.DISCARD_SAVED_STATE}


def stop_action(mode: str, force: bool, state: VmState | None = None) -> StopAction:
    """What a stop request does. ``mode`` is the request's mode (``shut-down``,
    ``turn-off``, ``save``, ``discard-saved-state``). ``force`` turns a shut-down into
    a turn-off, except of a Running VM whose guest is asked first (the turn-off then
    comes after the timeout); with no ``state`` (checking a request before it runs)
    force means turn off.
    """
    if mode == StopMode.SAVE:
        return StopAction.SAVE
    if mode == StopMode.DISCARD_SAVED_STATE:
        return StopAction.DISCARD_SAVED_STATE
    if mode == StopMode.TURN_OFF:
        return StopAction.TURN_OFF
    if force and state is not VmState.RUNNING:
        return StopAction.TURN_OFF
    return StopAction.SHUT_DOWN


class ShutdownStep(enum.StrEnum):
    AGENT = "guest agent"
    ACPI = "ACPI power button"
    TURN_OFF = "turn off"


def shutdown_chain(shutdown_service: bool, agent_answers: bool) -> tuple[ShutdownStep, ...]:
    """The steps of a shut-down, each taken when the one before fails or times out:
    the guest agent (if the shutdown integration service is on and the agent answers
    its heartbeat), then the ACPI power button, then turning the VM off."""
    if shutdown_service and agent_answers:
        return (ShutdownStep.AGENT, ShutdownStep.ACPI, ShutdownStep.TURN_OFF)
    return (ShutdownStep.ACPI, ShutdownStep.TURN_OFF)


def admit_memory(name: str, needed: int, available: int) -> None:
    """Raise InsufficientResources unless the host has ``needed`` bytes available for
    VM ``name`` (its whole memory: no overcommit until dynamic memory lands)."""
    if needed > available:
        raise InsufficientResources(
            f"cannot start VM '{name}': it needs {needed >> 20} MiB of memory and the "
            f"host has {available >> 20} MiB available")
