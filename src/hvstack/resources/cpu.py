"""Processor resource controls as cgroup CPU settings, and admission of reserves (pure).

Hyper-V's settings of a VM, all percentages of *the VM's* processors:

* limit (1-100 %): at most this much of its processors. A CFS bandwidth quota per
  period: ``quota = limit / 100 * cpus * period``; 100 % is no quota at all.
* weight (1-10000, default 100): its share against other VMs when processors are short.
  cgroup v2 ``cpu.weight`` has the same range and default; v1 ``cpu.shares`` is
  ``weight * 1024 / 100`` (100 -> 1024, the default of every cgroup) within [2, 262144].
* reserve (0-100 %): Linux has no CPU reservation. It is kept by admission (the reserves
  of the running VMs, each ``reserve / 100 * cpus`` host processors, fit the host's
  processors: :func:`admit`) and by a weight floor (:func:`effective_weight`): a VM that
  reserves R of the host's N processors weighs at least ``10000 * R / N``, so it wins its
  share against VMs of ordinary weight when all compete. Neither is a hard guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

PERIOD_US = 100_000  # the kernel's default CFS period
V1_SHARES_RANGE = (2, 262_144)
WEIGHT_RANGE = (1, 10_000)
DEFAULT_WEIGHT = 100


@dataclass(frozen=True)
class CpuSettings:
    """A VM's processor resource controls as the user set them."""

    cpus: int
    reserve_percent: int = 0
    limit_percent: int = 100
    weight: int = DEFAULT_WEIGHT


@dataclass(frozen=True)
class CpuControls:
    """What a VM's cgroup is given: ``quota_us`` per ``period_us`` (None: no quota) and
    a weight on Hyper-V's (and cgroup v2's) scale 1-10000."""

    quota_us: int | None
    period_us: int = PERIOD_US
    weight: int = DEFAULT_WEIGHT

    @property
    def v1_quota(self) -> int:
        """cpu.cfs_quota_us: -1 for no quota."""
        return -1 if self.quota_us is None else self.quota_us

    @property
    def v1_shares(self) -> int:
        return v1_shares(self.weight)

    @property
    def v2_max(self) -> str:
        """cpu.max: "QUOTA PERIOD", "max PERIOD" for no quota."""
        return f"{'max' if self.quota_us is None else self.quota_us} {self.period_us}"


def quota_us(limit_percent: int, cpus: int, period_us: int = PERIOD_US) -> int | None:
    """The CFS quota of a VM with ``cpus`` processors limited to ``limit_percent`` of
    them; None at 100 % (no quota). Never below the kernel's minimum of 1 ms."""
    if limit_percent >= 100:
        return None
    return max(1000, limit_percent * cpus * period_us // 100)


def v1_shares(weight: int) -> int:
    """cgroup v1 cpu.shares for a weight: 100 (the default) is 1024 (v1's default)."""
    low, high = V1_SHARES_RANGE
    return max(low, min(high, weight * 1024 // 100))


def v2_weight(weight: int) -> int:
    low, high = WEIGHT_RANGE
    return max(low, min(high, weight))


def reserved_processors(reserve_percent: int, cpus: int) -> float:
    """How many host processors a reserve takes: 50 % of 2 processors is 1."""
    return reserve_percent * cpus / 100


def effective_weight(settings: CpuSettings, host_cpus: int) -> int:
    """The weight given to the cgroup: the user's, raised to the reserve's floor
    ``10000 * reserved / host_cpus`` (rounded up)."""
    reserved = reserved_processors(settings.reserve_percent, settings.cpus)
    floor = math.ceil(WEIGHT_RANGE[1] * reserved / max(1, host_cpus)) if reserved else 0
    return v2_weight(max(settings.weight, floor))


def controls(settings: CpuSettings, host_cpus: int) -> CpuControls:
    """The cgroup settings of a VM."""
    return CpuControls(quota_us(settings.limit_percent, settings.cpus),
                       PERIOD_US, effective_weight(settings, host_cpus))


@dataclass(frozen=True)
class Admission:
    """Whether a VM's reserve fits: ``reserved`` host processors by the other running
    VMs, ``wanted`` by this one, ``host_cpus`` in all."""

    reserved: float
    wanted: float
    host_cpus: int

    @property
    def fits(self) -> bool:
        # A small tolerance: 3 x 33.33...% must fit one processor exactly.
        return self.reserved + self.wanted <= self.host_cpus + 1e-9

    @property
    def left(self) -> float:
        return max(0.0, self.host_cpus - self.reserved)


def admit(wanted: CpuSettings, running: Iterable[CpuSettings], host_cpus: int) -> Admission:
    """Whether ``wanted``'s reserve fits beside the reserves of ``running`` VMs."""
    reserved = sum(reserved_processors(s.reserve_percent, s.cpus) for s in running)
    return Admission(reserved, reserved_processors(wanted.reserve_percent, wanted.cpus),
                     host_cpus)
