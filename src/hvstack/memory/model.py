"""The data of a dynamic memory round: each VM's settings and readings, the host's pool.

All sizes are bytes. A VM with static memory takes part as a fixed amount
(:attr:`VmMemory.static`); the policy never changes it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MIB = 1024 * 1024
BLOCK_BYTES = 2 * MIB  # the virtio-mem block: targets are whole blocks


class MemoryStatus(enum.StrEnum):
    """Hyper-V's memory status of a running VM with dynamic memory.

    OK: assigned covers demand plus buffer; LOW: it covers the demand but not the whole
    buffer; WARNING: it does not cover the demand (the guest pages or is starved)."""

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
