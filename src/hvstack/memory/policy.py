"""Dynamic memory policy: pure functions, worked examples in the unit tests.

* :func:`desired`: what one VM would like: its demand plus its buffer, in whole
  blocks, within [minimum, maximum] (its current amount while its demand is unknown).
* :func:`balance`: the targets of one round for every VM. When the pool covers every
  VM's desire each gets it; when it does not, memory is taken first from the VMs with
  the lowest weight and the largest surplus over demand, never below a VM's minimum,
  and given back by weight when it frees up. Static VMs keep what they have.
* :func:`status`: OK, Low or Warning from assigned, demand and buffer.
* :func:`admit`: whether a VM that starts with ``startup`` bytes fits the pool.
"""

from __future__ import annotations

from collections.abc import Sequence

from hvstack.memory.model import BLOCK_BYTES, HostPool, MemoryStatus, VmMemory


def _blocks_up(size: int) -> int:
    return -(-size // BLOCK_BYTES) * BLOCK_BYTES


def desired(vm: VmMemory) -> int:
    """Demand plus buffer, rounded up to whole blocks, within [minimum, maximum]."""
    if vm.static:
        return vm.assigned
    if vm.demand is None:
        return max(vm.minimum, min(vm.maximum, vm.assigned))
    want = _blocks_up(vm.demand + vm.demand * vm.buffer_percent // 100)
    return max(vm.minimum, min(vm.maximum, want))


def balance(vms: Sequence[VmMemory], pool: HostPool) -> dict[str, int]:
    """The target of every VM (by id) for this round."""
    # Placeholder until the weighted policy lands: desires if they fit, else each
    # dynamic VM's surplus over its minimum scaled down evenly.
    want = {vm.vm_id: desired(vm) for vm in vms}
    if sum(want.values()) <= pool.capacity:
        return want
    fixed = sum(vm.assigned if vm.static or vm.stuck else vm.minimum for vm in vms)
    extra = sum(want[vm.vm_id] - vm.minimum for vm in vms if not (vm.static or vm.stuck))
    room = max(0, pool.capacity - fixed)
    out: dict[str, int] = {}
    for vm in vms:
        if vm.static or vm.stuck:
            out[vm.vm_id] = vm.assigned
        else:
            share = (want[vm.vm_id] - vm.minimum) * room // extra if extra else 0
            out[vm.vm_id] = vm.minimum + share // BLOCK_BYTES * BLOCK_BYTES
    return out


def status(assigned: int, demand: int | None, buffer_percent: int) -> MemoryStatus:
    if demand is None or assigned >= demand + demand * buffer_percent // 100:
        return MemoryStatus.OK
    return MemoryStatus.LOW if assigned >= demand else MemoryStatus.WARNING


def admit(startup: int, vms: Sequence[VmMemory], pool: HostPool) -> bool:
    """Whether a VM starting with ``startup`` bytes fits: what running VMs hold beyond
    their minimum and demand can be taken back for it; their minimums cannot."""
    held = sum(vm.assigned if vm.static or vm.stuck
               else max(vm.minimum, min(vm.assigned, vm.demand or vm.assigned))
               for vm in vms)
    return startup + held <= pool.capacity
