"""The data of resource metering: what one sample reads, what the totals keep.

A :class:`Sample` is the raw, cumulative counters of one VM at one moment: its worker
process's CPU time (the process is named by :attr:`Sample.process`, its pid and start
time, so a restarted QEMU is told apart from a continued one), the bytes read and
written through each block device, the bytes through each adapter's tap, and the
memory assigned to it. :class:`Totals` is what metering has added up since it was
enabled or last reset, with the last sample it added (the base of the next deltas);
it is what the store keeps (``to_json``/``from_json``).

Directions are the VM's: an adapter's ``received`` is what came in to the VM (its
tap's transmitted bytes), ``sent`` what the VM sent out (the tap's received bytes).
An adapter without counters (QEMU's user-mode NAT, inside the QEMU process) is in a
sample with ``None``: it is reported as not metered, never as zero.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Traffic:
    """Bytes through one adapter, in the VM's direction."""

    received: int = 0
    sent: int = 0


@dataclass(frozen=True)
class DiskIo:
    """Bytes through one block device."""

    read: int = 0
    written: int = 0


def _no_disks() -> Mapping[str, DiskIo]:
    return {}


def _no_adapters() -> Mapping[str, Traffic | None]:
    return {}


@dataclass(frozen=True)
class Sample:
    """The raw counters of one VM's worker at ``at`` (seconds since the epoch)."""

    at: float
    process: str  # "<pid>:<start time in clock ticks>": one QEMU process's identity
    process_started_at: float  # seconds since the epoch
    cpu_seconds: float
    memory_bytes: int
    disks: Mapping[str, DiskIo] = field(default_factory=_no_disks)  # by device id
    adapters: Mapping[str, Traffic | None] = field(default_factory=_no_adapters)  # by MAC

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "process": self.process,
                "process_started_at": self.process_started_at,
                "cpu_seconds": self.cpu_seconds, "memory_bytes": self.memory_bytes,
                "disks": {k: [v.read, v.written] for k, v in self.disks.items()},
                "adapters": {k: None if v is None else [v.received, v.sent]
                             for k, v in self.adapters.items()}}

    @staticmethod
    def from_json(raw: Mapping[str, Any]) -> Sample:
        return Sample(float(raw["at"]), str(raw["process"]),
                      float(raw["process_started_at"]), float(raw["cpu_seconds"]),
                      int(raw["memory_bytes"]),
                      {k: DiskIo(int(v[0]), int(v[1])) for k, v in raw["disks"].items()},
                      {k: None if v is None else Traffic(int(v[0]), int(v[1]))
                       for k, v in raw["adapters"].items()})


def _no_traffic() -> Mapping[str, Traffic | None]:
    return {}


@dataclass(frozen=True)
class Totals:
    """What metering added up since ``started_at`` (enabled or last reset).

    ``running_seconds`` is the time the samples cover while the VM ran;
    ``memory_byte_seconds`` the assigned memory integrated over that time (its
    average is the quotient). ``adapters`` maps each MAC seen to its traffic, or None
    for an adapter without counters. ``last`` is the sample the next one is measured
    from (None: no process seen since ``started_at``). ``baseline_pending``: the VM
    ran when metering began but its counters could not be read; the next sample of
    that process is only the base.
    """

    started_at: float
    cpu_seconds: float = 0.0
    running_seconds: float = 0.0
    disk_read_bytes: int = 0
    disk_written_bytes: int = 0
    memory_byte_seconds: float = 0.0
    memory_min_bytes: int | None = None
    memory_max_bytes: int | None = None
    adapters: Mapping[str, Traffic | None] = field(default_factory=_no_traffic)
    last: Sample | None = None
    baseline_pending: bool = False

    def to_json(self) -> str:
        return json.dumps({
            "started_at": self.started_at, "cpu_seconds": self.cpu_seconds,
            "running_seconds": self.running_seconds,
            "disk_read_bytes": self.disk_read_bytes,
            "disk_written_bytes": self.disk_written_bytes,
            "memory_byte_seconds": self.memory_byte_seconds,
            "memory_min_bytes": self.memory_min_bytes,
            "memory_max_bytes": self.memory_max_bytes,
            "adapters": {k: None if v is None else [v.received, v.sent]
                         for k, v in self.adapters.items()},
            "last": None if self.last is None else self.last.to_json(),
            "baseline_pending": self.baseline_pending,
        }, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Totals:
        raw: dict[str, Any] = json.loads(text)
        return Totals(
            started_at=float(raw["started_at"]), cpu_seconds=float(raw["cpu_seconds"]),
            running_seconds=float(raw["running_seconds"]),
            disk_read_bytes=int(raw["disk_read_bytes"]),
            disk_written_bytes=int(raw["disk_written_bytes"]),
            memory_byte_seconds=float(raw["memory_byte_seconds"]),
            memory_min_bytes=raw["memory_min_bytes"], memory_max_bytes=raw["memory_max_bytes"],
            adapters={k: None if v is None else Traffic(int(v[0]), int(v[1]))
                      for k, v in raw["adapters"].items()},
            last=None if raw["last"] is None else Sample.from_json(raw["last"]),
            baseline_pending=bool(raw.get("baseline_pending", False)),
        )


@dataclass(frozen=True)
class AdapterReport:
    mac: str
    metered: bool  # False: no counters (user-mode NAT); the byte counts are then None
    received_bytes: int | None
    sent_bytes: int | None


@dataclass(frozen=True)
class Report:
    """Measure-VM's answer: the totals as a user reads them, at ``at``."""

    started_at: float
    at: float
    duration_seconds: float  # since enabled or last reset
    running_seconds: float  # of it, covered by samples while the VM ran
    cpu_seconds: float
    cpu_average_percent: float | None  # of one host CPU, while it ran
    memory_average_bytes: int | None
    memory_min_bytes: int | None
    memory_max_bytes: int | None
    disk_read_bytes: int
    disk_written_bytes: int
    network_received_bytes: int  # of the metered adapters
    network_sent_bytes: int
    adapters: tuple[AdapterReport, ...]
