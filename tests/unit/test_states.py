"""The VM state machine: every operation against every state, the steps each operation
takes, the moves the controller may make, and the sentence a refusal reads as."""

from __future__ import annotations

import itertools

import pytest

from hvstack.compute.model import VmState
from hvstack.compute.states import (
    TABLE,
    Operation,
    allowed,
    can_move,
    next_state,
    require,
)
from hvstack.errors import Conflict, InvalidState

# The table as Hyper-V users know it. Columns: Off, Starting, Running, Paused, Saving,
# Saved, Stopping. "x" allowed, "." refused.
TABLE_TEXT = """
                                Off Sta Run Pau Sav Svd Sto
start                            x   .   .   .   .   x   .
shut down                        .   x   x   x   .   .   x
turn off                         .   x   x   x   x   .   x
save                             .   .   x   x   .   .   .
pause                            .   .   x   .   .   .   .
resume                           .   .   .   x   .   .   .
restart                          .   .   x   .   .   .   .
discard the saved state of       .   .   .   .   .   x   .
delete                           x   .   .   .   .   x   .
run a command in                 .   .   x   .   .   .   .
copy files to or from            .   .   x   .   .   .   .
freeze the file systems of       .   .   x   .   .   .   .
thaw the file systems of         .   .   x   .   .   .   .
read the freeze status of        .   .   x   .   .   .   .
open the graphical console of    .   .   x   x   .   .   .
take a screenshot of             .   .   x   x   .   .   .
checkpoint                       x   .   x   x   .   x   .
apply a checkpoint to            x   .   x   x   .   x   .
"""
COLUMNS = [VmState.OFF, VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.SAVING,
           VmState.SAVED, VmState.STOPPING]


def _table() -> dict[tuple[Operation, VmState], bool]:
    cells: dict[tuple[Operation, VmState], bool] = {}
    for line in TABLE_TEXT.strip().splitlines()[1:]:
        words = line.split()
        marks, name = words[-len(COLUMNS):], " ".join(words[:-len(COLUMNS)])
        operation = Operation(name)
        for state, mark in zip(COLUMNS, marks, strict=True):
            cells[operation, state] = mark == "x"
    return cells


EXPECTED = _table()
PAIRS = [(op, state) for op in Operation for state in VmState]
S = VmState


def test_table_covers_every_operation_and_state() -> None:
    assert set(COLUMNS) == set(VmState)
    assert set(EXPECTED) == set(PAIRS)
    assert set(TABLE) == set(Operation)


@pytest.mark.parametrize(("operation", "state"), PAIRS, ids=lambda x: str(x).replace(" ", "_"))
def test_every_pair(operation: Operation, state: VmState) -> None:
    want = EXPECTED[operation, state]
    assert allowed(operation, state) is want
    if want:
        require(operation, state, "web")
    else:
        with pytest.raises(InvalidState):
            require(operation, state, "web")


@pytest.mark.parametrize(("operation", "path"), [
    (Operation.START, [S.OFF, S.STARTING, S.RUNNING]),
    (Operation.START, [S.SAVED, S.STARTING, S.RUNNING]),
    (Operation.SAVE, [S.RUNNING, S.SAVING, S.SAVED]),
    (Operation.SAVE, [S.PAUSED, S.SAVING, S.SAVED]),
    (Operation.SHUT_DOWN, [S.RUNNING, S.STOPPING, S.OFF]),
    (Operation.SHUT_DOWN, [S.PAUSED, S.STOPPING, S.OFF]),
    (Operation.TURN_OFF, [S.RUNNING, S.OFF]),
    (Operation.TURN_OFF, [S.SAVING, S.OFF]),
    (Operation.PAUSE, [S.RUNNING, S.PAUSED]),
    (Operation.RESUME, [S.PAUSED, S.RUNNING]),
    (Operation.DISCARD_SAVED_STATE, [S.SAVED, S.OFF]),
])
def test_each_operation_steps_through_its_row(operation: Operation,
                                              path: list[VmState]) -> None:
    for current, following in itertools.pairwise(path):
        assert next_state(operation, current) is following
        assert can_move(current, following)


def test_an_operation_without_steps_has_no_next_state() -> None:
    with pytest.raises(ValueError):
        next_state(Operation.RUN_COMMAND, S.RUNNING)
    with pytest.raises(ValueError):
        next_state(Operation.START, S.RUNNING)


