"""Processor resource controls for real, in one boot of the tiny guest (TCG): a busy
loop in the guest, the QEMU process's CPU use measured from /proc/<pid>/stat without a
limit, with a limit of 25 % and without it again; the cgroup holds the process with the
right values while it runs, again after the service was killed and restarted, and is
gone after the VM stops.

CPU use is measured over windows of a few seconds (utime + stime of all QEMU's threads);
the limit is a hard quota, so the limited use is asserted against it. That the limit is
what holds the guest back is checked against the same guest's unlimited use in the same
test, and only when the host gave it at least half a processor then (a loaded 2-core
machine may not).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from hvstack.host.processor_controls import parent_name
from hvstack.network.names import service_tag
from hvstack.resources.cgroups import Cgroups, probe
from tests.integration.hostproc import BOOT_TIMEOUT, HostProcess

pytestmark = pytest.mark.integration
NAME = "cpulimit"
WINDOW = 2.5  # seconds per measurement window
WINDOWS = 2
BUSY = "(while :; do :; done) </dev/null >/dev/null 2>&1 &"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def usage(pid: int) -> float:
    """The highest share of one host processor the process used in a few windows."""
    shares = []
    for _ in range(WINDOWS):
        start_cpu, start = cpu_seconds(pid), time.monotonic()
        time.sleep(WINDOW)  # a measurement window, not a wait for something
        shares.append((cpu_seconds(pid) - start_cpu) / (time.monotonic() - start))
    return max(shares)


def wait_until(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def set_limit(host: HostProcess, limit: int) -> dict[str, Any]:
    view: dict[str, Any] = host.json("vm", "set", NAME, "--processor-limit", str(limit))
    assert view["processor_limit_percent"] == limit
    assert (view["processor_controls"], view["processor_controls_in_force"]) == (
        "in force", True), view
    return view


def test_a_cpu_limit_holds_a_busy_guest_back(host: HostProcess) -> None:
    started = time.monotonic()
    cgroups: Cgroups = probe(parent_name(service_tag(str(host.data_dir))))
    assert cgroups.unusable() is None, f"this machine's cgroups: {cgroups.summary()}"
    info = host.json("host", "info")
    assert info["processor_controls"] == cgroups.summary()

    host.ok("vm", "create", NAME, "--generation", "1", "--image", "tiny", "--memory", "256M",
            "--cpus", "1")
    host.ok("vm", "start", NAME)
    view = host.vm(NAME)
    vm_id, pid = view["id"], view["pid"]
    assert view["processor_controls_in_force"] is True
    controls = cgroups.read(vm_id)
    assert controls is not None and (controls.quota_us, controls.weight) == (None, 100)
    assert cgroups.pids(vm_id) == [pid]

    deadline = time.monotonic() + BOOT_TIMEOUT
    while host.hv("vm", "exec", NAME, "--", "true").returncode != 0:
        assert time.monotonic() < deadline, "the guest agent did not answer"
        time.sleep(1)
    host.ok("vm", "exec", NAME, "--", "sh", "-c", BUSY)

    unlimited = usage(pid)
    set_limit(host, 25)
    controls = cgroups.read(vm_id)
    assert controls is not None and (controls.quota_us, controls.period_us) == (25_000, 100_000)
    limited = usage(pid)

    # The service killed and started again finds the cgroup and puts the settings back.
    host.kill9()
    host.start()
    view = host.vm(NAME)
    assert (view["state"], view["pid"], view["processor_controls_in_force"]) == (
        "Running", pid, True)
    assert cgroups.pids(vm_id) == [pid]

    set_limit(host, 100)
    controls = cgroups.read(vm_id)
    assert controls is not None and controls.quota_us is None
    raised = usage(pid)
    print(f"CPU use of one host processor: unlimited {unlimited:.2f}, limited to 25 % "
          f"{limited:.2f}, limit raised to 100 % {raised:.2f}")

    assert limited <= 0.40, f"a 25 % limit let the guest use {limited:.0%} of a processor"
    if max(unlimited, raised) >= 0.5:  # the host had room to show the difference
        assert limited < 0.6 * max(unlimited, raised), (unlimited, limited, raised)

    host.ok("vm", "stop", NAME, "--turn-off")
    wait_until(lambda: cgroups.read(vm_id) is None, "the stopped VM's cgroup is removed")
    assert host.vm(NAME)["processor_controls_in_force"] is False
    print(f"module wall time so far: {time.monotonic() - started:.1f} s")
