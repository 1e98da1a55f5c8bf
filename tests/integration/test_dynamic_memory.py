"""Dynamic memory for real (TCG, the tiny guest): virtio-mem above the startup memory,
the balloon below it, driven by the host service's balancer.

One guest (Generation 1: its virtio-mem device sits on a fixed slot) fills a tmpfs step
by step and its assigned memory rises to cover demand plus buffer without passing the
maximum; it frees it and the assigned memory falls back to the minimum; the bounds
change while it runs as Hyper-V allows, and not otherwise. Then two guests with
different weights, on a service whose VMs may have little memory together
(``--memory-limit``), get memory in weight order.

Every wait is on a condition with a generous deadline (TCG on a loaded machine); the
guest is never asked to hold more than the host has already given it (each step writes
a third of its free headroom), so it never meets the OOM killer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hvstack.client import ApiError, Client
from tests.integration.hostproc import BOOT_TIMEOUT, HostProcess, running_host

pytestmark = pytest.mark.integration
READY = "hvstack-tiny: ready"
MIB = 1024 * 1024
WAIT = 180.0  # per condition: generous, the machine is loaded


def view(host: HostProcess, name: str) -> dict[str, Any]:
    with Client(f"unix:{host.socket}") as api:
        vm: dict[str, Any] = api.memory(name)
        return vm


def wait_for(host: HostProcess, name: str, what: str,
             condition: Callable[[dict[str, Any]], bool], timeout: float = WAIT,
             seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Poll the VM's memory until ``condition`` holds; every view polled goes to
    ``seen`` (to check an invariant over all of them)."""
    deadline = time.monotonic() + timeout
    while True:
        memory = view(host, name)
        if seen is not None:
            seen.append(memory)
        if memory.get("memory_assigned_bytes") is not None and condition(memory):
            return memory
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: {what} did not happen; last seen {memory}")
        time.sleep(1)


def boot(host: HostProcess, name: str, startup: str, *settings: str) -> None:
    """Create and start a dynamic memory VM (``settings``: more ``hv vm set`` flags);
    :func:`ready` waits for it."""
    host.ok("vm", "create", name, "--generation", "1", "--image", "tiny", "--memory", startup)
    host.ok("vm", "set", name, "--dynamic-memory", *settings)
    host.ok("vm", "start", name)


def ready(host: HostProcess, name: str) -> None:
    host.wait_console(name, READY)
    host.guest(name).wait_ready(BOOT_TIMEOUT)
    host.guest(name).ok("mkdir -p /mnt/fill && mount -t tmpfs -o size=2G fill /mnt/fill")


