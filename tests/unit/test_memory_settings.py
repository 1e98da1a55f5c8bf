"""Dynamic memory's settings: Hyper-V's ranges and order, the defaults chosen when it
is turned on, and what may change while the VM runs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hvstack.compute.model import VmConfig, VmState, validate_config, with_memory_defaults
from hvstack.compute.settings import check_change, check_memory_change
from hvstack.errors import InsufficientResources, InvalidInput, InvalidState

MIB = 1024 * 1024
GIB = 1024 * MIB
HOST = 8 * GIB


def dynamic(startup: int = 1 * GIB, minimum: int = 512 * MIB, maximum: int = 4 * GIB,
            **changes: object) -> VmConfig:
    config = VmConfig(name="demo", memory_bytes=startup, dynamic_memory=True,
                      memory_minimum_bytes=minimum, memory_maximum_bytes=maximum)
    return replace(config, **changes)  # type: ignore[arg-type]


def check(config: VmConfig) -> VmConfig:
    return validate_config(config, host_cpus=4, host_memory=HOST)


def test_a_dynamic_vm_in_order_is_accepted() -> None:
    check(dynamic())
    check(dynamic(minimum=1 * GIB, maximum=1 * GIB))  # all three equal
    check(dynamic(memory_buffer_percent=5, memory_weight=0))
    check(dynamic(memory_buffer_percent=2000, memory_weight=10000, maximum=HOST))


@pytest.mark.parametrize(("changes", "message"), [
    ({"minimum": 2 * GIB}, "out of order: minimum 2 GiB, startup 1 GiB, maximum 4 GiB"),
    ({"maximum": 512 * MIB}, "out of order"),
    ({"memory_buffer_percent": 4}, "memory buffer 4% is out of range; 5 to 2000%"),
    ({"memory_buffer_percent": 2001}, "memory buffer 2001%"),
    ({"memory_weight": -1}, "memory weight -1 is out of range; 0 to 10000"),
    ({"memory_weight": 10001}, "memory weight 10001"),
    ({"minimum": 512 * MIB + 1}, "minimum memory .* whole number of MiB"),
    ({"maximum": 4 * GIB - 4096}, "maximum memory .* whole number of MiB"),
    ({"minimum": 16 * MIB}, "at least 32 MiB"),
    ({"minimum": None}, "needs a minimum and a maximum"),
])
def test_bad_dynamic_memory_settings_are_refused(changes: dict[str, object],
                                                 message: str) -> None:
    args = {k: changes.pop(k) for k in ("minimum", "maximum") if k in changes}
    with pytest.raises(InvalidInput, match=message):
        check(dynamic(**args, **changes))  # type: ignore[arg-type]


def test_a_maximum_beyond_the_hosts_memory_is_refused() -> None:
    with pytest.raises(InsufficientResources, match="maximum memory 9 GiB is more than "
                                                    r"this host has \(8 GiB\)"):
        check(dynamic(maximum=9 * GIB))


def test_stale_bounds_of_a_static_vm_are_not_checked_for_order() -> None:
    check(dynamic(startup=8 * GIB, dynamic_memory=False))  # startup above the old maximum


def test_turning_dynamic_memory_on_fills_in_sensible_bounds() -> None:
    on = VmConfig(name="demo", memory_bytes=1 * GIB, dynamic_memory=True)
    filled = with_memory_defaults(on, HOST + 123)
    assert (filled.memory_minimum_bytes, filled.memory_maximum_bytes) == (512 * MIB, HOST)
    check(filled)
    small = with_memory_defaults(replace(on, memory_bytes=256 * MIB), HOST)
    assert small.memory_minimum_bytes == 256 * MIB  # never above the startup memory
    kept = with_memory_defaults(replace(on, memory_maximum_bytes=2 * GIB), HOST)
    assert kept.memory_maximum_bytes == 2 * GIB
    off = VmConfig(name="demo")
    assert with_memory_defaults(off, HOST) is off


@pytest.mark.parametrize("state", [VmState.RUNNING, VmState.PAUSED, VmState.SAVED])
def test_dynamic_memory_and_startup_change_only_while_off(state: VmState) -> None:
    with pytest.raises(InvalidState, match=r"dynamic memory setting .* only while the VM "
                                           "is Off") as info:
        check_change(["dynamic_memory"], state, "demo")
    assert info.value.http_status == 409
    with pytest.raises(InvalidState, match="cannot change the memory of VM 'demo'"):
        check_change(["memory_bytes"], state, "demo")
    check_change(["memory_buffer_percent", "memory_weight", "memory_minimum_bytes",
                  "memory_maximum_bytes"], state, "demo")


@pytest.mark.parametrize("state", [VmState.RUNNING, VmState.PAUSED])
def test_while_running_the_minimum_only_goes_down_and_the_maximum_only_up(
        state: VmState) -> None:
    old = dynamic()
    check_memory_change(old, replace(old, memory_minimum_bytes=256 * MIB,
                                     memory_maximum_bytes=6 * GIB), state, "demo")
    with pytest.raises(InvalidState, match="cannot raise the minimum memory of VM 'demo' "
                                           f"while it is {state.value}"):
        check_memory_change(old, replace(old, memory_minimum_bytes=768 * MIB), state, "demo")
    with pytest.raises(InvalidState, match="cannot lower the maximum memory"):
        check_memory_change(old, replace(old, memory_maximum_bytes=2 * GIB), state, "demo")


def test_while_off_the_bounds_change_either_way() -> None:
    old = dynamic()
    check_memory_change(old, replace(old, memory_minimum_bytes=768 * MIB,
                                     memory_maximum_bytes=2 * GIB), VmState.OFF, "demo")
