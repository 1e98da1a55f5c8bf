"""The data of a dynamic memory round: each VM's settings and readings, the host's pool.

All sizes are bytes. A VM with static memory takes part as a fixed amount
(:attr:`VmMemory.static`); the policy never changes it. :class:`Plan` is what one round
decides: a target for every VM and what the balancer should tell about (VMs short of
their demand, a host short of memory).

Targets move in whole blocks from the startup memory (see :mod:`hvstack.memory.policy`);
every other size may be any number of bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

MIB = 1024 * 1024
BLOCK_BYTES = 2 * MIB  # the virtio-mem block: targets move in whole blocks


class MemoryStatus(enum.StrEnum):
    """Hyper-V's memory status of a running VM with dynamic memory.

    OK: assigned covers demand plus buffer (within the policy's hysteresis threshold);
    LOW: it covers the demand but not the whole buffer; WARNING: it does not cover the
    demand (the guest pages or is starved)."""

    OK = "OK"
    LOW = "Low"
    WARNING = "Warning"


@dataclass(frozen=True)
class VmMemory:
    """One running VM as a balancing round sees it.

    ``demand`` is what the guest uses (None: unknown, e.g. no balloon statistics yet or
    no driver); ``assigned`` what it has now. ``stuck``: the VM did not reach the last
    target it was given (a guest that refuses to give memory back), so the round takes
    what it has as fixed and moves on.
    """

    vm_id: str
    startup: int
    minimum: int
    maximum: int
    buffer_percent: int
    weight: int
    assigned: int
    demand: int | None = None
    static: bool = False
    stuck: bool = False


@dataclass(frozen=True)
class HostPool:
    """The memory the host lets its VMs have together: its total less what it keeps
    for itself (the reserve), or a configured limit if smaller."""

    total: int
    reserve: int
    limit: int | None = None

    @property
    def capacity(self) -> int:
        room = max(0, self.total - self.reserve)
        return room if self.limit is None else min(room, self.limit)


@dataclass(frozen=True)
class Plan:
    """The decision of one balancing round.

    ``targets``: the amount every VM (by id) should have; static and stuck VMs are given
    what they have. ``short``: the VMs with a known demand whose target does not cover it
    (as far as their maximum allows) because the pool could not: the balancer tells
    about them ("could not get what it needs"). ``shortage``: the pool
    did not cover every VM's desire, so it was shared by weight. ``overcommitted``: not
    even the minimums fit (every dynamic VM is held at its minimum).
    """

    targets: Mapping[str, int]
    short: frozenset[str] = frozenset()
    shortage: bool = False
    overcommitted: bool = False