def settled(m: dict[str, Any]) -> bool:
    """Assigned is demand plus buffer (give or take a few blocks), or a bound."""
    demand, assigned = m["memory_demand_bytes"], m["memory_assigned_bytes"]
    if demand is None:
        return False
    want = demand + demand * m["memory_buffer_percent"] // 100
    want = max(m["memory_minimum_bytes"], min(m["memory_maximum_bytes"], want))
    return abs(assigned - want) <= max(12 * MIB, assigned // 25)  # the policy's hysteresis


def fill(host: HostProcess, name: str, total_mib: int, seen: list[dict[str, Any]]) -> None:
    """Write ``total_mib`` into the guest's tmpfs, each step at most a third of the free
    headroom the host gave it, then wait for the guest to report the new demand and
    the balancer to follow it (headroom again, or the maximum reached)."""
    guest, written, step = host.guest(name), 0, 0
    memory = wait_for(host, name, "assigned memory settling", settled, seen=seen)
    while written < total_mib:
        headroom = (memory["memory_assigned_bytes"] - memory["memory_demand_bytes"]) // MIB
        size = max(2, min(total_mib - written, headroom // 3))
        guest.ok(f"dd if=/dev/zero of=/mnt/fill/{step} bs=1M count={size} 2>/dev/null")
        written, step = written + size, step + 1
        demand = memory["memory_demand_bytes"] + size * MIB * 3 // 4
        memory = wait_for(
            host, name, f"demand above {demand >> 20} MiB followed",
            lambda m, d=demand: m["memory_demand_bytes"] >= d and (
                m["memory_assigned_bytes"] - m["memory_demand_bytes"] >= 8 * MIB
                or m["memory_assigned_bytes"] >= m["memory_maximum_bytes"]), seen=seen)


@pytest.fixture(scope="module", autouse=True)
def quick_rounds() -> Iterator[None]:
    """A balancing round (and a statistics report) every second: the waits below
    follow the balancer, so quicker rounds make a quicker test, nothing else."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HV_MEMORY_INTERVAL", "1")
        yield


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, tiny_image: Path) -> Iterator[HostProcess]:
    with running_host(tmp_path_factory.mktemp("dynmem") / "data", tiny_image) as service:
        yield service


def test_memory_follows_demand_within_the_bounds(host: HostProcess) -> None:
    boot(host, "dyn", "256M", "--memory-min", "128M", "--memory-max", "384M",
         "--memory-buffer", "20")
    ready(host, "dyn")
    assert "virtio_mem" in host.guest("dyn").ok("ls /sys/bus/virtio/drivers/")
    seen: list[dict[str, Any]] = []

    # Idle, it gives back what it does not use (the balloon inflates below startup).
    idle = wait_for(host, "dyn", "giving memory back",
                    lambda m: m["memory_demand_bytes"] is not None and settled(m)
                    and m["memory_assigned_bytes"] < 256 * MIB, seen=seen)

    # Into tmpfs until demand plus buffer passes the maximum: assigned covers it
    # (virtio-mem plugs above startup) and stops at the maximum.
    fill(host, "dyn", 330 - idle["memory_demand_bytes"] // MIB, seen)
    full = wait_for(host, "dyn", "reaching the maximum",
                    lambda m: m["memory_demand_bytes"] * 6 // 5 >= 384 * MIB and settled(m),
                    seen=seen)
    assert full["memory_status"] in ("Low", "OK"), full
    mem_total = host.guest("dyn").ok("grep MemTotal /proc/meminfo").split()[1]
    assert int(mem_total) * 1024 > 256 * MIB  # virtio-mem plugged memory into the guest

    # Freed, it falls back below startup (virtio-mem unplugs, the balloon inflates).
    host.guest("dyn").ok("rm -f /mnt/fill/*")
    wait_for(host, "dyn", "falling back", lambda m: settled(m)
             and m["memory_assigned_bytes"] < 256 * MIB, seen=seen)
    assert max(m["memory_assigned_bytes"] for m in seen) <= 384 * MIB

    # While it runs: the minimum only down, the maximum only up; on/off needs Off.
    host.ok("vm", "set", "dyn", "--memory-max", "512M", "--memory-min", "96M")
    shown = view(host, "dyn")
    assert (shown["memory_minimum_bytes"], shown["memory_maximum_bytes"]) == (96 * MIB,
                                                                              512 * MIB)
    raised = host.hv("vm", "set", "dyn", "--memory-min", "200M")
    assert raised.returncode == 2 and "cannot raise the minimum memory" in raised.stderr
    off = host.hv("vm", "set", "dyn", "--no-dynamic-memory")
    assert off.returncode == 2 and "only while the VM is Off" in off.stderr
    with Client(f"unix:{host.socket}") as api, pytest.raises(ApiError) as refused:
        api.set_memory("dyn", maximum="256M")
    assert refused.value.status == 409
    host.ok("vm", "stop", "dyn", "--turn-off")


def test_weights_order_the_memory_of_a_short_host(tmp_path: Path, tiny_image: Path) -> None:
    # Two VMs whose demand plus buffer do not both fit in what the host lets its VMs
    # have (560 MiB), though their demands do: the heavier one gets its buffer.
    with running_host(tmp_path / "data", tiny_image,
                      extra_args=("--memory-limit", "560M")) as small:
        for name, weight in (("heavy", "10000"), ("light", "100")):
            boot(small, name, "224M", "--memory-min", "192M", "--memory-max", "512M",
                 "--memory-buffer", "50", "--memory-weight", weight)
        for name in ("heavy", "light"):
            ready(small, name)
        for name in ("heavy", "light"):
            fill(small, name, 40, [])
        heavy = wait_for(small, "heavy", "the heavy VM keeping its buffer", settled)
        light = wait_for(small, "light", "the light VM short of its buffer",
                         lambda m: not settled(m)
                         and m["memory_assigned_bytes"] >= m["memory_demand_bytes"])
        assert heavy["memory_assigned_bytes"] > light["memory_assigned_bytes"], (heavy, light)
        with Client(f"unix:{small.socket}") as api:
            info = api.host_info()
        assert info["memory_limit_bytes"] == 560 * MIB
        assert info["memory_assigned_bytes"] <= 560 * MIB
        for name in ("heavy", "light"):
            small.ok("vm", "stop", name, "--turn-off")
