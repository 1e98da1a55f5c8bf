"""Shared steps of the virtual switch scenario tests: a host service in its own network
namespace, tiny VMs on switches, and what a guest sees of its adapters.

Every switch and adapter operation goes through the ``hv`` CLI as a user types it;
the guest is driven through ``hv vm exec`` (the service's exec API). Waits poll with
generous deadlines (TCG on a loaded 2-core machine); nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.integration.hostproc import BOOT_TIMEOUT, Guest, HostProcess, running_host
from tests.integration.netns import WAIT, Lab, Namespace, wait_until

READY = "hvstack-tiny: ready"


@contextlib.contextmanager
def host_in_namespace(lab: Lab, tmp: Path, tiny_image: Path,
                      extra_args: tuple[str, ...] = ("--default-switch", "none"),
                      ) -> Iterator[tuple[HostProcess, Namespace]]:
    """A host service inside a new namespace (its 'host' network) of ``lab``."""
    space = lab.namespace("host")
    with running_host(tmp / "data", tiny_image, netns=space.name,
                      extra_args=extra_args) as host:
        yield host, space


def create_vm(host: HostProcess, name: str, *switches: str, generation: int = 1,
              extra: tuple[str, ...] = ()) -> None:
    """A tiny VM with one adapter on each of ``switches`` (in that order)."""
    args = ["vm", "create", name, "--generation", str(generation), "--image", "tiny",
            "--memory", "192M", "--auto-stop", "turn-off"]
    for switch in switches:
        args += ["--switch", switch]
    if not switches:
        args.append("--no-network")
    host.ok(*args, *extra)


def boot(host: HostProcess, *names: str) -> dict[str, Guest]:
    """Start the VMs (all at once), then wait until each one's agent answers."""
    for name in names:
        host.ok("vm", "start", name)
    guests = {name: host.guest(name) for name in names}
    for name, guest in guests.items():
        host.wait_console(name, READY)
        wait_until(lambda g=guest: g.sh("true")[0] == 0, BOOT_TIMEOUT,
                   f"the agent of {name} never answered")
    return guests


def adapters(host: HostProcess, vm: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = host.vm(vm)["network_adapters"]
    return found


def mac_on(host: HostProcess, vm: str, switch: str) -> str:
    """The MAC of ``vm``'s (first) adapter on ``switch`` (a switch name)."""
    for nic in adapters(host, vm):
        if switch in (nic.get("switch_name"), nic.get("switch")):
            return str(nic["mac"])
    raise AssertionError(f"{vm} has no adapter on {switch}: {adapters(host, vm)}")


def ifname(guest: Guest, mac: str) -> str:
    return guest.ok(f"hvstack-ifname {mac}").strip()


def guest_ipv4(guest: Guest, iface: str) -> list[str]:
    out = guest.ok(f"ip -4 -o addr show dev {iface}")
    return re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out)


def wait_dhcp(guest: Guest, iface: str, timeout: float = WAIT) -> str:
    """The first IPv4 address DHCP gives ``iface``."""
    found: list[str] = wait_until(lambda: guest_ipv4(guest, iface), timeout,
                                  f"{guest.name} got no address on {iface}")
    return found[0]


def static(guest: Guest, iface: str, address: str, gateway: str = "") -> None:
    guest.ok(f"hvstack-static {iface} {address} {gateway}")


def pings(guest: Guest, address: str, count: int = 1, wait: int = 2) -> bool:
    code, _ = guest.sh(f"ping -c {count} -W {wait} {address}", timeout=count * wait + 60)
    return code == 0


def wait_ping(guest: Guest, address: str, timeout: float = WAIT) -> None:
    wait_until(lambda: pings(guest, address), timeout, f"{guest.name} cannot ping {address}")


def no_ping(guest: Guest, address: str) -> bool:
    """True when three pings, two seconds each, all go unanswered."""
    return not pings(guest, address, count=3, wait=2)


def shown_ips(host: HostProcess, vm: str, mac: str) -> list[str]:
    for nic in adapters(host, vm):
        if nic["mac"] == mac:
            return list(nic.get("ip_addresses") or [])
    return []


def fails_cleanly(host: HostProcess, *args: str) -> str:
    """Run a CLI command that must be refused: exit 2 and a one-line message."""
    result = host.hv(*args)
    assert result.returncode == 2, (args, result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, (args, result.stderr)
    assert "unexpected" not in lines[0], (args, lines[0])  # a crash, not a refusal
    print(f"hv {' '.join(args)}: {lines[0]}")
    return lines[0]


def switches(host: HostProcess) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(host.ok("switch", "list", "-o", "json"))
    return listed


def rx_packets(guest: Guest, iface: str) -> int:
    return int(guest.ok(f"cat /sys/class/net/{iface}/statistics/rx_packets"))
