"""DHCP and DNS of a NAT switch: one dnsmasq per switch, outliving the host service.

dnsmasq (Debian's ``dnsmasq-base``) runs with no configuration file
(``--conf-file=/dev/null``), bound to the switch's bridge only, handing out the
plan's range and answering DNS for the names VMs send as their DHCP host name, as
``NAME`` and ``NAME.<domain>`` (names of the domain are answered from leases only,
never forwarded); other names go to the host's resolvers. Its pid file, lease file
and log are in the plan's state directory.

dnsmasq detaches (its own session), so it survives a restart of the host service,
like QEMU. :func:`start` is idempotent: a dnsmasq whose pid file names a live process
whose command line is exactly the one this plan asks for is adopted; one started
for an older plan of the same switch (same pid file, other options) is stopped and
replaced. :func:`stop` stops only a process whose command line names that pid file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from hvstack import runner
from hvstack.errors import HypervisorError, InvalidInput, OperationTimeout
from hvstack.network.backend import SwitchPlan
from hvstack.network.nft import check_bridge, check_mac

TIMEOUT = 30.0
LEASE_TIME = "1h"
_DOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                     r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$", re.IGNORECASE)


@dataclass(frozen=True)
class Lease:
    """One DHCP lease. ``expiry`` is a Unix time (0: never); ``hostname`` is what the
    VM sent, or None."""

    mac: str
    ip: str
    hostname: str | None
    expiry: int


def _files(plan: SwitchPlan) -> tuple[Path, Path, Path]:
    if plan.dhcp is None:
        raise InvalidInput(f"switch '{plan.name}' has no DHCP")
    state = Path(plan.dhcp.state_dir)
    if not state.is_absolute():
        raise InvalidInput(f"DHCP state directory '{state}' is not absolute")
    return state / "dnsmasq.pid", state / "dnsmasq.leases", state / "dnsmasq.log"


def dnsmasq_argv(plan: SwitchPlan, program: str = "dnsmasq") -> list[str]:
    """dnsmasq's command line for ``plan`` (every value checked)."""
    pid_file, lease_file, log_file = _files(plan)
    assert plan.dhcp is not None
    bridge = check_bridge(plan.bridge)
    network = plan.subnet or (plan.host_address.network if plan.host_address else None)
    if network is None:
        raise InvalidInput(f"switch '{plan.name}' has no subnet for DHCP")
    try:
        first, last = (ipaddress.IPv4Address(a) for a in (plan.dhcp.first, plan.dhcp.last))
    except ValueError as exc:
        raise InvalidInput(f"DHCP range of switch '{plan.name}': {exc}") from None
    if not (first in network and last in network and first <= last):
        raise InvalidInput(f"DHCP range {first}-{last} is not inside {network}")
    domain = plan.dhcp.domain
    if not _DOMAIN.match(domain):
        raise InvalidInput(f"'{domain}' is not a DNS domain name", value=domain)
    return [program, "--conf-file=/dev/null", "--bind-interfaces", f"--interface={bridge}",
            "--except-interface=lo", f"--pid-file={pid_file}",
            f"--dhcp-leasefile={lease_file}", f"--log-facility={log_file}",
            f"--dhcp-range={first},{last},{network.netmask},{LEASE_TIME}",
            "--dhcp-authoritative", f"--domain={domain}", f"--local=/{domain}/",
            "--no-hosts", "--domain-needed"]


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1] or None


def _pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _ours(plan: SwitchPlan) -> tuple[int, list[str]] | None:
    """The live dnsmasq of this switch (whatever its options), by pid file."""
    pid_file = _files(plan)[0]
    pid = _pid(pid_file)
    cmdline = _cmdline(pid) if pid else None
    if pid is None or not cmdline or Path(cmdline[0]).name != "dnsmasq":
        return None
    return (pid, cmdline) if f"--pid-file={pid_file}" in cmdline else None


def _program() -> str:
    return shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


async def start(plan: SwitchPlan) -> None:
    """Start the switch's dnsmasq, or adopt the one running for this very plan."""
    argv = dnsmasq_argv(plan, _program())
    running = _ours(plan)
    if running is not None and running[1][1:] == argv[1:]:
        return
    if running is not None:
        await _terminate(running[0])
    pid_file = _files(plan)[0]
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.unlink(missing_ok=True)
    # dnsmasq reports start-up errors (address in use, no such interface) by its exit
    # status before it detaches; its daemon closes our pipes, so run() returns.
    await runner.run(argv, timeout=TIMEOUT, package="dnsmasq-base", stdout=False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while _ours(plan) is None:
        if loop.time() > deadline:
            raise HypervisorError(f"dnsmasq of switch '{plan.name}' did not write its pid "
                                  f"file within {TIMEOUT:g} s", tool="dnsmasq")
        await asyncio.sleep(0.05)


async def stop(plan: SwitchPlan) -> None:
    """Stop the switch's dnsmasq if it runs; its lease file stays."""
    running = _ours(plan)
    if running is not None:
        await _terminate(running[0])
    _files(plan)[0].unlink(missing_ok=True)


async def _terminate(pid: int, grace: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while _alive(pid):
        if loop.time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if loop.time() > deadline + grace:
                raise OperationTimeout(f"dnsmasq (pid {pid}) did not exit", timeout=grace)
        await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def parse_leases(text: str) -> list[Lease]:
    """dnsmasq's lease file: ``EXPIRY MAC IP HOSTNAME CLIENT-ID`` per line (``*`` for
    no host name); DHCPv6 lines and anything malformed are skipped."""
    leases: list[Lease] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].isdigit():
            continue
        try:
            mac, ip = check_mac(fields[1].lower()), ipaddress.IPv4Address(fields[2])
        except (InvalidInput, ValueError):
            continue
        leases.append(Lease(mac, str(ip), None if fields[3] == "*" else fields[3],
                            int(fields[0])))
    return leases


def leases(plan: SwitchPlan) -> list[Lease]:
    """The switch's current leases (none before dnsmasq first wrote its file)."""
    try:
        return parse_leases(_files(plan)[1].read_text(errors="replace"))
    except FileNotFoundError:
        return []
