"""What the dynamic memory benchmarks share: a tiny guest driven through the host
service's API (start, ``exec`` through its agent, its memory as the API reports it), and
the signs in its console that it ran out of memory.

Sizes are bytes unless a name says MiB. Every wait has a deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.support import JOB_TIMEOUT, ServiceProcess
from hvstack.client import ApiError, url_path

MIB = 1024 * 1024
BLOCK = 2 * MIB  # the virtio-mem block, the balancer's unit
BOOT_TIMEOUT = 300.0
POLL = 0.1  # seconds between readings of the API's VM view
OOM_SIGNS = ("Out of memory", "Kernel panic", "invoked oom-killer", "alloc failure")


@dataclass(frozen=True)
class Reading:
    """A VM's memory as the API's view gives it (None until the balancer read it)."""

    time: float  # time.monotonic() when read
    assigned: int | None
    demand: int | None
    status: str | None
    reason: str
    heartbeat: str | None


def read(service: ServiceProcess, name: str) -> Reading:
    view = service.client.get(url_path("vms", name))
    return Reading(time.monotonic(), view.get("memory_assigned_bytes"),
                   view.get("memory_demand_bytes"), view.get("memory_status"),
                   view.get("memory_status_reason") or "", view.get("heartbeat"))


def exec_in(service: ServiceProcess, name: str, script: str,
            timeout: float = 300.0) -> dict[str, Any]:
    """Run ``sh -c script`` in the guest; RuntimeError unless it exits 0."""
    result: dict[str, Any] = service.client.post(
        url_path("vms", name, "exec"),
        {"command": ["sh", "-c", script], "timeout_seconds": timeout}, timeout=timeout + 30)
    if result.get("exit_code") != 0:
        raise RuntimeError(f"in VM {name}, {script!r} failed: {result}")
    return result


def start(service: ServiceProcess, name: str) -> None:
    """Start VM ``name`` and wait until its guest agent runs commands."""
    service.client.wait_job(service.client.post(url_path("vms", name, "start")),
                            timeout=JOB_TIMEOUT)
    wait_agent(service, name)


def wait_agent(service: ServiceProcess, name: str, timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if read(service, name).heartbeat == "OK":
                exec_in(service, name, "true", timeout=30)
                return
        except (ApiError, RuntimeError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest agent of VM {name} did not answer within "
                               f"{timeout:.0f} s{died(service, name)}")
        time.sleep(1)


def console_log(service: ServiceProcess, name: str) -> Path:
    return Path(service.client.get(url_path("vms", name))["folder"]) / "console.log"


def oom_lines(service: ServiceProcess, name: str) -> list[str]:
    """The console's lines that say the guest ran out of memory."""
    try:
        text = console_log(service, name).read_text(errors="replace")
    except (OSError, ApiError):
        return []
    return [line.strip() for line in text.splitlines() if any(s in line for s in OOM_SIGNS)]


def died(service: ServiceProcess, name: str) -> str:
    """'' or a clause saying the guest ran out of memory (for an error message)."""
    lines = oom_lines(service, name)
    return f"; its console: {lines[0]} ... {lines[-1]}" if lines else ""


def wait_settled(service: ServiceProcess, name: str, timeout: float,
                 quiet: float = 8.0) -> Reading:
    """Wait until the balancer knows the guest's demand and its assigned memory has
    not moved by more than a block for ``quiet`` seconds (a few balancing rounds);
    return the last reading. TimeoutError (with the last reading) if it never is."""
    deadline = time.monotonic() + timeout
    since: Reading | None = None
    while True:
        now = read(service, name)
        if now.assigned is None or now.demand is None:
            since = None
        elif since is None or abs(now.assigned - (since.assigned or 0)) > BLOCK:
            since = now
        elif now.time - since.time >= quiet:
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"VM {name}'s memory did not settle within {timeout:.0f} s "
                               f"(last: {describe(now)}){died(service, name)}")
        time.sleep(0.5)


def describe(reading: Reading) -> str:
    def mib(value: int | None) -> str:
        return "unknown" if value is None else f"{value / MIB:.0f} MiB"

    text = (f"assigned {mib(reading.assigned)}, demand {mib(reading.demand)}, "
            f"status {reading.status}")
    return text + (f" ({reading.reason})" if reading.reason else "")
