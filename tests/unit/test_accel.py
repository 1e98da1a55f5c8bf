"""Choosing the accelerator: worked examples, and reading the facts from the host."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvstack.errors import InvalidInput
from hvstack.hypervisor.accel import AcceleratorChoice, HostFacts, choose, probe

VMX = frozenset({"fpu", "vmx", "sse2"})
SVM = frozenset({"fpu", "svm"})
NONE = frozenset({"fpu", "sse2", "hypervisor"})


def test_no_kvm_device_means_tcg() -> None:
    choice = choose(HostFacts(VMX, kvm_device=False))
    assert choice.name == "tcg"
    assert "/dev/kvm" in choice.reason


def test_kvm_device_without_hardware_virtualization_means_tcg() -> None:
    choice = choose(HostFacts(NONE, kvm_device=True))
    assert choice.name == "tcg"
    assert "nested" in choice.reason
    assert "vmx/svm" in choice.reason


@pytest.mark.parametrize(("flags", "flag"), [(VMX, "vmx"), (SVM, "svm")])
def test_hardware_virtualization_means_kvm(flags: frozenset[str], flag: str) -> None:
    choice = choose(HostFacts(flags, kvm_device=True))
    assert choice == AcceleratorChoice("kvm", f"/dev/kvm is usable and the CPU has {flag}")


@pytest.mark.parametrize("facts", [HostFacts(VMX, True), HostFacts(NONE, True),
                                   HostFacts(NONE, False)])
def test_override_tcg_always_wins(facts: HostFacts) -> None:
    assert choose(facts, "tcg") == AcceleratorChoice("tcg", "set by configuration")


@pytest.mark.parametrize("flags", [VMX, NONE])
def test_override_kvm_with_a_device(flags: frozenset[str]) -> None:
    assert choose(HostFacts(flags, True), "kvm") == AcceleratorChoice("kvm",
                                                                      "set by configuration")


def test_override_kvm_without_a_device_is_refused() -> None:
    with pytest.raises(InvalidInput, match="/dev/kvm is not usable"):
        choose(HostFacts(VMX, False), "kvm")


@pytest.mark.parametrize("facts", [HostFacts(VMX, True), HostFacts(NONE, True),
                                   HostFacts(VMX, False)])
def test_auto_is_the_same_as_no_override(facts: HostFacts) -> None:
    assert choose(facts, "auto") == choose(facts, None) == choose(facts)


@pytest.mark.parametrize("override", ["xen", "KVM", "", "hvf"])
def test_bad_override_is_invalid_input(override: str) -> None:
    with pytest.raises(InvalidInput, match="is not one of auto, kvm, tcg"):
        choose(HostFacts(VMX, True), override)


# -- probe ------------------------------------------------------------------------------------


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme vmx sse2
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme vmx sse2 other
"""


def test_probe_reads_the_first_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    facts = probe(cpuinfo, tmp_path / "no-kvm")
    assert facts == HostFacts(frozenset({"fpu", "vme", "vmx", "sse2"}), kvm_device=False)


def test_probe_with_a_usable_device(tmp_path: Path) -> None:
    kvm = tmp_path / "kvm"
    kvm.write_bytes(b"")
    kvm.chmod(0o600)
    facts = probe(tmp_path / "no-cpuinfo", kvm)
    assert facts == HostFacts(frozenset(), kvm_device=True)
    assert choose(facts).name == "tcg"


def test_probe_of_this_host_gives_a_choice() -> None:
    assert choose(probe()).name in ("kvm", "tcg")