@pytest.mark.parametrize(("current", "new"), [
    (S.RUNNING, S.PAUSED),  # QEMU paused the guest on an I/O error
    (S.PAUSED, S.RUNNING),
    (S.RUNNING, S.OFF),  # the worker exited
    (S.SAVING, S.OFF),
    (S.SAVED, S.OFF),  # the saved-state file is gone
    (S.OFF, S.RUNNING),  # reattached to a worker the record missed
    (S.SAVED, S.PAUSED),
    (S.STARTING, S.SAVED),  # a start from Saved failed
    (S.SAVING, S.RUNNING),  # a save failed
    (S.STOPPING, S.RUNNING),  # a shut down was interrupted
    (S.RUNNING, S.RUNNING),  # a new reason
    (S.OFF, S.SAVED),  # a standard checkpoint was applied
])
def test_moves_from_outside_and_failures_are_allowed(current: VmState, new: VmState) -> None:
    assert can_move(current, new)


@pytest.mark.parametrize(("current", "new"), [
    (S.OFF, S.SAVING), (S.OFF, S.STOPPING), (S.SAVED, S.SAVING),
    (S.SAVED, S.STOPPING), (S.PAUSED, S.STARTING),
    (S.RUNNING, S.STARTING), (S.RUNNING, S.SAVED), (S.STOPPING, S.STARTING),
])
def test_moves_the_machine_lacks_are_refused(current: VmState, new: VmState) -> None:
    assert not can_move(current, new)


def test_invalid_state_message_is_a_sentence_with_data() -> None:
    with pytest.raises(InvalidState) as info:
        require(Operation.RESUME, VmState.OFF, "web-01")
    exc = info.value
    assert exc.message == "cannot resume VM 'web-01' while it is Off: it must be Paused"
    assert exc.data["vm"] == "web-01"
    assert exc.data["state"] == "Off"
    assert exc.data["operation"] == "resume"
    assert exc.data["required"] == ["Paused"]
    assert isinstance(exc, Conflict)
    assert exc.http_status == 409
    assert exc.slug == "invalid-state"


@pytest.mark.parametrize(("operation", "state", "message"), [
    (Operation.START, S.RUNNING, "cannot start VM 'db': it is already Running"),
    (Operation.PAUSE, S.PAUSED, "cannot pause VM 'db': it is already Paused"),
    (Operation.TURN_OFF, S.OFF, "cannot turn off VM 'db': it is already Off"),
    (Operation.DELETE, S.RUNNING, "cannot delete VM 'db' while it is Running: stop it first"),
    (Operation.RUN_COMMAND, S.OFF, "cannot run a command in VM 'db' while it is Off: "
                                   "start it first"),
    (Operation.COPY_FILES, S.PAUSED, "cannot copy files to or from VM 'db' while it is "
                                     "Paused: resume it first"),
    (Operation.START, S.STOPPING, "cannot start VM 'db' while it is Stopping: it must be "
                                  "Off or Saved"),
    (Operation.DISCARD_SAVED_STATE, S.RUNNING, "cannot discard the saved state of VM 'db' "
                                               "while it is Running: it must be Saved"),
    (Operation.TAKE_SCREENSHOT, S.SAVED, "cannot take a screenshot of VM 'db' while it is "
                                         "Saved: start it first"),
])
def test_messages_read_as_sentences(operation: Operation, state: VmState, message: str) -> None:
    with pytest.raises(InvalidState) as info:
        require(operation, state, "db")
    assert info.value.message == message


def test_required_states_are_listed_in_state_order() -> None:
    with pytest.raises(InvalidState) as info:
        require(Operation.SHUT_DOWN, VmState.SAVED, "db")
    assert info.value.data["required"] == ["Starting", "Running", "Paused", "Stopping"]


def test_every_step_of_every_row_is_a_move_the_controller_may_make() -> None:
    for operation, row in TABLE.items():
        for state in row.allowed:
            if row.steps:
                assert can_move(state, next_state(operation, state)), (operation, state)
        for current, following in itertools.pairwise(row.steps):
            assert can_move(current, following)


@pytest.mark.parametrize("state", sorted(set(VmState) - {S.STARTING, S.SAVING, S.STOPPING}))
def test_a_failed_operation_may_leave_the_vm_where_it_really_is(state: VmState) -> None:
    for transitional in (S.STARTING, S.SAVING, S.STOPPING):
        assert can_move(transitional, state)
