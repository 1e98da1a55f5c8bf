"""DHCP and DNS of a NAT switch: one dnsmasq per switch, outliving the host service.

dnsmasq (Debian's ``dnsmasq-base``) runs with no configuration file
(``--conf-file=/dev/null``), bound to the switch's bridge only, handing out the
plan's range and answering DNS for the names VMs send as their DHCP host name, as
``NAME`` and ``NAME.<domain>`` (names of the domain are answered from leases only,
never forwarded); other names go to the host's resolvers. A MAC of the plan's
``hosts`` gets the label given there instead of the name its guest sends (a
``--dhcp-hostsfile``, one ``MAC,LABEL`` line each, both checked again here). Its pid
file, lease file and log are in the plan's state directory.

A dnsmasq started by root drops to its own user (``--user``: ``dnsmasq``, else
``nobody``) before it reads the hosts file, and the service's data directory is
private, so the hosts file of a root service is ``HOSTS_ROOT/<bridge>/hosts``, in a
directory only that user (and root) may enter; under another user (who keeps its
user) it is in the state directory.

dnsmasq detaches (its own session), so it survives a restart of the host service,
like QEMU. :func:`start` is idempotent: a dnsmasq whose pid file names a live process
whose command line is exactly the one this plan asks for is adopted; one started
for an older plan of the same switch (same pid file, other options) is stopped and
replaced. :func:`stop` stops only a process whose command line names that pid file.
:func:`start` and :func:`reload` write the hosts file atomically, and only when its
text changes; a running dnsmasq is then told to re-read it (SIGHUP), which renames the
current leases of those MACs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import pwd
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from hvstack import runner
from hvstack.errors import HypervisorError, InvalidInput, OperationTimeout
from hvstack.network.backend import SwitchPlan
from hvstack.network.hostnames import usable_label
from hvstack.network.model import parse_mac
from hvstack.network.nft import check_bridge, check_mac

TIMEOUT = 30.0
HOSTS_ROOT = Path("/run/hvstack-dnsmasq")  # only root may write /run
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


def _runs_as() -> tuple[str, int] | None:
    """The user (name, uid) dnsmasq drops root to; None when the service is not root
    (dnsmasq then keeps the service's user) or no such user exists."""
    if os.geteuid() != 0:
        return None
    for name in ("dnsmasq", "nobody"):
        with contextlib.suppress(KeyError):
            return name, pwd.getpwnam(name).pw_uid
    return None


def _hosts_file(plan: SwitchPlan) -> Path:
    if _runs_as() is None:
        return _files(plan)[0].parent / "dnsmasq.hosts"
    return HOSTS_ROOT / check_bridge(plan.bridge) / "hosts"


def _hosts_dir(path: Path) -> None:
    """Make the hosts file's directory; under :data:`HOSTS_ROOT`, one only dnsmasq's
    user (and root) may enter."""
    user = _runs_as()
    if user is None or path.parent.parent != HOSTS_ROOT:
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    HOSTS_ROOT.mkdir(exist_ok=True)
    HOSTS_ROOT.chmod(0o755)
    path.parent.mkdir(exist_ok=True)
    os.chown(path.parent, user[1], 0)
    path.parent.chmod(0o500)


def hosts_text(plan: SwitchPlan) -> str:
    """The hosts file of ``plan``: ``MAC,LABEL`` per line, each checked (a MAC given
    twice is refused: dnsmasq would take one of them)."""
    if plan.dhcp is None:
        raise InvalidInput(f"switch '{plan.name}' has no DHCP")
    lines: list[str] = []
    seen: set[str] = set()
    for mac_text, label in plan.dhcp.hosts:
        mac = parse_mac(mac_text)
        if not usable_label(label):
            raise InvalidInput(f"'{label}' is not a DNS label dnsmasq can take as a "
                               "host name", value=label)
        if mac in seen:
            raise InvalidInput(f"MAC {mac} has two DHCP host names", value=mac)
        seen.add(mac)
        lines.append(f"{mac},{label}\n")
    return "".join(lines)


def write_hosts(plan: SwitchPlan) -> bool:
    """Write the plan's hosts file (atomically) if its text changed; whether it did."""
    text = hosts_text(plan)
    path = _hosts_file(plan)
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        _hosts_dir(path)
        temporary.write_text(text)
        temporary.chmod(0o644)  # dnsmasq reads it as its own user
        os.replace(temporary, path)
    except OSError as exc:
        raise HypervisorError(f"cannot write the DHCP host names of switch '{plan.name}' "
                              f"to {path}: {exc.strerror or exc}", tool="dnsmasq") from exc
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    return True


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
    user = _runs_as()
    return [program, "--conf-file=/dev/null", "--bind-interfaces", f"--interface={bridge}",
            "--except-interface=lo", *([f"--user={user[0]}"] if user else []),
            f"--pid-file={pid_file}",
            f"--dhcp-leasefile={lease_file}", f"--log-facility={log_file}",
            f"--dhcp-hostsfile={_hosts_file(plan)}",
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
    changed = write_hosts(plan)
    running = _ours(plan)
    if running is not None and running[1][1:] == argv[1:]:
        if changed:
            _hang_up(running[0])
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


async def reload(plan: SwitchPlan) -> None:
    """Write the plan's hosts file; a running dnsmasq re-reads it if it changed (one
    that does not run reads it when :func:`start` starts it)."""
    dnsmasq_argv(plan)  # the plan is checked whole, as start() would
    if write_hosts(plan):
        running = _ours(plan)
        if running is not None:
            _hang_up(running[0])


def _hang_up(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGHUP)


async def stop(plan: SwitchPlan) -> None:
    """Stop the switch's dnsmasq if it runs; its lease file stays, a hosts file under
    :data:`HOSTS_ROOT` goes."""
    running = _ours(plan)
    if running is not None:
        await _terminate(running[0])
    _files(plan)[0].unlink(missing_ok=True)
    hosts = _hosts_file(plan)
    if hosts.parent.parent == HOSTS_ROOT:
        shutil.rmtree(hosts.parent, ignore_errors=True)


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
