"""Dynamic memory policy: pure functions; worked examples in the unit tests and in
docs/dynamic-memory.md ("Policy").

* :func:`desired`: what one VM would like: its demand plus its buffer, rounded up to
  its grid (below), within [minimum, maximum] (while its demand is unknown: what it
  has, and at least its startup memory).
* :func:`needed`: its demand alone, the same way (its startup memory while its demand
  is unknown).
* :func:`plan`: one balancing round: a target for every VM, the VMs short of their
  demand, whether the pool ran short (a :class:`~hvstack.memory.model.Plan`).
* :func:`balance`: the targets alone (``plan(...).targets`` as a dict).
* :func:`status`: OK, Low or Warning from assigned, demand and buffer.
* :func:`admit`: whether a VM that starts with ``startup`` bytes fits the pool.
* :func:`threshold`: the hysteresis: how far a target must be from what a VM has for
  the round to move it.

Every dynamic VM's target lies in [minimum, maximum] on the VM's *grid*: its startup
memory plus or minus whole blocks. virtio-mem plugs whole blocks above the startup
memory and the balloon takes any number of pages below it, so the grid serves both; with
the sizes in whole 2 MiB (as Hyper-V asks), it is simply whole blocks. The startup lies
within [minimum, maximum], so the range always holds a point of the grid.

How a round decides:

1. Static and stuck VMs keep what they have; the *room* is the pool's capacity less
   what they hold. Each other VM has three levels: its minimum, its need and its desire.
2. If the room covers every desire, each VM's *ideal* is its desire. If not (a
   shortage), every VM first gets its minimum, then the rest of the room is shared in
   two tiers: first up to each VM's need, then up to its desire (the buffer). Within a
   tier higher weights are served first; equal weights share in proportion to what
   they ask (the odd blocks go to the largest remainders, then by id). So memory is taken
   first from the buffers, from the lowest weight and the largest surplus first, then
   from the demand of the lowest weights. If the minimums alone do not fit, every VM's
   ideal is its minimum (``overcommitted``): the policy never goes below a minimum.
3. From ideal to target, against oscillation: *hysteresis*: a VM whose ideal is closer
   than :func:`threshold` to what it has stays where it is (on its grid), except
   that a VM below its need always grows; *gentle reclaim*: a VM above its ideal gives
   back half the difference (at least a block) per round. Both hold only while the
   targets fit the room; when they do not (a growing VM needs what the gentle path holds
   back, or the pool shrank), shrinking VMs go to their ideal at once: first without the
   gentle step, then without the hysteresis too.

The targets of the dynamic and stuck VMs together never exceed the room unless their
minimums (and what the stuck VMs hold) alone do. The actuator applies the shrinking
targets before the growing ones, and counts a VM within a block of its target as there.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from hvstack.memory.model import BLOCK_BYTES, HostPool, MemoryStatus, Plan, VmMemory

HYSTERESIS_PERCENT = 3  # of what a VM has: smaller moves are not worth a round


def _blocks_up(size: int) -> int:
    return -(-size // BLOCK_BYTES) * BLOCK_BYTES


def _blocks_down(size: int) -> int:
    return size // BLOCK_BYTES * BLOCK_BYTES


def _nearest_block(size: int) -> int:
    return (size + BLOCK_BYTES // 2) // BLOCK_BYTES * BLOCK_BYTES


class _Levels(NamedTuple):
    """One dynamic VM's levels, on its grid within [minimum, maximum]."""

    vm: VmMemory
    low: int  # its minimum, rounded up to the grid
    need: int
    want: int
    now: int  # what it has, to the nearest point of the grid


