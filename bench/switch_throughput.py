"""Two VMs on a private switch against the same two VMs on a Linux bridge made by hand.

Everything happens in a network namespace of its own (needs root). Two Generation 1
tiny VMs (256 MiB, TCG) are created by a host service in that namespace, each with one
adapter on a private switch whose ports have the guards on (MAC spoofing protection,
DHCP guard, router guard) and one ACL each (deny 192.0.2.0/24: it matches nothing
here, but every frame goes through the port's rules). Then:

* switch: the service starts them; guests get 10.90.0.1 and .2 through ``hv vm exec``.
* bridge by hand (baseline): the VMs are turned off, the service stopped and its
  nftables rules removed; a bridge
  and two persistent taps are made with ``ip``; each VM's QEMU command line, read from
  ``/proc/PID/cmdline`` while the service ran it, is run again by hand with only the
  tap netdev's ``fd=`` replaced by ``ifname=`` (same devices, MACs, disks, options).
  The guests are driven through their agent sockets directly.
* switch again: the service starts (and rebuilds its rules) and the VMs run on the
  switch once more, so load that drifts during the run hits both sides.

In each phase, all measured inside the guests (so the exec path does not count):
throughput of a TCP bulk transfer B -> A (busybox ``httpd`` serves a file from RAM,
``wget`` in A fetches it; time from ``/proc/uptime``)
and ping round trip A -> B (busybox ``ping -q``, its average). Goal: the switch
costs at most 5 % (throughput ratio >= 0.95, latency ratio <= 1.05).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.guest_exec import DirectAgent
from bench.report import Section, Table, ms, ratio, verdict
from bench.support import ServiceProcess, install_tiny_image, median
from hvstack.client import ApiError, url_path
from hvstack.integration.guest_io import POLL_STEADY, POLL_STEPS

GOAL = 0.05
ROUNDS = 2  # a phase; phases: switch, bridge, switch
TRANSFER_BLOCKS = 512  # of 64 KiB: 32 MiB a transfer
PINGS = 20
VMS = ("bench-net-a", "bench-net-b")
ADDRESSES = ("10.90.0.1", "10.90.0.2")
BOOT_TIMEOUT = 300.0
PORT_SETTINGS = {"dhcp_guard": True, "router_guard": True,
                 "acls": [{"action": "deny", "direction": "both", "remote": "192.0.2.0/24"}]}

Shell = Callable[[str, str], str]  # (vm, script) -> stdout; raises unless it exits 0


def _ip(namespace: str, *args: str) -> None:
    subprocess.run(["ip", "-n", namespace, *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def _namespace() -> Iterator[str]:
    name = f"hvbench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        _ip(name, "link", "set", "lo", "up")
        yield name
    finally:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                             timeout=30).stdout
        for pid in out.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


def _measure(shell: Shell, times: dict[str, list[float]], phase: str) -> None:
    a, b = VMS
    shell(a, f"ping -c 3 -W 5 {ADDRESSES[1]} >/dev/null")  # ARP and caches warm
    size = TRANSFER_BLOCKS * 65536
    # B serves a file from RAM with busybox httpd (sendfile); A fetches it with wget.
    # (busybox nc moves 1 KiB a system call: under TCG that, not the network, limits it)
    shell(b, f"mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/big bs=65536 "
             f"count={TRANSFER_BLOCKS} 2>/dev/null && (killall httpd; httpd -p 8000 -h /tmp/www)"
             " </dev/null >/dev/null 2>&1")
    for _ in range(ROUNDS):
        out = shell(a, "set -- $(cat /proc/uptime); t0=$1; "
                       f"got=$(wget -q -O - http://{ADDRESSES[1]}:8000/big | wc -c); "
                       "set -- $(cat /proc/uptime); echo $got $t0 $1")
        got, began, ended = out.split()[-3:]
        if int(got) != size:
            raise RuntimeError(f"wget got {got} bytes of {size}")
        times[f"{phase}-mbit"].append(size * 8 / (float(ended) - float(began)) / 1e6)
        out = shell(a, f"ping -q -c {PINGS} -i 0.2 -W 5 {ADDRESSES[1]}")
        found = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", out)
        if not found:
            raise RuntimeError(f"no round trip in ping's output: {out}")
        times[f"{phase}-rtt"].append(float(found.group(1)) / 1000)


def _api_shell(service: ServiceProcess) -> Shell:
    def shell(vm: str, script: str) -> str:
        result = service.client.post(url_path("vms", vm, "exec"),
                                     {"command": ["/bin/sh", "-c", script],
                                      "timeout_seconds": 300}, timeout=330)
        if result["exit_code"] != 0:
            raise RuntimeError(f"{vm}: `{script}` exited {result['exit_code']}")
        return str(result["stdout"])
    return shell


def _agent_shell(agents: dict[str, DirectAgent]) -> Shell:
    def shell(vm: str, script: str) -> str:
        agent = agents[vm]
        pid = agent.call("guest-exec", {"path": "/bin/sh", "arg": ["-c", script],
                                        "capture-output": True})["pid"]
        deadline, step = time.monotonic() + 300, 0
        # the service's own poll schedule: polling wakes the guest's agent, which
        # costs a TCG guest CPU time during a measurement
        while not (status := agent.call("guest-exec-status", {"pid": pid})).get("exited"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{vm}: `{script}` did not finish")
            time.sleep(POLL_STEPS[step] if step < len(POLL_STEPS) else POLL_STEADY)
            step += 1
        if status.get("exitcode") != 0:
            raise RuntimeError(f"{vm}: `{script}` exited {status.get('exitcode')}")
        return base64.b64decode(status.get("out-data", "")).decode(errors="replace")
    return shell


def _wait_api_agent(service: ServiceProcess, vm: str) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        try:
            service.client.post(url_path("vms", vm, "exec"), {"command": ["true"]})
            return
        except ApiError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _by_hand(argv: list[str], tap: str) -> list[str]:
    """``argv`` with its tap netdev opened by name instead of an inherited fd."""
    out = list(argv)
    for i, arg in enumerate(out):
        if i and out[i - 1] == "-netdev" and arg.startswith("{"):
            netdev = json.loads(arg)
            if netdev.get("type") == "tap":
                netdev.pop("fd", None)
                netdev.update(ifname=tap, script="no", downscript="no")
                out[i] = json.dumps(netdev, separators=(",", ":"))
    if out == argv:
        raise RuntimeError("the VM's command line has no tap netdev")
    return out


def _switch_phase(service: ServiceProcess, times: dict[str, list[float]],
                  argvs: dict[str, list[str]], sockets: dict[str, Path]) -> None:
    """Start the VMs through the service, measure, turn them off; note their argv."""
    api = service.client
    for vm in VMS:
        api.wait_job(api.post(url_path("vms", vm, "start")), timeout=120)
    shell = _api_shell(service)
    for vm, address in zip(VMS, ADDRESSES, strict=True):
        _wait_api_agent(service, vm)
        shell(vm, f"hvstack-static eth0 {address}/24")
        view = api.get(url_path("vms", vm))
        argvs[vm] = Path(f"/proc/{view['pid']}/cmdline").read_bytes().decode().split("\0")[:-1]
        sockets[vm] = service.config.run_dir / view["id"] / "qga.sock"
    _measure(shell, times, "switch")
    for vm in VMS:
        service.turn_off(vm)


def _bridge_phase(space: str, times: dict[str, list[float]], argvs: dict[str, list[str]],
                  sockets: dict[str, Path]) -> None:
    """The same command lines by hand, on a bridge and taps made with ``ip``."""
    _ip(space, "link", "add", "hvbbr0", "type", "bridge")
    _ip(space, "link", "set", "hvbbr0", "up")
    pids: list[int] = []
    try:
        for n, vm in enumerate(VMS):
            tap = f"hvbtap{n}"
            _ip(space, "tuntap", "add", "dev", tap, "mode", "tap")
            _ip(space, "link", "set", tap, "master", "hvbbr0", "up")
            sockets[vm].parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["ip", "netns", "exec", space, *_by_hand(argvs[vm], tap)],
                           check=True, capture_output=True, timeout=60)
            pidfile = argvs[vm][argvs[vm].index("-pidfile") + 1]
            pids.append(int(Path(pidfile).read_text()))
        agents = {vm: DirectAgent(sockets[vm], timeout=BOOT_TIMEOUT) for vm in VMS}
        try:
            shell = _agent_shell(agents)
            for vm, address in zip(VMS, ADDRESSES, strict=True):
                shell(vm, f"hvstack-static eth0 {address}/24")
            _measure(shell, times, "bridge")
        finally:
            for agent in agents.values():
                agent.close()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        for name in ("hvbtap0", "hvbtap1", "hvbbr0"):
            subprocess.run(["ip", "-n", space, "link", "delete", name], capture_output=True,
                           timeout=30)


def run(tmp: Path) -> Section:
    data_dir = tmp / "data"
    install_tiny_image(data_dir)
    times: dict[str, list[float]] = {k: [] for k in (
        "switch-mbit", "switch-rtt", "bridge-mbit", "bridge-rtt")}
    argvs: dict[str, list[str]] = {}
    sockets: dict[str, Path] = {}
    with _namespace() as space:
        service = ServiceProcess(data_dir, ["--default-switch", "none"],
                                 prefix=("ip", "netns", "exec", space))
        with service:
            api = service.client
            api.post("/switches", {"name": "bench", "type": "private"})
            for vm in VMS:
                api.post("/vms", {"name": vm, "generation": 1, "memory": "256M",
                                  "image": "tiny", "switches": ["bench"],
                                  "auto_start": "nothing", "auto_stop": "turn-off"})
                mac = api.get(url_path("vms", vm))["network_adapters"][0]["mac"]
                api.request("PATCH", url_path("vms", vm, "adapters", mac), json=PORT_SETTINGS)
            _switch_phase(service, times, argvs, sockets)
        # the baseline runs without any of the service's rules; it makes them again
        subprocess.run(["ip", "netns", "exec", space, "nft", "flush", "ruleset"], check=True,
                       capture_output=True, timeout=30)
        _bridge_phase(space, times, argvs, sockets)
        shutil.rmtree(service.config.run_dir, ignore_errors=True)  # the hand runs' sockets
        with service:  # switch, bridge, switch: load that drifts hits both sides
            _switch_phase(service, times, argvs, sockets)
    return _section(times)


def _section(times: dict[str, list[float]]) -> Section:
    sw_mbit, br_mbit = median(times["switch-mbit"]), median(times["bridge-mbit"])
    sw_rtt, br_rtt = median(times["switch-rtt"]), median(times["bridge-rtt"])
    mbit_met = sw_mbit / br_mbit >= 1 - GOAL
    rtt_met = sw_rtt / br_rtt <= 1 + GOAL
    rows = (
        ("hand-made Linux bridge, plain taps (baseline)", str(len(times["bridge-mbit"])),
         f"{br_mbit:.1f} Mbit/s", "baseline", ms(br_rtt), "baseline", "-"),
        ("private switch: guards on, one ACL per port", str(len(times["switch-mbit"])),
         f"{sw_mbit:.1f} Mbit/s", ratio(sw_mbit / br_mbit), ms(sw_rtt),
         ratio(sw_rtt / br_rtt),
         f"throughput {verdict(mbit_met)}, latency {verdict(rtt_met)}"),
    )
    notes = (
        f"Phases: switch, bridge, switch (so load that drifts during the run hits both "
        f"sides); {ROUNDS} rounds a phase, each: one TCP transfer of "
        f"{TRANSFER_BLOCKS * 64 // 1024} MiB from B to A (busybox httpd with sendfile to "
        "`wget | wc -c`, timed in the guest from /proc/uptime, 10 ms resolution) and "
        f"{PINGS} pings 0.2 s apart "
        "(busybox's average). Medians of the rounds.",
        "Both phases run the same QEMU command line (devices, MACs, disks, options), "
        "read from /proc while the service ran it; only the tap's origin differs (an "
        "inherited descriptor of the service's tap vs a persistent tap opened by name).",
        "Under TCG the guests' CPUs, not the host's bridge, limit both numbers, so "
        "they show what the switch's rules cost relative to the emulation, not the "
        "absolute cost of nftables per packet.",
        "All raw values (Mbit/s): switch "
        + ", ".join(f"{v:.1f}" for v in times["switch-mbit"]) + "; bridge "
        + ", ".join(f"{v:.1f}" for v in times["bridge-mbit"]) + ".",
    )
    return Section(
        name="switch_throughput",
        title="switch_throughput: two VMs on a private switch against a hand-made bridge",
        description=(
            "TCP throughput and ping round trip between two tiny guests (TCG) joined by an "
            "hvstack private switch, against the same two VMs with the same QEMU command "
            "line joined by a Linux bridge made by hand, in the same run. Goal: at most "
            f"{GOAL:.0%} overhead from the switch's guards and ACLs."
        ),
        tables=(Table(("path", "rounds", "throughput", "ratio", "round trip", "ratio",
                       "result"), rows),),
        notes=notes,
        goals_met=(mbit_met, rtt_met),
    )
