"""dnsmasq's command line from a NAT switch plan, its checks, and the lease file."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from hvstack.errors import InvalidInput
from hvstack.network import dhcp
from hvstack.network.backend import DhcpPlan, SwitchPlan
from hvstack.network.model import SwitchType

BRIDGE = "hvb12345abcdef"


def plan(state: Path, first: str = "172.16.0.100", last: str = "172.16.0.200",
         domain: str = "mshome.net", bridge: str = BRIDGE) -> SwitchPlan:
    return SwitchPlan("s1", "Default Switch", SwitchType.NAT, bridge, "hvstack_12345",
                      host_address=ipaddress.IPv4Interface("172.16.0.1/24"),
                      subnet=ipaddress.IPv4Network("172.16.0.0/24"),
                      dhcp=DhcpPlan(first, last, domain, state))


def test_command_line(tmp_path: Path) -> None:
    s = tmp_path / "s1"
    assert dhcp.dnsmasq_argv(plan(s), "/usr/sbin/dnsmasq") == [
        "/usr/sbin/dnsmasq", "--conf-file=/dev/null", "--bind-interfaces",
        f"--interface={BRIDGE}", "--except-interface=lo", f"--pid-file={s}/dnsmasq.pid",
        f"--dhcp-leasefile={s}/dnsmasq.leases", f"--log-facility={s}/dnsmasq.log",
        "--dhcp-range=172.16.0.100,172.16.0.200,255.255.255.0,1h", "--dhcp-authoritative",
        "--domain=mshome.net", "--local=/mshome.net/", "--no-hosts", "--domain-needed"]


@pytest.mark.parametrize("changes", [
    {"first": "172.16.1.100"}, {"last": "172.16.0.50"}, {"first": "bogus"},
    {"domain": "mshome.net --dhcp-script=/tmp/x"}, {"domain": "-x"}, {"domain": ""},
    {"domain": "a" * 64 + ".net"}, {"bridge": "br0"}, {"bridge": "hvb1,x"},
])
def test_bad_plans_are_refused(tmp_path: Path, changes: dict[str, str]) -> None:
    with pytest.raises(InvalidInput):
        dhcp.dnsmasq_argv(plan(tmp_path, **changes))


def test_a_relative_state_dir_or_no_dhcp_is_refused() -> None:
    with pytest.raises(InvalidInput, match="absolute"):
        dhcp.dnsmasq_argv(plan(Path("relative")))
    p = plan(Path("/x"))
    with pytest.raises(InvalidInput, match="no DHCP"):
        dhcp.dnsmasq_argv(SwitchPlan(p.switch_id, p.name, p.type, p.bridge, p.table))


def test_leases_are_parsed_skipping_ipv6_and_junk(tmp_path: Path) -> None:
    p = plan(tmp_path)
    assert dhcp.leases(p) == []
    (tmp_path / "dnsmasq.leases").write_text(
        "1796177000 52:54:00:00:00:0d 172.16.0.120 vmdee 01:52:54:00:00:00:0d\n"
        "0 52:54:00:00:00:0e 172.16.0.121 * *\n"
        "duid 00:01:00:01:2c:aa:bb:cc\n"
        "1796177000 not-a-mac 172.16.0.122 x *\n"
        "garbage\n")
    assert dhcp.leases(p) == [
        dhcp.Lease("52:54:00:00:00:0d", "172.16.0.120", "vmdee", 1796177000),
        dhcp.Lease("52:54:00:00:00:0e", "172.16.0.121", None, 0)]


def test_only_a_dnsmasq_with_this_pid_file_counts_as_running(tmp_path: Path) -> None:
    p = plan(tmp_path)
    assert dhcp._ours(p) is None  # no pid file
    (tmp_path / "dnsmasq.pid").write_text(f"{os.getpid()}\n")
    assert dhcp._ours(p) is None  # a live process, but not dnsmasq
    (tmp_path / "dnsmasq.pid").write_text("not a pid\n")
    assert dhcp._ours(p) is None


async def test_stopping_when_nothing_runs_is_fine(tmp_path: Path) -> None:
    (tmp_path / "dnsmasq.pid").write_text(f"{os.getpid()}\n")
    await dhcp.stop(plan(tmp_path))  # not ours: left alone, stale pid file removed
    assert not (tmp_path / "dnsmasq.pid").exists()
