"""VM names as DNS labels, and which VM of a switch gets which name."""

from __future__ import annotations

import pytest

from hvstack.network.hostnames import VmPorts, dns_label, switch_hosts, usable_label


@pytest.mark.parametrize(("name", "label"), [
    ("v1", "v1"),
    ("Web Server", "web-server"),
    ("web_server.prod", "web-server-prod"),
    ("  --db--  ", "db"),
    ("a  &  b", "a-b"),
    ("Übung 2", "bung-2"),
    ("Déjà vu", "d-j-vu"),
    ("x" * 70, "x" * 63),
    ("x" * 62 + "-y", "x" * 62),  # cut at 63, then no hyphen last
    ("web-1", "web-1"),
    ("v1; rm -rf /", "v1-rm-rf"),
    ("a,set:x", "a-set-x"),
    ("web\n01:00:5e:00:00:01,x", "web-01-00-5e-00-00-01-x"),
])
def test_labels(name: str, label: str) -> None:
    assert dns_label(name) == label
    assert usable_label(label)


@pytest.mark.parametrize("name", [
    "", "---", "日本語", "!!!", " ",
    # dnsmasq would read these as a lease time or a keyword, not as a name
    "123", "10m", "7D", "IGNORE", "infinite",
])
def test_names_with_no_usable_label(name: str) -> None:
    assert dns_label(name) is None


@pytest.mark.parametrize("label", ["Web", "-a", "a-", "a b", "", "x" * 64, "123", "ignore",
                                   "a.b", "a--b"])
def test_unusable_labels(label: str) -> None:
    assert not usable_label(label)


def test_each_vm_names_its_first_adapter_and_the_older_vm_keeps_a_shared_label() -> None:
    hosts = switch_hosts([
        VmPorts("Web 1", 20.0, "b", ("52:54:00:00:00:03",)),
        VmPorts("web-1", 10.0, "a", ("52:54:00:00:00:02", "52:54:00:00:00:04")),
        VmPorts("db", 30.0, "c", ("52:54:00:00:00:01",)),
        VmPorts("!!!", 5.0, "d", ("52:54:00:00:00:05",)),
        VmPorts("idle", 1.0, "e", ()),
    ])
    assert hosts == (("52:54:00:00:00:01", "db"), ("52:54:00:00:00:02", "web-1"))


def test_same_age_goes_by_id() -> None:
    vms = [VmPorts("web", 1.0, "b", ("52:54:00:00:00:0b",)),
           VmPorts("WEB", 1.0, "a", ("52:54:00:00:00:0a",))]
    assert switch_hosts(vms) == switch_hosts(reversed(vms)) == (
        ("52:54:00:00:00:0a", "web"),)
