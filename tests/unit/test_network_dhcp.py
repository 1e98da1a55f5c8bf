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


@pytest.fixture(autouse=True)
def unprivileged(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a service that is not root: dnsmasq keeps its user, the hosts file is in
    the state directory (:func:`test_as_root_dnsmasq_reads_its_names_from_run` is the
    other case)."""
    monkeypatch.setattr(dhcp, "_runs_as", lambda: None)


def plan(state: Path, first: str = "172.16.0.100", last: str = "172.16.0.200",
         domain: str = "mshome.net", bridge: str = BRIDGE,
         hosts: tuple[tuple[str, str], ...] = ()) -> SwitchPlan:
    return SwitchPlan("s1", "Default Switch", SwitchType.NAT, bridge, "hvstack_12345",
                      host_address=ipaddress.IPv4Interface("172.16.0.1/24"),
                      subnet=ipaddress.IPv4Network("172.16.0.0/24"),
                      dhcp=DhcpPlan(first, last, domain, state, hosts))


def test_command_line(tmp_path: Path) -> None:
    s = tmp_path / "s1"
    assert dhcp.dnsmasq_argv(plan(s), "/usr/sbin/dnsmasq") == [
        "/usr/sbin/dnsmasq", "--conf-file=/dev/null", "--bind-interfaces",
        f"--interface={BRIDGE}", "--except-interface=lo", f"--pid-file={s}/dnsmasq.pid",
        f"--dhcp-leasefile={s}/dnsmasq.leases", f"--log-facility={s}/dnsmasq.log",
        f"--dhcp-hostsfile={s}/dnsmasq.hosts",
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


def test_as_root_dnsmasq_reads_its_names_from_run(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    monkeypatch.setattr(dhcp, "HOSTS_ROOT", run)
    monkeypatch.setattr(dhcp, "_runs_as", lambda: ("dnsmasq", os.geteuid()))
    s = tmp_path / "s1"
    p = plan(s, hosts=(("52:54:00:00:00:0e", "web"),))
    argv = dhcp.dnsmasq_argv(p, "dnsmasq")
    assert argv[5:7] == ["--user=dnsmasq", f"--pid-file={s}/dnsmasq.pid"]
    assert f"--dhcp-hostsfile={run}/{BRIDGE}/hosts" in argv
    assert dhcp.write_hosts(p) is True
    hosts = run / BRIDGE / "hosts"
    assert hosts.read_text() == "52:54:00:00:00:0e,web\n"
    assert (hosts.parent.stat().st_mode & 0o777, hosts.parent.stat().st_uid) == (
        0o500, os.geteuid())
    assert run.stat().st_mode & 0o777 == 0o755
    assert dhcp.write_hosts(p) is False


async def test_stop_removes_the_hosts_directory_under_run(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    run = tmp_path / "run"
    monkeypatch.setattr(dhcp, "HOSTS_ROOT", run)
    monkeypatch.setattr(dhcp, "_runs_as", lambda: ("dnsmasq", os.geteuid()))
    p = plan(tmp_path / "s1", hosts=(("52:54:00:00:00:0e", "web"),))
    dhcp.write_hosts(p)
    await dhcp.stop(p)
    assert not (run / BRIDGE).exists() and run.exists()


def test_the_hosts_file_names_each_mac(tmp_path: Path) -> None:
    p = plan(tmp_path, hosts=(("52:54:00:00:00:0E", "web-1"), ("52-54-00-00-00-0d", "db")))
    assert dhcp.hosts_text(p) == "52:54:00:00:00:0e,web-1\n52:54:00:00:00:0d,db\n"
    assert dhcp.hosts_text(plan(tmp_path)) == ""


@pytest.mark.parametrize("host", [
    ("52:54:00:00:00:0e", "Web"), ("52:54:00:00:00:0e", "web,set:x"),
    ("52:54:00:00:00:0e", "a b"), ("52:54:00:00:00:0e", "-web"), ("52:54:00:00:00:0e", ""),
    ("52:54:00:00:00:0e", "x" * 64), ("52:54:00:00:00:0e", "ignore"),
    ("52:54:00:00:00:0e", "10m"), ("52:54:00:00:00:0e", "web\n01:00:5e:00:00:01,x"),
    ("01:00:5e:00:00:01", "web"), ("52:54:00:00:00:0e,id:*", "web"), ("bogus", "web"),
])
def test_a_bad_host_never_reaches_dnsmasq(tmp_path: Path, host: tuple[str, str]) -> None:
    with pytest.raises(InvalidInput):
        dhcp.hosts_text(plan(tmp_path, hosts=(host,)))


def test_a_mac_named_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="two"):
        dhcp.hosts_text(plan(tmp_path, hosts=(("52:54:00:00:00:0e", "a"),
                                              ("52:54:00:00:00:0E", "b"))))


def test_the_hosts_file_is_written_only_when_it_changes(tmp_path: Path) -> None:
    state = tmp_path / "s1"
    p = plan(state, hosts=(("52:54:00:00:00:0e", "web"),))
    assert dhcp.write_hosts(p) is True
    hosts = state / "dnsmasq.hosts"
    assert hosts.read_text() == "52:54:00:00:00:0e,web\n"
    assert hosts.stat().st_mode & 0o777 == 0o644
    inode = hosts.stat().st_ino
    assert dhcp.write_hosts(p) is False
    assert hosts.stat().st_ino == inode
    assert dhcp.write_hosts(plan(state)) is True
    assert hosts.read_text() == "" and hosts.stat().st_ino != inode  # replaced whole
    assert [f.name for f in state.iterdir()] == ["dnsmasq.hosts"]


async def test_reload_writes_the_names_and_signals_no_stranger(tmp_path: Path) -> None:
    (tmp_path / "dnsmasq.pid").write_text(f"{os.getpid()}\n")  # not a dnsmasq
    await dhcp.reload(plan(tmp_path, hosts=(("52:54:00:00:00:0e", "web"),)))
    assert (tmp_path / "dnsmasq.hosts").read_text() == "52:54:00:00:00:0e,web\n"
    with pytest.raises(InvalidInput):
        await dhcp.reload(plan(tmp_path, first="10.0.0.1"))


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


async def test_the_linux_backend_reloads_the_names_of_a_nat_switch_only(tmp_path: Path
                                                                        ) -> None:
    from hvstack.network.linux import LinuxNetwork

    reloaded: list[SwitchPlan] = []

    class Recorder:
        async def start(self, p: SwitchPlan) -> None: ...
        async def stop(self, p: SwitchPlan) -> None: ...

        async def reload(self, p: SwitchPlan) -> None:
            reloaded.append(p)

    net = LinuxNetwork(dhcp_server=Recorder())
    nat = plan(tmp_path, hosts=(("52:54:00:00:00:0e", "web"),))
    await net.update_hosts(nat)
    await net.update_hosts(SwitchPlan("s2", "lab", SwitchType.PRIVATE, BRIDGE, "t"))
    await net.update_hosts(SwitchPlan("s3", "nat", SwitchType.NAT, BRIDGE, "t"))
    assert reloaded == [nat]


def test_a_hosts_file_that_cannot_be_written_is_a_hypervisor_error(tmp_path: Path) -> None:
    from hvstack.errors import HypervisorError

    (tmp_path / "file").write_text("")
    with pytest.raises(HypervisorError, match="cannot write the DHCP host names"):
        dhcp.write_hosts(plan(tmp_path / "file" / "s1"))
