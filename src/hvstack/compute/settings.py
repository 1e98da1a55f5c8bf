"""Which settings of a VM may change in which state, as pure functions.

Names, notes, the automatic actions, the integration services, the KVP pool and the
checkpoint settings change in any state; the hardware (processors, memory, generation,
disks, DVD, boot order, processor compatibility, ...) only while the VM is Off.
:func:`check_change` raises :class:`~hvstack.errors.InvalidState` naming the settings,
e.g. ``cannot change the
memory of VM 'demo' while it is Running: stop it first``.

Dynamic memory follows Hyper-V: turning it on or off and the startup memory only while
Off; the memory buffer and weight in any state; the minimum and maximum in any state,
but unless the VM is Off the minimum may only go down and the maximum only up
(:func:`check_memory_change`).
"""

from __future__ import annotations

from collections.abc import Iterable

from hvstack.compute.model import VmConfig, VmState
from hvstack.errors import InvalidState

# The minimum and maximum memory only in one direction while not Off: check_memory_change.
MEMORY_ANY_STATE = frozenset({"memory_buffer_percent", "memory_weight",
                              "memory_minimum_bytes", "memory_maximum_bytes"})
ANY_STATE = frozenset({"name", "notes", "auto_start", "auto_start_delay_seconds",
                       "auto_stop", "integration_services", "kvp_pool", "checkpoint_type",
                       "automatic_checkpoints", "checkpoint_limit"}) | MEMORY_ANY_STATE
# Processor resource controls apply live to a running VM's cgroup.
ANY_STATE |= {"processor_reserve_percent", "processor_limit_percent", "processor_weight"}
ALL = frozenset(VmConfig.__dataclass_fields__)

# How a message names each setting ("cannot change the ... of VM 'x'").
LABELS = {
    "cpus": "processor count",
    "memory_bytes": "memory",
    "dynamic_memory": "dynamic memory setting",
    "memory_minimum_bytes": "minimum memory",
    "memory_maximum_bytes": "maximum memory",
    "generation": "generation",
    "disks": "disks",
    "dvd": "DVD drive",
    "network_adapters": "network adapters",
    "boot_order": "boot order",
    "os_type": "OS type",
    "accelerator": "accelerator",
    "image": "image",
    "extra": "extra settings",
    "processor_compatibility": "processor compatibility",
}


def changeable_while(state: VmState) -> frozenset[str]:
    """The settings (VmConfig field names) that may change while the VM is ``state``."""
    return ALL if state is VmState.OFF else ANY_STATE


def label(names: Iterable[str]) -> str:
    """'memory', 'memory and processor count', 'a, b and c' (in the order given)."""
    words = [LABELS.get(n, n.replace("_", " ")) for n in names]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def check_change(changes: Iterable[str], state: VmState, vm: str) -> None:
    """Raise InvalidState unless every setting in ``changes`` may change in ``state``."""
    refused = [name for name in changes if name not in changeable_while(state)]
    if refused:
        advice = _ADVICE.get(state)
        if "dynamic_memory" in refused and advice:
            advice += ("; as in Hyper-V, dynamic memory is turned on or off and the "
                       "startup memory changed only while the VM is Off")
        raise InvalidState(vm, state.value, f"change the {label(refused)} of",
                           [VmState.OFF.value], advice=advice)


def check_memory_change(old: VmConfig, new: VmConfig, state: VmState, vm: str) -> None:
    """Unless the VM is Off, its minimum memory may only go down and its maximum only
    up (Hyper-V's rule: the memory it may have now stays within the new bounds)."""
    if state is VmState.OFF:
        return
    checks = (("raise the minimum memory of", old.memory_minimum_bytes,
               new.memory_minimum_bytes, 1),
              ("lower the maximum memory of", old.memory_maximum_bytes,
               new.memory_maximum_bytes, -1))
    for operation, before, after, sign in checks:
        if before is not None and after is not None and (after - before) * sign > 0:
            raise InvalidState(vm, state.value, operation, [VmState.OFF.value],
                               advice="while it runs the minimum may only be lowered and "
                                      "the maximum only raised; stop it first")


_ADVICE = {
    VmState.RUNNING: "stop it first",
    VmState.PAUSED: "stop it first",
    VmState.SAVED: "start it and shut it down first, or discard its saved state",
}
