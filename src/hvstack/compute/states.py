"""The VM state machine as data: which operation each state allows, and where it leads.

Contract:

* :data:`TABLE` has one :class:`Row` per :class:`Operation`: the states the operation is
  allowed in, and the states it moves the VM through, in order (the last is where it
  ends when it succeeds; none for operations that leave the state alone, such as a
  command in the guest). Example: ``START`` is allowed in Off and Saved and moves
  Off → Starting → Running.
* :data:`OUTSIDE` lists the moves nobody asked for: QEMU pausing a guest on its own, the
  worker process exiting, a lost saved-state file, the host service reattaching, and an
  operation that failed leaving the VM in the state it really is in.
* :func:`can_move` answers whether ``current → new`` is one of those moves; the
  controller refuses (and logs) any other, as a programming error.
* :func:`next_state` is the step an operation takes from the current state.
* :func:`require` raises :class:`~hvstack.errors.InvalidState` with a sentence every
  client shows as is: ``cannot resume VM 'db' while it is Off: it must be Paused``.
  Operation names are verb phrases that fit ``cannot {operation} VM '{name}'``.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

from hvstack.compute.model import VmState
from hvstack.errors import InvalidState


class Operation(enum.StrEnum):
    """What a user asks of a VM; the value reads in ``cannot {value} VM 'x'``."""

    START = "start"
    SHUT_DOWN = "shut down"
    TURN_OFF = "turn off"
    SAVE = "save"
    PAUSE = "pause"
    RESUME = "resume"
    RESTART = "restart"
    DISCARD_SAVED_STATE = "discard the saved state of"
    DELETE = "delete"
    RUN_COMMAND = "run a command in"
    COPY_FILES = "copy files to or from"
    FREEZE = "freeze the file systems of"
    THAW = "thaw the file systems of"
    READ_FREEZE_STATUS = "read the freeze status of"
    OPEN_GRAPHICAL_CONSOLE = "open the graphical console of"
    TAKE_SCREENSHOT = "take a screenshot of"
    CHECKPOINT = "checkpoint"
    APPLY_CHECKPOINT = "apply a checkpoint to"


@dataclass(frozen=True)
class Row:
    allowed: frozenset[VmState]
    steps: tuple[VmState, ...] = ()  # the states it moves through; the last is the end


_S = VmState
_LIVE = frozenset({_S.STARTING, _S.RUNNING, _S.PAUSED, _S.SAVING, _S.STOPPING})
TRANSITIONAL = frozenset({_S.STARTING, _S.SAVING, _S.STOPPING})
STABLE = frozenset(_S) - TRANSITIONAL
_RUNNING = frozenset({_S.RUNNING})

# Stop and turn off are allowed in the transitional states too: the request is queued on
# the VM's lock and runs once the operation in progress has ended.
TABLE: dict[Operation, Row] = {
    Operation.START: Row(frozenset({_S.OFF, _S.SAVED}), (_S.STARTING, _S.RUNNING)),
    Operation.SHUT_DOWN: Row(frozenset({_S.RUNNING, _S.PAUSED, _S.STARTING, _S.STOPPING}),
                             (_S.STOPPING, _S.OFF)),
    Operation.TURN_OFF: Row(_LIVE, (_S.OFF,)),
    Operation.SAVE: Row(frozenset({_S.RUNNING, _S.PAUSED}), (_S.SAVING, _S.SAVED)),
    Operation.PAUSE: Row(_RUNNING, (_S.PAUSED,)),
    Operation.RESUME: Row(frozenset({_S.PAUSED}), (_S.RUNNING,)),
    # Restart is a shut down and a start: its moves are theirs.
    Operation.RESTART: Row(_RUNNING),
    Operation.DISCARD_SAVED_STATE: Row(frozenset({_S.SAVED}), (_S.OFF,)),
    Operation.DELETE: Row(frozenset({_S.OFF, _S.SAVED})),
    Operation.RUN_COMMAND: Row(_RUNNING),
    Operation.COPY_FILES: Row(_RUNNING),
    Operation.FREEZE: Row(_RUNNING),
    Operation.THAW: Row(_RUNNING),
    Operation.READ_FREEZE_STATUS: Row(_RUNNING),
    Operation.OPEN_GRAPHICAL_CONSOLE: Row(frozenset({_S.RUNNING, _S.PAUSED})),
    Operation.TAKE_SCREENSHOT: Row(frozenset({_S.RUNNING, _S.PAUSED})),
    Operation.CHECKPOINT: Row(frozenset({_S.OFF, _S.SAVED, _S.RUNNING, _S.PAUSED})),
    Operation.APPLY_CHECKPOINT: Row(frozenset({_S.OFF, _S.SAVED, _S.RUNNING, _S.PAUSED})),
}

# Moves nobody asked for: (from any of these) → (to any of these).
OUTSIDE: dict[str, tuple[frozenset[VmState], frozenset[VmState]]] = {
    "QEMU paused the guest (I/O error, debugger)": (_RUNNING, frozenset({_S.PAUSED})),
    "QEMU resumed the guest": (frozenset({_S.PAUSED}), _RUNNING),
    "the worker process exited": (_LIVE, frozenset({_S.OFF})),
    "the saved-state file is gone": (frozenset({_S.SAVED}), frozenset({_S.OFF})),
    # A live worker found after a restart of the host service wins over the record.
    "the host service reattached to a live worker": (
        frozenset(_S), frozenset({_S.RUNNING, _S.PAUSED})),
    "an operation failed; the VM is where it really is": (TRANSITIONAL, STABLE),
    # Its memory state became the saved state (Hyper-V leaves such a VM Saved).
    "a standard checkpoint was applied": (frozenset({_S.OFF}), frozenset({_S.SAVED})),
}

# Where each state may go: the steps of the table, then the moves from outside.
_MOVES: frozenset[tuple[VmState, VmState]] = frozenset(
    {(a, row.steps[0]) for row in TABLE.values() if row.steps for a in row.allowed}
    | {(a, b) for row in TABLE.values() for a, b in itertools.pairwise(row.steps)}
    | {(a, b) for sources, targets in OUTSIDE.values() for a in sources for b in targets}
)

_ORDER = list(VmState)


def allowed(operation: Operation, state: VmState) -> bool:
    return state in TABLE[operation].allowed


def can_move(current: VmState, new: VmState) -> bool:
    """True if the state machine has the move ``current → new`` (staying put is a move:
    a new reason in the same state)."""
    return current is new or (current, new) in _MOVES


def next_state(operation: Operation, current: VmState) -> VmState:
    """The state ``operation`` moves to from ``current``: its first step from a state it
    is allowed in, else the step after ``current`` in its row."""
    steps = TABLE[operation].steps
    if current in steps[:-1]:
        return steps[steps.index(current) + 1]
    if steps and current in TABLE[operation].allowed:
        return steps[0]
    raise ValueError(f"{operation.value!r} has no step from {current.value}")


def require(operation: Operation, state: VmState, vm: str) -> None:
    """Raise InvalidState unless ``state`` allows ``operation``."""
    row = TABLE[operation]
    if state in row.allowed:
        return
    required = sorted(row.allowed, key=_ORDER.index)
    names = [s.value for s in required]
    if row.steps and state is row.steps[-1]:
        raise InvalidState(vm, state.value, operation.value, names, already=True)
    raise InvalidState(vm, state.value, operation.value, names,
                       advice=advice(state, row.allowed))


def advice(state: VmState, allowed_in: frozenset[VmState]) -> str | None:
    """What gets a VM in ``state`` to one of ``allowed_in``, when one step does."""
    if state in TRANSITIONAL:
        return None  # the generic "it must be ..." plus the state says enough
    if _S.OFF in allowed_in and state in (_S.RUNNING, _S.PAUSED):
        return "stop it first"
    if _S.RUNNING in allowed_in and state in (_S.OFF, _S.SAVED):
        return "start it first"
    if _S.RUNNING in allowed_in and state is _S.PAUSED:
        return "resume it first"
    return None
