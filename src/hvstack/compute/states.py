"""The VM state machine as pure data: which operation each state allows.

:func:`require` raises :class:`~hvstack.errors.InvalidState` naming the state and what
the operation requires, so every client gets the same message.
"""

from __future__ import annotations

import enum

from hvstack.compute.model import VmState
from hvstack.errors import InvalidState


class Operation(enum.StrEnum):
    START = "start"
    STOP = "stop"
    TURN_OFF = "turn off"
    SHUT_DOWN = "shut down"
    PAUSE = "pause"
    RESUME = "resume"
    SAVE = "save"
    RESTART = "restart"
    RENAME = "rename"
    CHANGE_OFFLINE_SETTINGS = "change this setting of"
    DELETE = "delete"
    DELETE_SAVED_STATE = "delete the saved state of"
    ATTACH_DISK = "attach a disk to"


_S = VmState
ALLOWED: dict[Operation, frozenset[VmState]] = {
    Operation.START: frozenset({_S.OFF, _S.SAVED}),
    Operation.STOP: frozenset({_S.RUNNING, _S.PAUSED, _S.STARTING, _S.STOPPING}),
    Operation.TURN_OFF: frozenset({_S.RUNNING, _S.PAUSED, _S.STARTING, _S.STOPPING, _S.SAVING}),
    Operation.SHUT_DOWN: frozenset({_S.RUNNING}),
    Operation.PAUSE: frozenset({_S.RUNNING}),
    Operation.RESUME: frozenset({_S.PAUSED}),
    Operation.SAVE: frozenset({_S.RUNNING, _S.PAUSED}),
    Operation.RESTART: frozenset({_S.RUNNING}),
    Operation.RENAME: frozenset(_S),
    Operation.CHANGE_OFFLINE_SETTINGS: frozenset({_S.OFF}),
    Operation.DELETE: frozenset({_S.OFF, _S.SAVED}),
    Operation.DELETE_SAVED_STATE: frozenset({_S.SAVED}),
    Operation.ATTACH_DISK: frozenset({_S.OFF}),
}

# The order states are named in when an error lists what an operation requires.
_ORDER = list(VmState)


def allowed(operation: Operation, state: VmState) -> bool:
    return state in ALLOWED[operation]


def require(operation: Operation, state: VmState, vm: str) -> None:
    """Raise InvalidState unless ``state`` allows ``operation``."""
    if state not in ALLOWED[operation]:
        required = sorted(ALLOWED[operation], key=_ORDER.index)
        raise InvalidState(vm, state.value, operation.value, [s.value for s in required])
