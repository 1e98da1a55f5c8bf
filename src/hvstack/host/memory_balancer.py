"""The dynamic memory balancer: reads the running guests, asks the policy, applies it.

Every round (:data:`INTERVAL`, owned by the host service: started in its startup,
cancelled in its shutdown) :class:`MemoryBalancer`:

1. reads each running VM with dynamic memory: the balloon's ``actual`` (boot memory the
   guest has), the virtio-mem device's plugged size, and the balloon's statistics.
   Assigned = actual + plugged; demand = total less available (what the guest uses)
   plus what it has but its statistics do not count (its kernel's code and reserved
   memory: assigned less total, measured while assigned stands still), None until the
   guest reports. The statistics' polling interval is set whenever a VM's worker is new (a
   start, a restore, a reattach after a restart of the service);
2. builds a :class:`~hvstack.memory.model.VmMemory` for every running VM (a static VM,
   a paused one or one that cannot be read as a fixed amount) and calls
   :func:`hvstack.memory.policy.plan` with the host's pool (:meth:`pool`: the host's
   memory less its reserve, or the configured limit);
3. applies each target, the shrinking ones first: above startup the virtio-mem device
   holds target - startup and the balloon lets the guest have all its boot memory;
   below startup nothing is plugged and the balloon's target is the target.

It notices a guest that does not reach its target (no progress for
:data:`STUCK_ROUNDS` rounds: it is taken as it is for :data:`RETRY_ROUNDS`, then tried
again) and a guest without the virtio-mem driver (plugged stays 0 though memory was
requested: it stays at or below startup), and says so in each VM's
:class:`MemoryReading` (``reason``), which :meth:`reading` hands to the API and to
metering, with :meth:`host_summary` for the host. A VM whose status turns Low or
Warning, or that cannot get its demand plus buffer because the host is short, gets a
``vm.memory`` event. Every call into a guest's QEMU has a timeout (:data:`CALL_TIMEOUT`).

:meth:`admit` is the admission of a start: the startup memory must fit the pool next
to what running VMs cannot give back (:func:`hvstack.memory.policy.admit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import VmConfig, VmRecord, VmState
from hvstack.errors import HvError, InsufficientResources
from hvstack.host.events import EventBus
from hvstack.hypervisor.capabilities import BalloonStats
from hvstack.hypervisor.driver import Machine
from hvstack.hypervisor.spec import MEMORY_DEVICE
from hvstack.memory import policy
from hvstack.memory.model import BLOCK_BYTES, HostPool, MemoryStatus, VmMemory
from hvstack.units import format_size

log = logging.getLogger(__name__)

INTERVAL = 2.0  # seconds between rounds
STATS_INTERVAL = 2  # seconds between the guests' statistics reports (at most a round)
CALL_TIMEOUT = 5.0  # seconds for one QMP call
STUCK_ROUNDS = 6  # rounds off target without progress before a VM counts as stuck
RETRY_ROUNDS = 15  # rounds a stuck VM is left alone before it is tried again
NO_DRIVER_ROUNDS = 4  # rounds with memory requested and nothing plugged: no driver
TOLERANCE = 2 * BLOCK_BYTES  # the balloon works in pages: near enough is on target
GIB = 1024**3

T = TypeVar("T")


def default_reserve(total: int) -> int:
    """What the host keeps for itself: 10 % of its memory, at least 1 GiB, at most
    8 GiB, never more than half of it."""
    return min(max(GIB, total // 10), 8 * GIB, total // 2)


@dataclass(frozen=True)
class MemoryReading:
    """One running VM's memory as the last round saw it (bytes).

    ``status`` is None for a VM with static memory; ``reason`` says why the status is
    what it is (or why memory does not move) in a sentence, "" when all is well."""

    vm_id: str
    dynamic: bool
    assigned: int
    demand: int | None
    target: int
    status: MemoryStatus | None
    reason: str
    time: float


@dataclass(frozen=True)
class HostMemory:
    """The host's memory for its VMs: ``total``, ``reserved`` for the host itself,
    ``limit`` (None: none configured), ``assigned`` to running VMs, ``available`` to
    them beyond that (never below 0)."""

    total: int
    reserved: int
    limit: int | None
    capacity: int
    assigned: int
    available: int


@dataclass
class _Tracked:
    """What the balancer remembers of one running VM's worker between rounds."""

    machine: Machine
    assigned: int = 0
    target: int | None = None
    idle_rounds: int = 0  # off target without progress
    stuck_for: int = 0  # rounds left being taken as it is
    unplugged_rounds: int = 0  # memory requested and nothing plugged
    no_driver: bool = False
    no_driver_for: int = 0  # rounds left before plugging is tried again
    short: bool = False  # the host could not give it its demand plus buffer
    status: MemoryStatus | None = None
    requested: int | None = None  # last virtio-mem size asked for
    balloon: int | None = None  # last balloon target asked for
    stats_set: bool = False
    steady_rounds: int = 0  # rounds its assigned memory has not moved
    overhead: int | None = None  # what it has that its statistics do not count


