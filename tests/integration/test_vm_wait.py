"""``hv vm wait`` and ``hv vm stop --discard-saved-state`` on the tiny guest under QEMU:
the heartbeat and the address the guest's DHCP client got from QEMU's user-mode NAT
(10.0.2.15), and a saved VM turned Off without starting it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.hostproc import BOOT_TIMEOUT, HostProcess

pytestmark = pytest.mark.integration
WAIT = str(int(BOOT_TIMEOUT))


def test_wait_for_heartbeat_then_ip_then_off(host: HostProcess) -> None:
    host.ok("vm", "create", "waiter", "--generation", "1", "--image", "tiny",
            "--memory", "256M")
    host.ok("vm", "start", "waiter")
    # Straight after the start: the guest is still booting, nothing answers yet.
    assert host.ok("vm", "wait", "waiter", "--for", "heartbeat", "--timeout", WAIT) == (
        "VM 'waiter' is Running, heartbeat OK\n")
    reached = host.json("vm", "wait", "waiter", "--for", "ip", "--timeout", WAIT)
    assert "10.0.2.15" in reached["ip_addresses"], reached
    host.ok("vm", "stop", "waiter", "--turn-off")
    assert host.ok("vm", "wait", "waiter", "--for", "off", "--timeout", "5") == (
        "VM 'waiter' is Off\n")
    late = host.hv("vm", "wait", "waiter", "--for", "running", "--timeout", "0.5")
    assert late.returncode == 2
    assert late.stderr.strip() == (
        "error: VM 'waiter' was not Running within 0.5 s (it is Off)")


def test_discard_saved_state_turns_a_saved_vm_off(host: HostProcess) -> None:
    host.ok("vm", "create", "saved", "--generation", "1", "--image", "tiny",
            "--memory", "256M")
    host.ok("vm", "start", "saved")
    host.ok("vm", "wait", "saved", "--for", "heartbeat", "--timeout", WAIT)
    guest = host.guest("saved")
    assert guest.sh("echo before-save > /run/marker")[0] == 0
    host.ok("vm", "save", "saved")
    view = host.vm("saved")
    state_file = Path(view["folder"], "saved-state.bin")
    assert view["state"] == "Saved" and state_file.stat().st_size > 0

    out = host.ok("vm", "stop", "saved", "--discard-saved-state")
    assert "VM is Off (saved state discarded)" in out
    view = host.vm("saved")
    assert (view["state"], view["pid"]) == ("Off", None)
    assert not state_file.exists()

    before = len(host.console("saved"))
    host.ok("vm", "start", "saved")
    host.wait_console("saved", "Linux version", after=before)  # a fresh boot
    host.ok("vm", "wait", "saved", "--for", "heartbeat", "--timeout", WAIT)
    code, out = guest.sh("cat /run/marker 2>/dev/null || echo fresh")
    assert (code, out.strip()) == (0, "fresh")
    host.ok("vm", "stop", "saved", "--turn-off")
