"""Processor resource controls as cgroup settings, and admission of reserves: worked
examples of :mod:`hvstack.resources.cpu`."""

from __future__ import annotations

import pytest

from hvstack.resources.cpu import (
    CpuControls,
    CpuSettings,
    admit,
    controls,
    effective_weight,
    quota_us,
    reserved_processors,
    v1_shares,
    v2_weight,
)


@pytest.mark.parametrize(("limit", "cpus", "quota"), [
    (25, 1, 25_000),    # a quarter of one processor per 100 ms period
    (25, 2, 50_000),    # 25 % of 2 processors is half of one host processor
    (50, 4, 200_000),   # two host processors' worth
    (1, 1, 1_000),      # the kernel's minimum quota, exactly
    (99, 3, 297_000),
    (100, 1, None),     # 100 %: no quota at all
    (100, 8, None),
])
def test_the_limit_is_a_quota_of_the_vms_processors(limit: int, cpus: int,
                                                    quota: int | None) -> None:
    assert quota_us(limit, cpus) == quota


@pytest.mark.parametrize(("weight", "shares"), [
    (100, 1024),        # the default weight is v1's default shares
    (1, 10),
    (50, 512),
    (200, 2048),
    (10_000, 102_400),
    (0, 2),             # never below v1's minimum (validation keeps weights >= 1)
    (30_000, 262_144),  # nor above its maximum
])
def test_weight_to_v1_shares(weight: int, shares: int) -> None:
    assert v1_shares(weight) == shares


def test_weight_to_v2_weight_is_the_same_scale_clamped() -> None:
    assert [v2_weight(w) for w in (1, 100, 10_000, 0, 20_000)] == [1, 100, 10_000, 1, 10_000]


def test_cgroup_file_values() -> None:
    limited = CpuControls(25_000, 100_000, 100)
    assert (limited.v1_quota, limited.v1_shares, limited.v2_max) == (25_000, 1024,
                                                                     "25000 100000")
    free = CpuControls(None, 100_000, 500)
    assert (free.v1_quota, free.v1_shares, free.v2_max) == (-1, 5120, "max 100000")


def test_a_reserve_raises_the_weight_to_its_floor() -> None:
    # 50 % of 2 processors = 1 of the host's 4: at least a quarter of the top weight.
    assert reserved_processors(50, 2) == 1.0
    assert effective_weight(CpuSettings(2, reserve_percent=50), host_cpus=4) == 2500
    # A weight above the floor stays; no reserve, no floor.
    assert effective_weight(CpuSettings(2, 50, 100, 4000), host_cpus=4) == 4000
    assert effective_weight(CpuSettings(2, 0, 100, 7), host_cpus=4) == 7
    # Rounded up: 10 % of 1 processor on a 3-processor host is 333.3...
    assert effective_weight(CpuSettings(1, reserve_percent=10), host_cpus=3) == 334


def test_controls_of_a_vm() -> None:
    assert controls(CpuSettings(2, 0, 25, 300), host_cpus=4) == CpuControls(50_000, 100_000,
                                                                            300)
    assert controls(CpuSettings(1), host_cpus=2) == CpuControls(None, 100_000, 100)


def test_admission_of_reserves() -> None:
    running = [CpuSettings(2, reserve_percent=50), CpuSettings(1, reserve_percent=25)]
    # 1 + 0.25 of 2 host processors are reserved: 0.75 left.
    fits = admit(CpuSettings(1, reserve_percent=75), running, host_cpus=2)
    assert (fits.reserved, fits.wanted, fits.fits, fits.left) == (1.25, 0.75, True, 0.75)
    refused = admit(CpuSettings(1, reserve_percent=76), running, host_cpus=2)
    assert not refused.fits
    assert not admit(CpuSettings(4, reserve_percent=50), [], host_cpus=1).fits
    # No reserve always fits, even on a fully reserved host.
    assert admit(CpuSettings(8), [CpuSettings(2, reserve_percent=100)], host_cpus=2).fits
    # Three thirds of one processor fit it exactly.
    thirds = [CpuSettings(3, reserve_percent=11)] * 2
    assert admit(CpuSettings(3, reserve_percent=11), thirds, host_cpus=1).fits