def _levels(vm: VmMemory) -> _Levels:
    base = vm.startup  # the grid's origin (floor division rounds negatives right too)
    low = base + _blocks_up(vm.minimum - base)
    high = max(low, base + _blocks_down(vm.maximum - base))  # not empty: startup's there
    now = max(low, min(high, base + _nearest_block(vm.assigned - base)))
    if vm.demand is None:
        # Anchored on the startup memory, not on what it has: a share cut from what it
        # has would shrink what it "needs" next round, round after round.
        startup = max(low, min(high, base))
        return _Levels(vm, low, startup, max(now, startup), now)
    need = max(low, min(high, base + _blocks_up(vm.demand - base)))
    want = base + _blocks_up(vm.demand + vm.demand * vm.buffer_percent // 100 - base)
    return _Levels(vm, low, need, max(low, min(high, want)), now)


def threshold(assigned: int) -> int:
    """The smallest move worth making for a VM that has ``assigned``: one block, or 3 %
    of what it has (in whole blocks) if that is more. 1 GiB: 30 MiB; 256 MiB: 6 MiB."""
    return max(BLOCK_BYTES, _blocks_down(assigned * HYSTERESIS_PERCENT // 100))


def desired(vm: VmMemory) -> int:
    """Demand plus buffer, rounded up to the VM's grid, within [minimum, maximum]; while
    the demand is unknown, what it has (to the nearest point of the grid) but at least
    its startup memory."""
    return vm.assigned if vm.static else _levels(vm).want


def needed(vm: VmMemory) -> int:
    """Demand rounded up to the VM's grid, within [minimum, maximum]; the startup memory
    while the demand is unknown."""
    return vm.assigned if vm.static else _levels(vm).need


def _share(asks: Iterable[tuple[str, int, int]], room: int, grants: dict[str, int]) -> int:
    """Adds to ``grants`` (blocks by VM id) out of ``room`` blocks for asks of (id,
    weight, blocks): higher weight first, equal weights in proportion to their asks.
    Returns the blocks left."""
    groups: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for vm_id, weight, ask in asks:
        if ask > 0:
            groups[weight].append((vm_id, ask))
    for weight in sorted(groups, reverse=True):
        group = groups[weight]
        total = sum(ask for _, ask in group)
        if total <= room:
            for vm_id, ask in group:
                grants[vm_id] += ask
            room -= total
            continue
        # Largest remainders: the parts add up to the room exactly, and none exceeds
        # its ask (each part is below its ask, so part + 1 is at most the ask).
        given = 0
        remainders: list[tuple[int, str]] = []
        for vm_id, ask in group:
            part, rest = divmod(ask * room, total)
            grants[vm_id] += part
            given += part
            remainders.append((-rest, vm_id))
        remainders.sort()
        for _, vm_id in remainders[:room - given]:
            grants[vm_id] += 1
        return 0
    return room


def _ideal(levels: Sequence[_Levels], room: int) -> tuple[dict[str, int], bool, bool]:
    """The ideal of every VM by id, whether there is a shortage, and whether even the
    minimums do not fit."""
    if sum(level.want for level in levels) <= room:
        return {level.vm.vm_id: level.want for level in levels}, False, False
    left = (room - sum(level.low for level in levels)) // BLOCK_BYTES  # asks are blocks
    if left < 0:
        return {level.vm.vm_id: level.low for level in levels}, True, True
    grants = {level.vm.vm_id: 0 for level in levels}
    left = _share(((lv.vm.vm_id, lv.vm.weight, (lv.need - lv.low) // BLOCK_BYTES)
                   for lv in levels), left, grants)
    _share(((lv.vm.vm_id, lv.vm.weight, (lv.want - lv.need) // BLOCK_BYTES)
            for lv in levels), left, grants)
    return ({lv.vm.vm_id: lv.low + grants[lv.vm.vm_id] * BLOCK_BYTES for lv in levels},
            True, False)


def _settle(levels: Sequence[_Levels], ideal: dict[str, int], room: int) -> dict[str, int]:
    """The targets from the ideals: hysteresis and gentle reclaim while they fit."""
    gentle: dict[str, int] = {}
    held: dict[str, int] = {}
    firm: dict[str, int] = {}
    for lv in levels:
        vm_id, assigned = lv.vm.vm_id, lv.vm.assigned
        target = ideal[vm_id]
        holds = (abs(target - assigned) < threshold(assigned)
                 and not (target > assigned and lv.now < lv.need))
        held[vm_id] = lv.now if holds else target
        firm[vm_id] = min(held[vm_id], target)  # holding a growing VM back costs nothing
        if not holds and target < lv.now:
            gentle[vm_id] = max(target, lv.now - _blocks_up((lv.now - target) // 2))
        else:
            gentle[vm_id] = held[vm_id]
    for targets in (gentle, held):
        if sum(targets.values()) <= room:
            return targets
    return firm


def plan(vms: Sequence[VmMemory], pool: HostPool) -> Plan:
    """One balancing round over the running VMs (see the module's docstring)."""
    fixed = [vm for vm in vms if vm.static or vm.stuck]
    room = pool.capacity - sum(vm.assigned for vm in fixed)
    levels = [_levels(vm) for vm in vms if not (vm.static or vm.stuck)]
    ideal, shortage, overcommitted = _ideal(levels, room)
    targets = {vm.vm_id: vm.assigned for vm in fixed}
    targets.update(_settle(levels, ideal, room))
    short = frozenset(lv.vm.vm_id for lv in levels
                      if lv.vm.demand is not None and targets[lv.vm.vm_id] < lv.need)
    return Plan(targets=targets, short=short, shortage=shortage,
                overcommitted=overcommitted)


def balance(vms: Sequence[VmMemory], pool: HostPool) -> dict[str, int]:
    """The target of every VM (by id) for this round: :func:`plan`'s targets."""
    return dict(plan(vms, pool).targets)


def status(assigned: int, demand: int | None, buffer_percent: int) -> MemoryStatus:
    """OK when ``assigned`` covers demand plus buffer (less than :func:`threshold`
    short counts: the balancer leaves such a VM where it is, so it is not Low); Low
    when it covers the demand only; Warning when not even that. Unknown demand: OK."""
    if demand is None:
        return MemoryStatus.OK
    if assigned + threshold(assigned) > demand + demand * buffer_percent // 100:
        return MemoryStatus.OK
    return MemoryStatus.LOW if assigned >= demand else MemoryStatus.WARNING


def admit(startup: int, vms: Sequence[VmMemory], pool: HostPool) -> bool:
    """Whether a VM starting with ``startup`` bytes fits beside the running ``vms``
    (not counting it): what they hold beyond their need (:func:`needed`) can be taken
    back for it, their minimums and needs cannot; static and stuck VMs keep all they
    have."""
    held = sum(vm.assigned if vm.static or vm.stuck
               else max(_levels(vm).low, min(vm.assigned, needed(vm)))
               for vm in vms)
    return startup + held <= pool.capacity
