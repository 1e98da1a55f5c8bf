"""The dynamic memory policy by worked examples (sizes in MiB; a block is 2 MiB), then
its invariants over random rounds. No I/O: just the decisions."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from hvstack.memory.model import BLOCK_BYTES, MIB, HostPool, MemoryStatus, Plan, VmMemory
from hvstack.memory.policy import (
    admit,
    balance,
    desired,
    needed,
    plan,
    status,
    threshold,
)


def vm(vm_id: str, *, demand: float | None, assigned: int = 512, minimum: int = 512,
       startup: int | None = None, maximum: int = 4096, buffer: int = 20,
       weight: int = 5000, static: bool = False, stuck: bool = False) -> VmMemory:
    return VmMemory(vm_id=vm_id, startup=(startup or minimum) * MIB, minimum=minimum * MIB,
                    maximum=maximum * MIB, buffer_percent=buffer, weight=weight,
                    assigned=assigned * MIB,
                    demand=None if demand is None else int(demand * MIB),
                    static=static, stuck=stuck)


def pool(capacity: int) -> HostPool:
    return HostPool(total=capacity * MIB + 1024 * MIB, reserve=1024 * MIB)


def in_mib(targets: dict[str, int] | Plan) -> dict[str, float]:
    found = targets.targets if isinstance(targets, Plan) else targets
    return {vm_id: size / MIB for vm_id, size in found.items()}


# -- one VM's levels ---------------------------------------------------------------------

@pytest.mark.parametrize(("machine", "expected"), [
    (vm("a", demand=1000), 1200),               # demand plus 20 %
    (vm("a", demand=999), 1200),                # 1198.8 rounded up to a whole block
    (vm("a", demand=1000, buffer=5), 1050),
    (vm("a", demand=1000, maximum=1024), 1024),  # never above the maximum
    (vm("a", demand=100, minimum=512), 512),     # never below the minimum
    (vm("a", demand=None, assigned=700), 700),   # unknown demand: what it has
    (vm("a", demand=None, assigned=701), 702),   # ... to the nearest block
    (vm("a", demand=None, assigned=8000), 4096),  # ... within [minimum, maximum]
    (vm("a", demand=None, assigned=600, startup=768), 768),  # ... and at least startup
    (vm("a", demand=10, assigned=777, static=True), 777),  # static: what it has
])
def test_desired(machine: VmMemory, expected: int) -> None:
    assert desired(machine) == expected * MIB


def test_targets_move_in_whole_blocks_from_the_startup_memory() -> None:
    # virtio-mem plugs whole blocks above the startup memory: with a startup of 257 MiB
    # the VM can have 257, 259, 261 ... (and the balloon any page below 257).
    odd = vm("a", demand=300, minimum=129, startup=257, maximum=1025)
    assert desired(odd) == 361 * MIB  # 360 rounded up to 257 + 52 blocks
    assert needed(odd) == 301 * MIB
    assert desired(replace(odd, demand=10 * MIB)) == 129 * MIB
    assert desired(replace(odd, demand=None, assigned=300 * MIB)) == 301 * MIB  # nearest
    # A range of one odd size still holds a target.
    single = vm("b", demand=100, minimum=33, startup=33, maximum=33)
    assert balance([single], pool(4096)) == {"b": 33 * MIB}


def test_needed_is_the_demand_in_blocks_within_the_bounds() -> None:
    assert needed(vm("a", demand=999)) == 1000 * MIB
    assert needed(vm("a", demand=100)) == 512 * MIB
    assert needed(vm("a", demand=None, assigned=600, startup=768)) == 768 * MIB
    assert needed(vm("a", demand=None, assigned=800, startup=768)) == 768 * MIB


@pytest.mark.parametrize(("assigned", "expected"), [
    (0, 2), (64, 2), (256, 6), (1000, 30), (1024, 30), (4096, 122),
])
def test_threshold_is_a_block_or_three_percent(assigned: int, expected: int) -> None:
    assert threshold(assigned * MIB) == expected * MIB


# -- sharing the pool ---------------------------------------------------------------------

def test_a_pool_that_covers_every_desire_gives_each_its_desire() -> None:
    result = plan([vm("a", demand=1000), vm("b", demand=500, weight=0)], pool(4096))
    assert in_mib(result) == {"a": 1200, "b": 600}
    assert (result.shortage, result.short, result.overcommitted) == (False, frozenset(), False)


def test_under_a_limit_the_higher_weight_is_served_first() -> None:
    # 2048 MiB for two VMs that each want 1000 + 20 %. Minimums first (2 x 512), then
    # the demand tier: a (weight 10000) gets its 488, b (weight 1000) its 488; 48 MiB
    # are left for the buffer tier, and they go to a.
    vms = [vm("a", demand=1000, weight=10000), vm("b", demand=1000, weight=1000)]
    result = plan(vms, pool(2048))
    assert in_mib(result) == {"a": 1048, "b": 1000}
    assert result.shortage and result.short == frozenset()
    # 1536 MiB: a gets its demand, b the 24 MiB that are left above its minimum, and is
    # short of its demand (the balancer tells: "could not get what it needs").
    result = plan(vms, pool(1536))
    assert in_mib(result) == {"a": 1000, "b": 536}
    assert result.short == {"b"}
    # Memory frees up (3072 MiB): both get their desire back, weight no longer matters.
    settled = [replace(v, assigned=result.targets[v.vm_id]) for v in vms]
    assert in_mib(balance(settled, pool(3072))) == {"a": 1200, "b": 1200}


def test_the_lowest_weight_loses_its_buffer_before_anyone_loses_demand() -> None:
    # a (weight 9000) and b (weight 1000) want 1200 each (demand 1000); c (weight 100,
    # minimum 256) wants 600 (demand 500). 3000 MiB: every desire fits. 2900: the
    # demand tier (2500) fits, then the buffers by weight: a 200, b 200, c nothing.
    # 2700: a 200, b nothing.
    vms = [vm("a", demand=1000, weight=9000), vm("b", demand=1000, weight=1000),
           vm("c", demand=500, weight=100, minimum=256, assigned=256)]
    assert in_mib(balance(vms, pool(3000))) == {"a": 1200, "b": 1200, "c": 600}
    assert in_mib(balance(vms, pool(2900))) == {"a": 1200, "b": 1200, "c": 500}
    assert in_mib(balance(vms, pool(2700))) == {"a": 1200, "b": 1000, "c": 500}


def test_equal_weights_share_in_proportion_to_what_they_ask() -> None:
    # Minimums 2 x 512 = 1024, 300 MiB left; a asks 400 of demand above its minimum,
    # b asks 200: they get 200 and 100.
    vms = [vm("a", demand=912), vm("b", demand=712)]
    result = plan(vms, pool(1324))
    assert in_mib(result) == {"a": 712, "b": 612}
    assert result.short == {"a", "b"}
    # An odd block goes to the largest remainder: 301 MiB left is 150.5 blocks = 150
    # blocks: a 100, b 50. 302 MiB: 151 blocks, a's share 100.67, b's 50.33: a gets it.
    assert in_mib(balance(vms, pool(1326))) == {"a": 714, "b": 612}


def test_the_largest_surplus_over_demand_gives_most() -> None:
    # Equal weights, the buffer tier cut to half: a's buffer (400) loses twice b's (200).
    vms = [vm("a", demand=2000, maximum=8192), vm("b", demand=1000)]
    assert in_mib(balance(vms, pool(3300))) == {"a": 2200, "b": 1100}


def test_a_static_vm_keeps_what_it_has_and_its_memory_is_not_shared() -> None:
    vms = [vm("s", demand=100, assigned=1023, static=True), vm("a", demand=1000)]
    result = plan(vms, pool(2047))
    # room for a: 2047 - 1023 = 1024: its demand and 24 of its buffer.
    assert in_mib(result) == {"s": 1023, "a": 1024}
    assert result.short == frozenset()


def test_a_stuck_vm_keeps_what_it_has_and_the_others_make_do() -> None:
    # s refused to give memory back: it keeps its 1500 although its demand is 300;
    # b gets what is left, 548, short of its demand.
    vms = [vm("s", demand=300, assigned=1500, stuck=True), vm("b", demand=1000)]
    result = plan(vms, pool(2048))
    assert in_mib(result) == {"s": 1500, "b": 548}
    assert result.short == {"b"}


def test_unknown_demand_keeps_what_it_has_and_needs_its_startup() -> None:
    # u has no statistics yet: it keeps its 800 while the pool covers every desire.
    vms = [vm("u", demand=None, assigned=800, startup=768),
           vm("b", demand=1000, weight=1)]
    assert in_mib(balance(vms, pool(4096))) == {"u": 800, "b": 1200}
    # Short: u's startup (768) counts as its need, in the demand tier at its weight; the
    # 32 it has above that are buffer. Minimums 1024 of 1700, 676 left: u's 256 first,
    # then b's demand gets 420 of its 488: b is short, u is not reported (its demand is
    # unknown).
    result = plan(vms, pool(1700))
    assert in_mib(result) == {"u": 768, "b": 932}
    assert result.short == {"b"}
    # Shorter still: u loses too, but never below its minimum.
    result = plan(vms, pool(1200))
    assert in_mib(result) == {"u": 688, "b": 512}
    assert result.short == {"b"}


def test_a_vm_without_statistics_is_not_squeezed_round_after_round() -> None:
    # u just started (768, no demand yet) beside b, whose demand grows past the pool.
    # Its share is the same every round: what it needs does not follow what it has.
    vms = [vm("u", demand=None, assigned=768, startup=768),
           vm("b", demand=2000, assigned=1000)]
    seen = []
    for _ in range(4):
        targets = balance(vms, pool(2048))
        seen.append(in_mib(targets))
        vms = [replace(v, assigned=targets[v.vm_id]) for v in vms]
    # Minimums 1024, 1024 left for asks of 256 and 1488 (equal weights): 150 and 874.
    assert seen == [{"u": 662, "b": 1386}] * 4


def test_minimums_that_do_not_fit_stay_at_the_minimums() -> None:
    vms = [vm("a", demand=1000, assigned=1000, minimum=512),
           vm("b", demand=100, assigned=768, minimum=768)]
    result = plan(vms, pool(1000))
    assert in_mib(result) == {"a": 512, "b": 768}
    assert result.overcommitted and result.shortage
    assert result.short == {"a"}  # b's demand is below its minimum: it has what it needs


def test_the_host_reserve_is_never_touched() -> None:
    host = HostPool(total=4096 * MIB, reserve=1024 * MIB)
    result = balance([vm("a", demand=2000), vm("b", demand=2000)], host)
    assert sum(result.values()) <= 3072 * MIB
    assert HostPool(total=4096 * MIB, reserve=1024 * MIB, limit=2048 * MIB).capacity \
        == 2048 * MIB


# -- against oscillation -----------------------------------------------------------------

def test_small_differences_do_not_move_a_vm() -> None:
    # 1024 MiB assigned: the threshold is 30 MiB. Desire 1008 (demand 840): stays.
    assert in_mib(balance([vm("a", demand=840, assigned=1024)], pool(4096))) == {"a": 1024}
    # Desire 1020 (demand 850) from 1000: stays too; it has more than its demand.
    assert in_mib(balance([vm("a", demand=850, assigned=1000)], pool(4096))) == {"a": 1000}
    # Desire 960 (demand 800): 64 MiB is worth a move (gently: half of it).
    assert in_mib(balance([vm("a", demand=800, assigned=1024)], pool(4096))) == {"a": 992}


def test_a_vm_below_its_demand_always_grows() -> None:
    # Short: the pool gives a exactly its need, 1012, 12 MiB above what it has (less
    # than the threshold): it grows all the same, or the guest would page.
    result = plan([vm("a", demand=1011, assigned=1000)], pool(1012))
    assert in_mib(result) == {"a": 1012}


def test_reclaim_without_shortage_is_gradual() -> None:
    # Demand falls from ~2000 to 400 (desire 480): half the surplus per round, until
    # the rest is within the threshold (14 MiB at 492).
    machine = vm("a", demand=400, assigned=2048, minimum=256)
    seen = []
    for _ in range(10):
        target = balance([machine], pool(8192))["a"]
        seen.append(target // MIB)
        machine = replace(machine, assigned=target)
    assert seen == [1264, 872, 676, 578, 528, 504, 492, 492, 492, 492]


def test_under_pressure_reclaim_is_immediate() -> None:
    # No shortage (desires 480 + 1440 <= 2560), but b's growth needs what gentle reclaim
    # would leave with a (1264 + 1440 > 2560): a goes to its desire at once.
    vms = [vm("a", demand=400, assigned=2048, minimum=256),
           vm("b", demand=1200, assigned=512)]
    assert in_mib(balance(vms, pool(2560))) == {"a": 480, "b": 1440}
    # With room for both paths, a shrinks gently.
    assert in_mib(balance(vms, pool(2704))) == {"a": 1264, "b": 1440}


def test_a_pool_that_shrinks_reclaims_at_once() -> None:
    # Both have their desire, 1200; the pool shrinks to 2200: b (weight 1) loses its
    # buffer, 200 MiB, in one round (half of it would not fit).
    vms = [vm("a", demand=1000, assigned=1200),
           vm("b", demand=1000, assigned=1200, weight=1)]
    assert in_mib(balance(vms, pool(2200))) == {"a": 1200, "b": 1000}


# -- status and admission ----------------------------------------------------------------

@pytest.mark.parametrize(("assigned", "demand", "expected"), [
    (1200, 1000, MemoryStatus.OK),
    (1180, 1000, MemoryStatus.OK),       # 20 short of the buffer, within the threshold
    (1100, 1000, MemoryStatus.LOW),      # covers the demand, not the buffer
    (1000, 1000, MemoryStatus.LOW),
    (900, 1000, MemoryStatus.WARNING),   # not even the demand
    (512, None, MemoryStatus.OK),        # no statistics yet
    (512, 0, MemoryStatus.OK),
])
def test_status(assigned: int, demand: int | None, expected: MemoryStatus) -> None:
    assert status(assigned * MIB, None if demand is None else demand * MIB, 20) == expected


def test_admission_counts_what_can_be_taken_back() -> None:
    # a holds 1536 but needs 700: 836 can be taken back; 2048 - 700 = 1348 is free.
    running = [vm("a", demand=700, assigned=1536)]
    assert admit(1348 * MIB, running, pool(2048))
    assert not admit(1350 * MIB, running, pool(2048))
    # Never below a minimum: demand 100, minimum 512.
    running = [vm("a", demand=100, assigned=1536)]
    assert admit(1536 * MIB, running, pool(2048))
    assert not admit(1538 * MIB, running, pool(2048))
    # A demand of 0 is known, not unknown: the VM can go down to its minimum.
    assert admit(1536 * MIB, [vm("a", demand=0, assigned=1536)], pool(2048))


def test_admission_keeps_static_and_stuck_whole_and_unknown_demand_at_startup() -> None:
    running = [vm("s", demand=10, assigned=600, static=True),
               vm("t", demand=10, assigned=600, stuck=True),
               vm("u", demand=None, assigned=700, startup=600)]
    assert admit(248 * MIB, running, pool(2048))
    assert not admit(250 * MIB, running, pool(2048))


# -- invariants over random rounds -------------------------------------------------------

def random_vms(rng: random.Random, count: int, *, fresh: bool = False) -> list[VmMemory]:
    vms = []
    for index in range(count):
        minimum = rng.choice([32, 64, 256, 512, 1024]) + rng.choice([0, 0, 0, 1])
        maximum = minimum * rng.choice([1, 2, 4, 16]) + rng.choice([0, 0, 0, 1])
        startup = rng.randrange(minimum, maximum + 1)  # sometimes odd MiB
        kind = rng.random()
        demand = None if rng.random() < 0.1 else rng.randrange(0, maximum * 2 * MIB)
        assigned = 0 if fresh else rng.randrange(minimum, maximum + 1) * MIB
        vms.append(VmMemory(
            vm_id=f"vm-{index}", startup=startup * MIB, minimum=minimum * MIB,
            maximum=maximum * MIB, buffer_percent=rng.choice([5, 20, 50, 2000]),
            weight=rng.choice([0, 1, 100, 5000, 5000, 10000]),
            assigned=rng.randrange(0, 4096 * MIB) if kind < 0.15 and not fresh
            else assigned, demand=demand,
            static=kind < 0.1 and not fresh, stuck=0.1 <= kind < 0.15 and not fresh))
    return vms


def lowest(v: VmMemory) -> int:
    """The least a dynamic VM may have: its minimum, rounded up to its grid."""
    return v.startup - (v.startup - v.minimum) // BLOCK_BYTES * BLOCK_BYTES


def check_invariants(vms: list[VmMemory], host: HostPool, result: Plan) -> None:
    assert set(result.targets) == {v.vm_id for v in vms}
    static = sum(v.assigned for v in vms if v.static)
    stuck = sum(v.assigned for v in vms if v.stuck)
    dynamic = [v for v in vms if not (v.static or v.stuck)]
    for v in vms:
        target = result.targets[v.vm_id]
        if v.static or v.stuck:
            assert target == v.assigned
            continue
        assert (target - v.startup) % BLOCK_BYTES == 0  # on its grid
        assert v.minimum <= target <= v.maximum
        if result.overcommitted:
            assert target == lowest(v)
        assert (v.vm_id in result.short) == (v.demand is not None and target < needed(v))
        if not result.shortage:  # between what it has and its desire
            now = min(max(v.assigned, v.minimum), v.maximum)
            assert min(now, desired(v)) - BLOCK_BYTES < target
            assert target < max(now, desired(v)) + BLOCK_BYTES
    room = host.capacity - static
    minimums = sum(lowest(v) for v in dynamic) + stuck
    if minimums <= room:
        assert sum(result.targets[v.vm_id] for v in vms if not v.static) <= room
        assert not result.overcommitted
    else:
        assert result.overcommitted


@pytest.mark.parametrize("seed", range(40))
def test_invariants_hold_over_random_rounds(seed: int) -> None:
    rng = random.Random(seed)
    vms = random_vms(rng, rng.randrange(1, 40))
    wants = sum(desired(v) for v in vms)
    for capacity in (wants * 2, wants, wants * 3 // 4, wants // 3, wants // 10, 0):
        host = HostPool(total=capacity + 512 * MIB, reserve=512 * MIB)
        check_invariants(vms, host, plan(vms, host))


@pytest.mark.parametrize("seed", range(40))
def test_from_scratch_the_targets_follow_the_weights(seed: int) -> None:
    # Nothing assigned yet, so no hysteresis and no gentle step: the targets are the
    # ideals, and the tiers and weights show plainly.
    rng = random.Random(1000 + seed)
    vms = random_vms(rng, rng.randrange(1, 40), fresh=True)
    wants = sum(desired(v) for v in vms)
    lows = sum(lowest(v) for v in vms)
    for capacity in (wants, wants - BLOCK_BYTES, (wants + lows) // 2, lows + BLOCK_BYTES):
        host = HostPool(total=capacity, reserve=0)
        result = plan(vms, host)
        check_invariants(vms, host, result)
        got = result.targets
        if not result.shortage:
            assert all(got[v.vm_id] == desired(v) for v in vms)
            continue
        if result.overcommitted:  # checked above: every VM at its minimum
            continue
        assert 0 <= capacity - sum(got.values()) < BLOCK_BYTES  # all handed out
        for x in vms:
            lower = [y for y in vms if y.weight < x.weight]
            if got[x.vm_id] < needed(x):  # x short of demand: lower weights at minimum
                assert all(got[y.vm_id] == lowest(y) for y in lower)
            if got[x.vm_id] < desired(x):  # x short of buffer: lower weights get none
                assert all(got[y.vm_id] <= needed(y) for y in lower)


@pytest.mark.parametrize("seed", range(20))
def test_rounds_settle_when_demands_hold_still(seed: int) -> None:
    rng = random.Random(2000 + seed)
    vms = random_vms(rng, rng.randrange(1, 40))
    host = HostPool(total=sum(desired(v) for v in vms) * rng.choice([1, 2]) * 3 // 4,
                    reserve=0)
    for _ in range(40):
        targets = balance(vms, host)
        if all(targets[v.vm_id] == v.assigned for v in vms):
            break
        vms = [replace(v, assigned=targets[v.vm_id]) for v in vms]
    else:
        pytest.fail("the rounds did not settle in 40 rounds")
