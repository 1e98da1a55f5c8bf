"""Choosing the accelerator: KVM where the host can run ordinary guests fast, else TCG.

KVM is only worth it when the CPU exposes hardware virtualization (vmx/svm) and
/dev/kvm is usable; a nested, paravirtual /dev/kvm without those flags runs stock
kernels far slower than TCG, so it does not count. The decision and its reason are a
pure function of the facts, which :func:`probe` reads from the host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hvstack.errors import InvalidInput


@dataclass(frozen=True)
class HostFacts:
    cpu_flags: frozenset[str]
    kvm_device: bool  # /dev/kvm exists and is readable and writable


@dataclass(frozen=True)
class AcceleratorChoice:
    name: str  # "kvm" or "tcg"
    reason: str


def probe(cpuinfo: Path = Path("/proc/cpuinfo"), kvm: Path = Path("/dev/kvm")) -> HostFacts:
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
                break
    except OSError:
        pass
    return HostFacts(frozenset(flags), kvm.exists() and os.access(kvm, os.R_OK | os.W_OK))


def choose(facts: HostFacts, override: str | None = None) -> AcceleratorChoice:
    """Pick the accelerator; ``override`` ("kvm", "tcg" or None/"auto") wins when usable."""
    hw = facts.cpu_flags & {"vmx", "svm"}
    if override in ("tcg",):
        return AcceleratorChoice("tcg", "set by configuration")
    if override == "kvm":
        if not facts.kvm_device:
            raise InvalidInput("accelerator kvm was asked for but /dev/kvm is not usable")
        return AcceleratorChoice("kvm", "set by configuration")
    if override not in (None, "auto"):
        raise InvalidInput(f"accelerator '{override}' is not one of auto, kvm, tcg")
    if not facts.kvm_device:
        return AcceleratorChoice("tcg", "/dev/kvm is missing or not accessible")
    if not hw:
        return AcceleratorChoice(
            "tcg",
            "/dev/kvm exists but the CPU shows no hardware virtualization (vmx/svm): "
            "nested paravirtual KVM is slower than TCG",
        )
    return AcceleratorChoice("kvm", f"/dev/kvm is usable and the CPU has {sorted(hw)[0]}")
