"""The power policy, by worked examples: no I/O, no VM, just the decisions."""

from __future__ import annotations

import pytest

from hvstack.compute.model import AutoStartAction, AutoStopAction, VmState
from hvstack.compute.policy import (
    ShutdownStep,
    StopAction,
    admit_memory,
    auto_start,
    auto_stop,
    shutdown_chain,
    stop_action,
)
from hvstack.compute.states import Operation
from hvstack.errors import InsufficientResources

NOTHING, IF_RUNNING, ALWAYS = (AutoStartAction.NOTHING, AutoStartAction.START_IF_RUNNING,
                               AutoStartAction.ALWAYS_START)
OFF, SAVED, RUNNING, PAUSED = VmState.OFF, VmState.SAVED, VmState.RUNNING, VmState.PAUSED


@pytest.mark.parametrize(("action", "delay", "state", "was_running", "expected"), [
    (ALWAYS, 0, OFF, False, 0),         # always start: even a VM that was off
    (ALWAYS, 30, SAVED, False, 30),     # ... after its delay, restoring its saved state
    (IF_RUNNING, 5, SAVED, True, 5),    # it ran when the service stopped: start it again
    (IF_RUNNING, 5, OFF, False, None),  # it was off: leave it off
    (NOTHING, 0, OFF, True, None),      # never started automatically
    (ALWAYS, 0, RUNNING, True, None),   # reattached: it runs already
    (ALWAYS, 0, PAUSED, True, None),
])
def test_auto_start(action: AutoStartAction, delay: int, state: VmState, was_running: bool,
                    expected: float | None) -> None:
    assert auto_start(action, delay, state, was_running) == expected


@pytest.mark.parametrize(("action", "state", "expected"), [
    (AutoStopAction.SAVE, RUNNING, AutoStopAction.SAVE),
    (AutoStopAction.SHUT_DOWN, PAUSED, AutoStopAction.SHUT_DOWN),
    (AutoStopAction.TURN_OFF, RUNNING, AutoStopAction.TURN_OFF),
    (AutoStopAction.SAVE, OFF, None),     # nothing runs: nothing to stop
    (AutoStopAction.TURN_OFF, SAVED, None),
])
def test_auto_stop(action: AutoStopAction, state: VmState,
                   expected: AutoStopAction | None) -> None:
    assert auto_stop(action, state) == expected


@pytest.mark.parametrize(("mode", "force", "state", "expected"), [
    ("shut-down", False, RUNNING, StopAction.SHUT_DOWN),
    ("shut-down", False, PAUSED, StopAction.SHUT_DOWN),   # resumed, then asked
    ("shut-down", True, RUNNING, StopAction.SHUT_DOWN),   # asked first, off after timeout
    ("shut-down", True, PAUSED, StopAction.TURN_OFF),     # a paused guest cannot answer
    ("shut-down", True, None, StopAction.TURN_OFF),       # checked before it runs
    ("turn-off", False, RUNNING, StopAction.TURN_OFF),
    ("save", True, RUNNING, StopAction.SAVE),             # force changes no other mode
    ("discard-saved-state", False, SAVED, StopAction.DISCARD_SAVED_STATE),
])
def test_stop_action(mode: str, force: bool, state: VmState | None,
                     expected: StopAction) -> None:
    assert stop_action(mode, force, state) is expected


def test_each_stop_action_is_checked_as_its_operation() -> None:
    assert {a: a.operation for a in StopAction} == {
        StopAction.SHUT_DOWN: Operation.SHUT_DOWN, StopAction.TURN_OFF: Operation.TURN_OFF,
        StopAction.SAVE: Operation.SAVE,
        StopAction.DISCARD_SAVED_STATE: Operation.DISCARD_SAVED_STATE}


@pytest.mark.parametrize(("service", "answers", "expected"), [
    (True, True, (ShutdownStep.AGENT, ShutdownStep.ACPI, ShutdownStep.TURN_OFF)),
    (True, False, (ShutdownStep.ACPI, ShutdownStep.TURN_OFF)),   # no heartbeat
    (False, True, (ShutdownStep.ACPI, ShutdownStep.TURN_OFF)),   # service turned off
    (False, False, (ShutdownStep.ACPI, ShutdownStep.TURN_OFF)),
])
def test_shutdown_chain(service: bool, answers: bool,
                        expected: tuple[ShutdownStep, ...]) -> None:
    assert shutdown_chain(service, answers) == expected


MIB = 1 << 20


def test_memory_admission() -> None:
    admit_memory("web", 512 * MIB, 512 * MIB)  # exactly what is there: admitted
    admit_memory("web", 512 * MIB, 4096 * MIB)
    with pytest.raises(InsufficientResources) as info:
        admit_memory("web", 2048 * MIB, 1500 * MIB)
    assert info.value.message == ("cannot start VM 'web': it needs 2048 MiB of memory and "
                                  "the host has 1500 MiB available")
