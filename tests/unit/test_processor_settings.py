"""The processor resource controls as VM settings: Hyper-V's ranges, checked without
I/O, and changeable in every state; processor compatibility only while Off."""

from __future__ import annotations

import json

import pytest

from hvstack.compute.model import VmConfig, VmState, validate_config
from hvstack.compute.settings import check_change
from hvstack.errors import InvalidInput, InvalidState

HOST = {"host_cpus": 4, "host_memory": 8 << 30}


@pytest.mark.parametrize(("reserve", "limit", "weight"), [
    (0, 100, 100), (0, 1, 1), (100, 100, 10_000), (30, 30, 5), (0, 25, 100)])
def test_settings_in_range(reserve: int, limit: int, weight: int) -> None:
    config = VmConfig("vm", processor_reserve_percent=reserve,
                      processor_limit_percent=limit, processor_weight=weight)
    assert validate_config(config, **HOST) is config


@pytest.mark.parametrize(("reserve", "limit", "weight", "message"), [
    (-1, 100, 100, "processor reserve -1% is out of range; 0 to 100%"),
    (101, 100, 100, "processor reserve 101% is out of range"),
    (0, 0, 100, "processor limit 0% is out of range; 1 to 100%"),
    (0, 101, 100, "processor limit 101% is out of range"),
    (60, 50, 100, "processor limit 50% is below the processor reserve 60%"),
    (0, 100, 0, "processor weight 0 is out of range; 1 to 10000 is allowed"),
    (0, 100, 10_001, "processor weight 10001 is out of range"),
])
def test_settings_out_of_range(reserve: int, limit: int, weight: int, message: str) -> None:
    config = VmConfig("vm", processor_reserve_percent=reserve,
                      processor_limit_percent=limit, processor_weight=weight)
    with pytest.raises(InvalidInput, match=message):
        validate_config(config, **HOST)


@pytest.mark.parametrize("state", list(VmState))
def test_they_change_in_every_state(state: VmState) -> None:
    check_change(["processor_reserve_percent", "processor_limit_percent",
                  "processor_weight"], state, "vm")


def test_processor_compatibility_is_off_by_default_and_old_configs_load() -> None:
    assert VmConfig("vm").processor_compatibility is False
    old = json.loads(VmConfig("vm").to_json())
    del old["processor_compatibility"]  # a config stored before the setting existed
    assert VmConfig.from_json(json.dumps(old)).processor_compatibility is False
    on = VmConfig("vm", processor_compatibility=True)
    assert VmConfig.from_json(on.to_json()) == on


def test_processor_compatibility_changes_only_while_off() -> None:
    check_change(["processor_compatibility"], VmState.OFF, "vm")
    for state in set(VmState) - {VmState.OFF}:
        with pytest.raises(InvalidState, match="cannot change the processor compatibility "
                                               "of VM 'vm'"):
            check_change(["processor_compatibility"], state, "vm")
