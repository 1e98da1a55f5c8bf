"""Heartbeat, time synchronisation and shutdown through the guest agent, for real."""

from __future__ import annotations

import time

import pytest

from tests.integration.hostproc import HostProcess

pytestmark = pytest.mark.integration
READY = "hvstack-tiny: ready"


def wait_for(predicate: object, what: str, timeout: float = 120) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_heartbeat_time_sync_and_agent_shutdown(host: HostProcess) -> None:
    host.ok("vm", "create", "agent", "--generation", "1", "--image", "tiny",
            "--memory", "256M")
    host.ok("vm", "start", "agent")
    host.wait_console("agent", READY)
    wait_for(lambda: host.vm("agent")["heartbeat"] == "OK", "heartbeat OK")
    view = host.vm("agent")
    services = view["integration_services"]
    assert services["heartbeat"]["status"] == "OK"
    assert services["shutdown"]["status"] == "OK"
    assert services["guest_services"] == {"enabled": False, "status": "Disabled"}
    assert "OK" in host.ok("vm", "list")

    # Time synchronisation: the guest clock is set from the host's after a resume.
    agent = host.guest("agent")
    code, _ = agent.sh("date -s '2001-02-03 04:05:06' >/dev/null")
    assert code == 0
    assert int(agent.sh("date +%s")[1]) < 1_000_000_000
    host.ok("vm", "pause", "agent")
    host.ok("vm", "resume", "agent")
    wait_for(lambda: abs(int(agent.sh("date +%s")[1]) - time.time()) < 120,
             "the guest clock to be set from the host")

    # Disabling a service shows at once; the heartbeat keeps its own status.
    host.ok("vm", "set", "agent", "--disable", "time-sync", "--enable", "guest-services")
    services = host.vm("agent")["integration_services"]
    assert services["time_sync"] == {"enabled": False, "status": "Disabled"}
    assert services["guest_services"]["enabled"] is True

    # Kill the agent in the guest: the heartbeat turns to Lost Communication.
    agent.sh("(sleep 1; killall qemu-ga) >/dev/null 2>&1 &")
    wait_for(lambda: host.vm("agent")["heartbeat"] == "Lost Communication",
             "Lost Communication")
    # Without the agent, stop falls back to the ACPI power button.
    result = host.ok("vm", "stop", "agent", "--timeout", "120")
    assert "ACPI power button" in result

    # With the agent, stop asks it to shut the guest down.
    host.ok("vm", "start", "agent")
    wait_for(lambda: host.vm("agent")["heartbeat"] == "OK", "heartbeat OK again")
    result = host.ok("vm", "stop", "agent", "--timeout", "120")
    assert "guest agent" in result
    assert host.vm("agent")["state"] == "Off"
    assert host.vm("agent")["heartbeat"] is None
