"""Which settings may change in which state, and the sentence a refusal reads as."""

from __future__ import annotations

import pytest

from hvstack.compute.model import VmState
from hvstack.compute.settings import ANY_STATE, changeable_while, check_change, label
from hvstack.errors import InvalidState


def test_off_allows_every_setting_and_other_states_only_the_soft_ones() -> None:
    assert {"memory_bytes", "cpus", "disks", "name"} <= changeable_while(VmState.OFF)
    for state in VmState:
        if state is not VmState.OFF:
            assert changeable_while(state) == ANY_STATE
            assert "memory_bytes" not in changeable_while(state)


def test_label_names_settings_in_a_sentence() -> None:
    assert label(["memory_bytes"]) == "memory"
    assert label(["memory_bytes", "cpus"]) == "memory and processor count"
    assert label(["cpus", "boot_order", "dvd"]) == "processor count, boot order and DVD drive"


def test_check_change_names_the_setting_and_what_to_do() -> None:
    with pytest.raises(InvalidState) as info:
        check_change(["notes", "memory_bytes"], VmState.RUNNING, "demo")
    assert info.value.message == (
        "cannot change the memory of VM 'demo' while it is Running: stop it first")
    assert info.value.data["operation"] == "change the memory of"
    assert info.value.data["required"] == ["Off"]


def test_check_change_on_a_saved_vm_points_at_its_saved_state() -> None:
    with pytest.raises(InvalidState) as info:
        check_change(["cpus"], VmState.SAVED, "demo")
    assert info.value.message == (
        "cannot change the processor count of VM 'demo' while it is Saved: start it and "
        "shut it down first, or discard its saved state")


def test_soft_settings_change_in_any_state() -> None:
    for state in VmState:
        check_change(["name", "notes", "auto_stop", "kvp_pool"], state, "demo")
    check_change(["memory_bytes", "cpus"], VmState.OFF, "demo")
