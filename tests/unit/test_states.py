"""The VM state machine: every operation against every state, and the error it raises."""

from __future__ import annotations

import pytest

from hvstack.compute.model import VmState
from hvstack.compute.states import ALLOWED, Operation, allowed, require
from hvstack.errors import Conflict, InvalidState

# The table as Hyper-V users know it. Columns: Off, Starting, Running, Paused, Saving,
# Saved, Stopping. "x" allowed, "." refused.
TABLE = """
                       Off Sta Run Pau Sav Svd Sto
start                   x   .   .   .   .   x   .
stop                    .   x   x   x   .   .   x
turn off                .   x   x   x   x   .   x
shut down               .   .   x   .   .   .   .
pause                   .   .   x   .   .   .   .
resume                  .   .   .   x   .   .   .
save                    .   .   x   x   .   .   .
restart                 .   .   x   .   .   .   .
rename                  x   x   x   x   x   x   x
change this setting of  x   .   .   .   .   .   .
delete                  x   .   .   .   .   x   .
delete the saved state of  .   .   .   .   .   x   .
attach a disk to        x   .   .   .   .   .   .
"""
COLUMNS = [VmState.OFF, VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.SAVING,
           VmState.SAVED, VmState.STOPPING]


def _table() -> dict[tuple[Operation, VmState], bool]:
    cells: dict[tuple[Operation, VmState], bool] = {}
    for line in TABLE.strip().splitlines()[1:]:
        words = line.split()
        marks, name = words[-len(COLUMNS):], " ".join(words[:-len(COLUMNS)])
        operation = Operation(name)
        for state, mark in zip(COLUMNS, marks, strict=True):
            cells[operation, state] = mark == "x"
    return cells


EXPECTED = _table()
PAIRS = [(op, state) for op in Operation for state in VmState]


def test_table_covers_every_operation_and_state() -> None:
    assert set(COLUMNS) == set(VmState)
    assert set(EXPECTED) == set(PAIRS)
    assert set(ALLOWED) == set(Operation)


@pytest.mark.parametrize(("operation", "state"), PAIRS, ids=lambda x: str(x).replace(" ", "_"))
def test_every_pair(operation: Operation, state: VmState) -> None:
    want = EXPECTED[operation, state]
    assert allowed(operation, state) is want
    if want:
        require(operation, state, "web")
    else:
        with pytest.raises(InvalidState):
            require(operation, state, "web")


def test_invalid_state_message_names_state_and_required_states() -> None:
    with pytest.raises(InvalidState) as info:
        require(Operation.START, VmState.RUNNING, "web-01")
    exc = info.value
    assert exc.message == "cannot start VM 'web-01': it is Running; start requires Off or Saved"
    assert exc.data["vm"] == "web-01"
    assert exc.data["state"] == "Running"
    assert exc.data["operation"] == "start"
    assert exc.data["required"] == ["Off", "Saved"]
    assert isinstance(exc, Conflict)
    assert exc.http_status == 409
    assert exc.slug == "invalid-state"


def test_required_states_are_listed_in_state_order() -> None:
    with pytest.raises(InvalidState) as info:
        require(Operation.TURN_OFF, VmState.OFF, "db")
    assert info.value.data["required"] == ["Starting", "Running", "Paused", "Saving", "Stopping"]
    assert "it is Off" in info.value.message
    assert info.value.message.endswith(
        "turn off requires Starting or Running or Paused or Saving or Stopping"
    )


def test_single_required_state() -> None:
    with pytest.raises(InvalidState) as info:
        require(Operation.RESUME, VmState.RUNNING, "db")
    assert info.value.message == "cannot resume VM 'db': it is Running; resume requires Paused"
    assert info.value.data["required"] == ["Paused"]
