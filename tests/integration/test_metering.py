"""Resource metering with one real tiny guest under TCG: metering enabled while the VM is
Off counts its whole run; a known write to the guest's disk and a known transfer over
an internal switch show in the totals (``hv vm metering show``) and in ``/metrics``.

The host service runs in a network namespace of its own (its switch's bridge and the
VM's tap live there). The guest writes 32 MiB with fsync to its data partition (the
disk write total must grow by at least that) and pings the switch's host address with
30000-byte payloads (each echo request leaves the VM, each reply comes in: both
directions grow by at least the payloads counted). Waits poll with generous deadlines.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hvstack.client import Client
from tests.integration.hostproc import HostProcess
from tests.integration.netns import lab
from tests.integration.switching import (
    boot,
    create_vm,
    host_in_namespace,
    ifname,
    mac_on,
    static,
    wait_ping,
)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
HOST_ADDRESS, GUEST_ADDRESS = "192.168.57.1", "192.168.57.2"
PAYLOAD, PINGS = 30000, 3


def measure(host: HostProcess, name: str) -> dict[str, Any]:
    view: dict[str, Any] = host.json("vm", "metering", "show", name)
    return view


def adapter(view: dict[str, Any], mac: str) -> dict[str, Any]:
    found: dict[str, Any] = next(a for a in view["adapters"] if a["mac"] == mac)
    return found


def test_metering_counts_a_known_disk_write_and_network_transfer(
        tmp_path: Path, tiny_image: Path) -> None:
    started = time.monotonic()
    with lab() as made, host_in_namespace(made, tmp_path, tiny_image) as (host, _):
        host.ok("switch", "create", "int", "--type", "internal", "--subnet",
                "192.168.57.0/24")
        create_vm(host, "metered", "int")
        assert host.hv("vm", "metering", "show", "metered").returncode == 2
        host.ok("vm", "metering", "enable", "metered")  # while Off
        guest = boot(host, "metered")["metered"]
        mac = mac_on(host, "metered", "int")
        static(guest, ifname(guest, mac), f"{GUEST_ADDRESS}/24")
        wait_ping(guest, HOST_ADDRESS)

        before = measure(host, "metered")
        assert before["cpu_seconds"] > 0  # the boot, counted whole
        assert before["memory_max_bytes"] == 192 * MIB
        guest.ok("dd if=/dev/zero of=/data/metered bs=1M count=32 conv=fsync 2>/dev/null")
        after_disk = measure(host, "metered")
        written = after_disk["disk_written_bytes"] - before["disk_written_bytes"]
        assert written >= 32 * MIB, after_disk

        out = guest.ok(f"ping -c {PINGS} -s {PAYLOAD} -W 5 {HOST_ADDRESS}", timeout=120)
        counted = re.search(r"(\d+) packets received", out)
        assert counted is not None and int(counted.group(1)) >= 1, out
        replies = int(counted.group(1))
        after = measure(host, "metered")
        sent = adapter(after, mac)["sent_bytes"] - adapter(after_disk, mac)["sent_bytes"]
        received = (adapter(after, mac)["received_bytes"]
                    - adapter(after_disk, mac)["received_bytes"])
        assert sent >= PINGS * PAYLOAD, after
        assert received >= replies * PAYLOAD, after
        assert after["network_sent_bytes"] >= before["network_sent_bytes"] + PINGS * PAYLOAD
        assert after["cpu_seconds"] > before["cpu_seconds"]
        assert after["cpu_average_percent"] > 0
        print(f"metered: disk written +{written}, sent +{sent}, received +{received} "
              f"({replies} replies), cpu {after['cpu_seconds']:.1f} s "
              f"({after['cpu_average_percent']:.0f} % while running)")

        with Client(f"unix:{host.socket}") as api:
            text = api.metrics()
        found = {f.name: f for f in text_string_to_metric_families(text)}
        vm_id = host.vm("metered")["id"]

        def value(family: str, **labels: str) -> float:
            return float(next(s.value for s in found[family].samples
                              if s.labels.get("id") == vm_id
                              and all(s.labels.get(k) == v for k, v in labels.items())))

        assert value("hvstack_vm_state", state="Running") == 1
        assert value("hvstack_vm_cpu_seconds") >= after["cpu_seconds"]
        assert value("hvstack_vm_disk_written_bytes") >= 32 * MIB
        assert value("hvstack_vm_network_transmit_bytes", adapter=mac) >= PINGS * PAYLOAD
        assert value("hvstack_vm_memory_assigned_bytes") == 192 * MIB
        host.ok("vm", "stop", "metered", "--turn-off")
    print(f"test_metering: {time.monotonic() - started:.1f} s")