@dataclass(frozen=True)
class _Read:
    vm: VmController
    memory: VmMemory
    plugged: int
    region: int


class MemoryBalancer:
    def __init__(self, list_vms: Callable[[], Sequence[VmController]], events: EventBus,
                 pool: Callable[[], HostPool], interval: float = INTERVAL) -> None:
        self._list_vms = list_vms
        self._events = events
        self._pool = pool
        self.interval = interval
        self._tracked: dict[str, _Tracked] = {}
        self._readings: dict[str, MemoryReading] = {}
        self._memories: dict[str, VmMemory] = {}  # as the last round gave them to the policy
        self._shortage = False  # the last round's pool did not cover every desire
        self._short: frozenset[str] = frozenset()

    # -- for the API and metering -------------------------------------------------------

    def reading(self, vm_id: str) -> MemoryReading | None:
        """The VM's memory as the last round saw it; None unless it runs."""
        return self._readings.get(vm_id)

    def pool(self) -> HostPool:
        return self._pool()

    def host_summary(self) -> HostMemory:
        pool = self._pool()
        assigned = sum(self._held(vm) for vm in self._active())
        return HostMemory(total=pool.total, reserved=pool.reserve, limit=pool.limit,
                          capacity=pool.capacity, assigned=assigned,
                          available=max(0, pool.capacity - assigned))

    def admit(self, record: VmRecord) -> None:
        """Raise InsufficientResources unless VM ``record`` can start with its startup
        memory next to the running VMs (what they hold beyond their minimum and demand
        can be taken back; their minimums cannot)."""
        startup = record.config.memory_bytes
        others = [self._memories.get(vm.record.id) or self._as_fixed(vm)
                  for vm in self._active() if vm.record.id != record.id]
        pool = self._pool()
        if policy.admit(startup, others, pool):
            return
        held = sum(m.assigned for m in others)
        raise InsufficientResources(
            f"cannot start VM '{record.name}': it needs {format_size(startup)} of memory "
            f"to start and the host cannot free that much (its VMs may have "
            f"{format_size(pool.capacity)} together, running VMs hold "
            f"{format_size(held)})", vm=record.name, needed=startup,
            capacity=pool.capacity)

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Balance every :attr:`interval` seconds until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self.round(), self.interval * 10)
            except TimeoutError:
                log.warning("a dynamic memory round took longer than %.0f s",
                            self.interval * 10)
            except HvError as exc:
                log.warning("dynamic memory round failed: %s", exc)
            await asyncio.sleep(self.interval)

    async def round(self) -> None:
        """One round: read, balance, apply, record."""
        active = self._active()
        ids = {vm.record.id for vm in active}
        for gone in set(self._tracked) - ids:
            del self._tracked[gone]
        for known in (self._readings, self._memories):
            for gone in set(known) - ids:
                del known[gone]
        reads = await asyncio.gather(*(self._read(vm) for vm in active))
        memories = [r.memory if r is not None else self._memory_of(vm)
                    for vm, r in zip(active, reads, strict=True)]
        plan = policy.plan(memories, self._pool())
        targets = plan.targets
        self._memories = {m.vm_id: m for m in memories}
        self._short = plan.short  # below their demand because the pool is short
        self._shortage = plan.shortage  # below their desire because the pool is short
        now = time.time()
        rows = [(vm, read, memory, targets.get(vm.record.id, memory.assigned))
                for vm, read, memory in zip(active, reads, memories, strict=True)]
        # Shrinking first: what one VM gives back is there for the next to take.
        for vm, read, memory, target in sorted(rows, key=lambda r: r[3] - r[2].assigned):
            if read is not None:
                await self._apply(read, target)
            self._record(vm, memory, target, now)

    # -- reading ------------------------------------------------------------------------

    def _active(self) -> list[VmController]:
        """The VMs that hold memory: a worker runs, or it is being started."""
        return [vm for vm in self._list_vms()
                if vm.machine_running or vm.state is VmState.STARTING]

    @staticmethod
    def _bounds(config: VmConfig) -> tuple[int, int]:
        startup = config.memory_bytes
        return (config.memory_minimum_bytes or startup, config.memory_maximum_bytes or startup)

    def _as_fixed(self, vm: VmController, assigned: int | None = None) -> VmMemory:
        config = vm.record.config
        held = config.memory_bytes if assigned is None else assigned
        return VmMemory(vm.record.id, config.memory_bytes, held, held,
                        config.memory_buffer_percent, config.memory_weight, held,
                        static=True)

    def _held(self, vm: VmController) -> int:
        reading = self._readings.get(vm.record.id)
        return reading.assigned if reading is not None else vm.record.config.memory_bytes

    def _memory_of(self, vm: VmController) -> VmMemory:
        """A VM this round did not read: what it had last, fixed."""
        return self._as_fixed(vm, self._held(vm))

    async def _read(self, vm: VmController) -> _Read | None:
        config = vm.record.config
        if not config.dynamic_memory or vm.state is not VmState.RUNNING:
            return None
        try:
            machine = vm.running_machine()
            tracked = self._tracked.get(vm.record.id)
            if tracked is None or tracked.machine is not machine:
                tracked = self._tracked[vm.record.id] = _Tracked(machine)
            if not tracked.stats_set:
                await _timed(machine.memory.set_stats_interval(
                    max(1, min(STATS_INTERVAL, round(self.interval)))))
                tracked.stats_set = True
            actual = await _timed(machine.memory.balloon_size())
            device = (await _timed(machine.memory.memory_devices())).get(MEMORY_DEVICE)
            stats = await _timed(machine.memory.balloon_stats())
        except (HvError, TimeoutError) as exc:
            log.debug("VM %s: reading its memory failed: %s", vm.record.name, exc)
            return None
        plugged = device.plugged if device is not None else 0
        demand = self._demand(tracked, actual + plugged, stats)
        minimum, maximum = self._bounds(config)
        self._notice(tracked, actual + plugged, device.requested if device else 0, plugged)
        if tracked.no_driver or device is None:
            maximum = min(maximum, config.memory_bytes)
        memory = VmMemory(vm.record.id, config.memory_bytes, minimum, maximum,
                          config.memory_buffer_percent, config.memory_weight,
                          actual + plugged, demand, stuck=tracked.stuck_for > 0)
        return _Read(vm, memory, plugged, device.maximum if device else 0)

    @staticmethod
    def _demand(tracked: _Tracked, assigned: int, stats: BalloonStats) -> int | None:
        """What the guest needs of what it is assigned: its use (total less available)
        plus what it has but does not count (the kernel's own code and reserved memory,
        the page tables of plugged memory), measured while its memory stands still
        long enough for the statistics to have caught up."""
        tracked.steady_rounds = (tracked.steady_rounds + 1
                                 if abs(assigned - tracked.assigned) <= TOLERANCE else 0)
        if stats.last_update <= 0 or stats.total is None or stats.available is None:
            return None
        if tracked.overhead is None or tracked.steady_rounds >= 2:
            tracked.overhead = max(0, assigned - stats.total)
        return max(0, stats.total - stats.available) + tracked.overhead

    def _notice(self, tracked: _Tracked, assigned: int, requested: int, plugged: int) -> None:
        """Stuck and driverless guests, from this reading and the last."""
        if requested > 0 and plugged == 0 and not tracked.no_driver:
            tracked.unplugged_rounds += 1
            if tracked.unplugged_rounds >= NO_DRIVER_ROUNDS:
                # Known why it does not move: no need to take it as stuck as well.
                tracked.no_driver, tracked.stuck_for, tracked.idle_rounds = True, 0, 0
                tracked.no_driver_for = RETRY_ROUNDS * 4
        elif plugged:
            tracked.unplugged_rounds = 0
        elif tracked.no_driver:  # a driver may load late: try again now and then
            tracked.no_driver_for -= 1
            if tracked.no_driver_for <= 0:
                tracked.no_driver, tracked.unplugged_rounds = False, 0
        if tracked.stuck_for:
            tracked.stuck_for -= 1
            if not tracked.stuck_for:  # try again: ask for the targets anew
                tracked.requested = tracked.balloon = None
        elif (tracked.target is not None and abs(assigned - tracked.target) > TOLERANCE
                and abs(assigned - tracked.assigned) <= TOLERANCE):
            tracked.idle_rounds += 1
            if tracked.idle_rounds >= STUCK_ROUNDS:
                tracked.stuck_for, tracked.idle_rounds = RETRY_ROUNDS, 0
        else:
            tracked.idle_rounds = 0
        tracked.assigned = assigned

    # -- applying -----------------------------------------------------------------------

    async def _apply(self, read: _Read, target: int) -> None:
        vm, memory = read.vm, read.memory
        tracked = self._tracked[vm.record.id]
        startup = memory.startup
        if memory.stuck:
            # Taken as it is until it is tried again: asked to stay where it is, so a
            # guest that cannot let go does not keep straining for the old target.
            requested, balloon = read.plugged, memory.assigned - read.plugged
        else:
            requested = 0 if tracked.no_driver else min(
                max(0, target - startup) // BLOCK_BYTES * BLOCK_BYTES, read.region)
            balloon = min(target, startup)
        machine = tracked.machine
        try:
            if requested != tracked.requested:
                await _timed(machine.memory.set_memory_device_size(MEMORY_DEVICE, requested))
                tracked.requested = requested
            if balloon != tracked.balloon:
                await _timed(machine.memory.set_balloon_target(balloon))
                tracked.balloon = balloon
        except (HvError, TimeoutError) as exc:
            log.warning("VM %s: applying its memory target failed: %s", vm.record.name, exc)
            return
        if memory.stuck:
            return
        if tracked.target != balloon + requested:
            tracked.idle_rounds = 0
        tracked.target = balloon + requested

    # -- readings, status, events -------------------------------------------------------

    def _record(self, vm: VmController, memory: VmMemory, target: int, now: float) -> None:
        record, config = vm.record, vm.record.config
        tracked = self._tracked.get(record.id)
        if not config.dynamic_memory or tracked is None:
            self._readings[record.id] = MemoryReading(
                record.id, config.dynamic_memory, memory.assigned, memory.demand,
                memory.assigned, None if not config.dynamic_memory else MemoryStatus.OK,
                "" if not config.dynamic_memory
                else f"its memory is not balanced while it is {vm.state.value}", now)
            return
        status = policy.status(memory.assigned, memory.demand, memory.buffer_percent)
        wanted = policy.desired(memory)
        short = record.id in self._short or (
            self._shortage and memory.demand is not None and target < wanted
            and not memory.stuck)
        reason = self._reason(memory, tracked, status, short, target)
        self._readings[record.id] = MemoryReading(record.id, True, memory.assigned,
                                                  memory.demand, target, status, reason, now)
        worse = status is not tracked.status and status is not MemoryStatus.OK
        if worse or (short and not tracked.short):
            self._events.publish(
                "vm.memory", vm=record.name, id=record.id, status=status.value,
                reason=reason, assigned=memory.assigned, demand=memory.demand,
                target=target, wanted=wanted)
        tracked.status, tracked.short = status, short

    @staticmethod
    def _reason(memory: VmMemory, tracked: _Tracked, status: MemoryStatus, short: bool,
                target: int) -> str:
        if tracked.no_driver:
            return ("the guest does not plug memory (no virtio-mem driver?): it stays at "
                    "or below its startup memory")
        if memory.demand is None:
            return ("no memory statistics from the guest yet (they need its virtio "
                    "balloon driver): its memory stays where it is")
        if memory.stuck:
            return (f"the guest did not reach its target of {format_size(tracked.target or 0)}"
                    f" (it has {format_size(memory.assigned)}); it is left as it is for a "
                    "while, then tried again")
        if short:
            return (f"the host is short of memory: it gets {format_size(target)} of the "
                    f"{format_size(policy.desired(memory))} its demand and buffer ask for")
        if status is MemoryStatus.WARNING:
            return "its assigned memory is below its demand"
        if status is MemoryStatus.LOW:
            return "its assigned memory covers its demand but not all of its buffer"
        return ""


async def _timed(call: Awaitable[T]) -> T:
    return await asyncio.wait_for(call, CALL_TIMEOUT)


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel the balancer's task and wait until it has ended."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, CALL_TIMEOUT * 2)
