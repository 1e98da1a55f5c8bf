"""The host's facts: processors, memory, accelerator, cgroups; injected, so tests fix them.

A :class:`HostProbe` answers what the host service needs to know about the machine it
runs on. :class:`LinuxHost` reads it from ``/proc`` and ``/dev/kvm``;
:class:`FixedHost` returns what it is given (the tests' host, never the machine that
runs them: its cgroups are none, or the imitation a test gives).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hvstack.errors import HypervisorError
from hvstack.hypervisor import accel
from hvstack.resources.cgroups import Cgroups, NoCgroups, probe

GIB = 1024**3


@dataclass(frozen=True)
class HostFacts:
    """What the host has, read once when the service starts."""

    cpus: int
    memory_bytes: int
    accelerator: accel.AcceleratorChoice


class HostProbe(Protocol):
    def facts(self, accelerator: str | None) -> HostFacts:
        """The host's facts; ``accelerator`` is the configured choice (None: best)."""
        ...

    def available_memory(self) -> int:
        """Bytes of memory the host can give a VM starting now."""
        ...

    def check_accelerator(self, name: str) -> None:
        """Raise if accelerator ``name`` cannot be used on this host."""
        ...

    def cgroups(self, parent: str) -> Cgroups:
        """The CPU controller for the VMs' cgroups, under ``parent``."""
        ...


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise HypervisorError(f"/proc/meminfo has no {field}")


class LinuxHost:
    def facts(self, accelerator: str | None) -> HostFacts:
        return HostFacts(cpus=os.cpu_count() or 1, memory_bytes=_meminfo("MemTotal"),
                         accelerator=accel.choose(accel.probe(), accelerator))

    def available_memory(self) -> int:
        return _meminfo("MemAvailable")

    def check_accelerator(self, name: str) -> None:
        accel.choose(accel.probe(), name)

    def cgroups(self, parent: str) -> Cgroups:
        return probe(parent)


@dataclass
class FixedHost:
    """A host whose facts are given: by default 4 processors, 8 GiB (4 available), no
    KVM, no cgroups unless ``cgroups_of`` makes them (e.g. over a directory tree).
    ``available`` may be changed while a test runs."""

    cpus: int = 4
    memory_bytes: int = 8 * GIB
    available: int = 4 * GIB
    kvm: bool = False
    cgroups_of: Callable[[str], Cgroups] | None = None

    def _cpu(self) -> accel.HostFacts:
        return accel.HostFacts(frozenset({"vmx"}) if self.kvm else frozenset(), self.kvm)

    def facts(self, accelerator: str | None) -> HostFacts:
        return HostFacts(self.cpus, self.memory_bytes, accel.choose(self._cpu(), accelerator))

    def available_memory(self) -> int:
        return self.available

    def check_accelerator(self, name: str) -> None:
        accel.choose(self._cpu(), name)

    def cgroups(self, parent: str) -> Cgroups:
        if self.cgroups_of is None:
            return NoCgroups("the test host has no cgroups")
        return self.cgroups_of(parent)
