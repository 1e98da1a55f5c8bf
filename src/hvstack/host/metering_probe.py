"""The host's own counters that metering reads: a process's CPU time, a tap's bytes.

:class:`CounterProbe` is the interface (injected, so tests fix the numbers);
:class:`LinuxCounters` reads ``/proc/<pid>/stat`` (user plus system time of every
thread of the process, in clock ticks, and its start time) and
``/sys/class/net/<tap>/statistics``. A tap's ``tx_bytes`` is what it sent into the VM
(the VM received it), its ``rx_bytes`` what the VM sent: the returned
:class:`~hvstack.metering.model.Traffic` is in the VM's direction. Each read is a small
file; None when the process or the tap is gone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hvstack.metering.model import Traffic

SYS_NET = Path("/sys/class/net")


@dataclass(frozen=True)
class ProcessTimes:
    identity: str  # "<pid>:<start time in ticks since boot>"
    started_at: float  # seconds since the epoch
    cpu_seconds: float  # user + system time of all its threads


class CounterProbe(Protocol):
    def process(self, pid: int) -> ProcessTimes | None: ...
    def tap(self, name: str) -> Traffic | None: ...


def parse_stat(text: str, pid: int, ticks_per_second: int, boot_time: float) -> ProcessTimes:
    """``/proc/<pid>/stat``: the command name (field 2) may hold spaces and ')', so the
    fields are counted after its last ')'; utime, stime and starttime are fields 14, 15
    and 22."""
    fields = text.rpartition(")")[2].split()
    utime, stime, start = int(fields[11]), int(fields[12]), int(fields[19])
    return ProcessTimes(f"{pid}:{start}", boot_time + start / ticks_per_second,
                        (utime + stime) / ticks_per_second)


class LinuxCounters:
    def __init__(self, proc: Path = Path("/proc"), sys_net: Path = SYS_NET) -> None:
        self._proc = proc
        self._sys_net = sys_net
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._boot_time: float | None = None

    def _booted(self) -> float:
        # /proc/uptime has hundredths of a second; /proc/stat's btime whole seconds.
        if self._boot_time is None:
            uptime = float((self._proc / "uptime").read_text().split()[0])
            self._boot_time = time.time() - uptime
        return self._boot_time

    def process(self, pid: int) -> ProcessTimes | None:
        try:
            text = (self._proc / str(pid) / "stat").read_text()
            return parse_stat(text, pid, self._ticks, self._booted())
        except (OSError, ValueError, IndexError):
            return None

    def tap(self, name: str) -> Traffic | None:
        statistics = self._sys_net / name / "statistics"
        try:
            sent_to_vm = int((statistics / "tx_bytes").read_text())
            from_vm = int((statistics / "rx_bytes").read_text())
        except (OSError, ValueError):
            return None
        return Traffic(received=sent_to_vm, sent=from_vm)
