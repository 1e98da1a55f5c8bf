"""Virtual switches through the REST API, on the fake network backend: the Default
Switch, every switch type, NAT mappings, changes, deletion, missing privilege, every bad
input, failures part-way, and the rebuild when the service starts again."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from hvstack.api.app import create_app
from hvstack.errors import HypervisorError
from hvstack.host.config import HostConfig
from hvstack.host.facts import FixedHost
from hvstack.host.network_ops import NetworkOperations
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from hvstack.host.store import MemoryStore
from hvstack.network import names
from tests.functional.fake_network import FakeNetwork
from tests.functional.fakes import API, FakeDriver, assert_problem, create_vm, show_vm


class Net:
    """A started service with network operations on a fake backend, and its API."""

    def __init__(self, service: HostService, ops: NetworkOperations, fake: FakeNetwork,
                 api: httpx.AsyncClient, driver: FakeDriver) -> None:
        self.service, self.ops, self.fake, self.api, self.driver = (
            service, ops, fake, api, driver)


async def start_net(config: HostConfig, store: MemoryStore, driver: FakeDriver,
                    fake: FakeNetwork) -> tuple[HostService, NetworkOperations]:
    service = HostService(config, store, driver, FixedHost())
    ops = NetworkOperations(service, fake)
    await service.startup()
    await ops.startup()
    return service, ops


async def stop_net(service: HostService, ops: NetworkOperations) -> None:
    await asyncio.wait_for(service.shutdown(), 10)
    await ops.close()


@pytest.fixture
async def net(host_config: HostConfig, store: MemoryStore,
              driver: FakeDriver) -> AsyncIterator[Net]:
    fake = FakeNetwork()
    service, ops = await start_net(host_config, store, driver, fake)
    transport = httpx.ASGITransport(app=create_app(HostRoot(service, network=ops)))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hv") as api:
            yield Net(service, ops, fake, api, driver)
    finally:
        driver.release()
        await stop_net(service, ops)
        fake.close()
        shutil.rmtree(host_config.run_dir, ignore_errors=True)


async def switches(api: httpx.AsyncClient) -> dict[str, dict[str, object]]:
    response = await api.get(f"{API}/switches")
    assert response.status_code == 200, response.text
    return {s["name"]: s for s in response.json()}


async def make(api: httpx.AsyncClient, name: str, kind: str, **body: object) -> dict[str, object]:
    response = await api.post(f"{API}/switches", json={"name": name, "type": kind, **body})
    assert response.status_code == 201, response.text
    switch: dict[str, object] = response.json()
    return switch


# -- the Default Switch ------------------------------------------------------------------

async def test_the_default_switch_is_made_on_first_start_and_new_vms_use_it(net: Net) -> None:
    default = (await switches(net.api))["Default Switch"]
    # 172.16.0.0/24 is a network of the (fake) host: the next candidate is chosen
    assert (default["type"], default["subnet"], default["host_address"]) == (
        "nat", "172.16.1.0/24", "172.16.1.1/24")
    assert default["dhcp_range"] == ["172.16.1.2", "172.16.1.254"]
    assert default["default"] is True
    assert net.fake.switches[str(default["bridge"])].dhcp is not None
    vm = await create_vm(net.api, "web")
    [nic] = vm["network_adapters"]
    assert (nic["mode"], nic["switch"], nic["switch_name"]) == (
        "switch", default["id"], "Default Switch")
    assert nic["mac"].startswith("52:54:00:") and nic["dynamic_mac"] is True
    assert (await net.api.get(f"{API}/network")).json()["available"] is True


async def test_a_deleted_default_switch_is_not_made_again(
        net: Net, host_config: HostConfig, store: MemoryStore) -> None:
    response = await net.api.delete(f"{API}/switches/Default Switch")
    assert response.status_code == 200, response.text
    service, ops = await start_net(replace(host_config, data_dir=host_config.data_dir),
                                   store, FakeDriver(), FakeNetwork())
    try:
        assert ops.all() == []
    finally:
        await stop_net(service, ops)


async def test_default_switch_none_leaves_vms_in_user_mode_nat(tmp_path: Path) -> None:
    from tests.functional.conftest import make_config

    config = make_config(tmp_path, default_switch=False)
    service, ops = await start_net(config, MemoryStore(), FakeDriver(), FakeNetwork())
    try:
        assert ops.all() == []
        vm = await service.create_vm(_new("web"))
        [nic] = vm.record.config.network_adapters
        assert (nic.mode, nic.switch) == ("user", "")
    finally:
        await stop_net(service, ops)
        shutil.rmtree(config.run_dir, ignore_errors=True)


def _new(name: str, **changes: object):  # type: ignore[no-untyped-def]
    from hvstack.compute.model import VmConfig
    from hvstack.host.service import NewVm

    return NewVm(VmConfig(name=name, memory_bytes=64 << 20), **changes)  # type: ignore[arg-type]


# -- without privilege ------------------------------------------------------------------

async def test_without_cap_net_admin_switches_are_refused_and_user_mode_nat_works(
        tmp_path: Path) -> None:
    from tests.functional.conftest import make_config

    config = make_config(tmp_path)
    fake = FakeNetwork(privileged=False)
    service, ops = await start_net(config, MemoryStore(), FakeDriver(), fake)
    transport = httpx.ASGITransport(app=create_app(HostRoot(service, network=ops)))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hv") as api:
            assert await switches(api) == {}
            problem = assert_problem(await api.post(f"{API}/switches", json={
                "name": "lab", "type": "private"}), 409, "network-unavailable")
            assert "CAP_NET_ADMIN" in problem["detail"]
            assert "user-mode NAT still work" in problem["detail"]
            vm = await create_vm(api, "web")
            assert vm["network_adapters"][0]["mode"] == "user"
            assert_problem(await api.post(f"{API}/vms", json={
                "name": "x", "memory": "64M", "switches": ["lab"]}), 409,
                "network-unavailable")
            status = (await api.get(f"{API}/network")).json()
            assert status == {**status, "available": False,
                              "reason": "it lacks CAP_NET_ADMIN"}
        assert fake.calls == []
    finally:
        await stop_net(service, ops)
        fake.close()
        shutil.rmtree(config.run_dir, ignore_errors=True)


# -- each type ------------------------------------------------------------------------

async def test_each_switch_type(net: Net) -> None:
    private = await make(net.api, "private net", "private")
    assert (private["subnet"], private["host_address"]) == (None, None)
    internal = await make(net.api, "lab", "internal", subnet="192.168.50.0/24",
                          host_address="192.168.50.10")
    assert internal["host_address"] == "192.168.50.10/24"
    bare = await make(net.api, "bare", "internal")
    assert bare["subnet"] is None
    nat = await make(net.api, "nat", "nat", subnet="10.77.0.0/24")
    assert nat["dhcp_range"] == ["10.77.0.2", "10.77.0.254"]
    auto = await make(net.api, "auto nat", "nat")
    assert auto["subnet"] == "172.16.2.0/24"  # after the Default Switch's
    external = await make(net.api, "ext", "external", adapter="eth1")
    assert external["adapter"] == "eth1"
    assert len(net.fake.switches) == 7
    for switch in (private, internal, nat, external):
        bridge = str(switch["bridge"])
        assert len(bridge) <= 15 and names.is_ours(net.ops.tag, bridge)
    shown = (await net.api.get(f"{API}/switches/{internal['id']}")).json()
    assert shown["name"] == "lab"


async def test_long_switch_names_map_to_distinct_kernel_names(net: Net) -> None:
    first = await make(net.api, "a" * 90 + "-one", "private")
    second = await make(net.api, "a" * 90 + "-two", "private")
    assert first["bridge"] != second["bridge"]
    assert all(len(str(s["bridge"])) <= 15 for s in (first, second))


@pytest.mark.parametrize(("body", "status", "slug", "words"), [
    ({"type": "external", "adapter": "eth9"}, 400, "invalid-input",
     "no network interface named 'eth9'"),
    ({"type": "external", "adapter": "eth2"}, 409, "conflict", "already in bridge 'br0'"),
    ({"type": "external", "adapter": "br0"}, 400, "invalid-input", "is a bridge"),
    ({"type": "external", "adapter": "a/b"}, 400, "invalid-input", "interface name"),
    ({"type": "external"}, 400, "invalid-input", "needs --adapter"),
    ({"type": "external", "adapter": "eth1", "subnet": "10.1.0.0/24"}, 400,
     "invalid-input", "takes no --subnet"),
    ({"type": "private", "subnet": "10.1.0.0/24"}, 400, "invalid-input", "VMs only"),
    ({"type": "internal", "adapter": "eth1"}, 400, "invalid-input", "only an external"),
    ({"type": "nat", "subnet": "172.16.1.128/25"}, 409, "conflict",
     "of switch 'Default Switch'"),
    ({"type": "nat", "subnet": "10.0.2.0/23"}, 409, "conflict",
     "overlaps the host's network 10.0.2.0/24"),
    ({"type": "nat", "subnet": "10.1.0.1/24"}, 400, "invalid-input", "host bits"),
    ({"type": "nat", "subnet": "10.1.0.0/30"}, 400, "invalid-input", "/8 and /29"),
    ({"type": "internal", "subnet": "10.1.0.0/24", "host_address": "10.2.0.1"}, 400,
     "invalid-input", "not a host address"),
    ({"type": "bridge"}, 400, "invalid-input", ""),
    ({"type": "private", "name": "bad\x1bname"}, 400, "invalid-input", "control"),
    ({"type": "private", "name": ""}, 400, "invalid-input", "empty"),
    ({"type": "private", "name": "Default Switch"}, 409, "already-exists", "already exists"),
])
async def test_bad_switch_input_makes_nothing(net: Net, body: dict[str, object],
                                              status: int, slug: str, words: str) -> None:
    await make(net.api, "ext", "external", adapter="eth1")
    before = (dict(net.fake.switches), await switches(net.api))
    problem = assert_problem(await net.api.post(f"{API}/switches",
                                                json={"name": "new", **body}), status, slug)
    assert words in problem["detail"]
    assert (dict(net.fake.switches), await switches(net.api)) == before


async def test_an_adapter_used_by_another_switch(net: Net) -> None:
    await make(net.api, "ext", "external", adapter="eth1")
    problem = assert_problem(await net.api.post(f"{API}/switches", json={
        "name": "ext2", "type": "external", "adapter": "eth1"}), 409, "conflict")
    assert "already used by switch 'ext'" in problem["detail"]


async def test_a_failure_part_way_leaves_no_switch(net: Net) -> None:
    before = dict(net.fake.switches)
    net.fake.fail_on["ensure_switch"] = HypervisorError("nft failed")
    assert_problem(await net.api.post(f"{API}/switches", json={
        "name": "lab", "type": "private"}), 500, "hypervisor-error")
    assert "lab" not in await switches(net.api)
    assert net.fake.switches == before
    # the name is free: it was never stored
    await make(net.api, "lab", "private")


async def test_a_store_failure_after_the_bridge_removes_the_bridge(net: Net) -> None:
    from hvstack.errors import NoSpace

    before = dict(net.fake.switches)

    async def full(*_: object) -> int:
        raise NoSpace("the store is full")

    original = net.service.store.commit
    net.service.store.commit = full  # type: ignore[method-assign]
    try:
        assert_problem(await net.api.post(f"{API}/switches", json={
            "name": "lab", "type": "private"}), 507, "no-space")
    finally:
        net.service.store.commit = original  # type: ignore[method-assign]
    assert net.fake.switches == before
    assert net.fake.calls[-1][0] == "remove_switch"


# -- changes -------------------------------------------------------------------------

async def test_rename_notes_and_host_address(net: Net) -> None:
    lab = await make(net.api, "lab", "internal", subnet="192.168.50.0/24")
    response = await net.api.patch(f"{API}/switches/lab", json={
        "name": "lab 2", "notes": "[b]not markup[/b]", "host_address": "192.168.50.254"})
    assert response.status_code == 200, response.text
    changed = response.json()
    assert (changed["name"], changed["notes"], changed["host_address"], changed["bridge"]) \
        == ("lab 2", "[b]not markup[/b]", "192.168.50.254/24", lab["bridge"])
    plan = net.fake.switches[str(lab["bridge"])]
    assert str(plan.host_address) == "192.168.50.254/24"
    assert_problem(await net.api.get(f"{API}/switches/lab"), 404, "not-found")
    assert_problem(await net.api.patch(f"{API}/switches/lab 2", json={
        "name": "Default Switch"}), 409, "already-exists")
    assert_problem(await net.api.patch(f"{API}/switches/lab 2", json={
        "host_address": "10.0.0.1"}), 400, "invalid-input")
    private = await make(net.api, "p", "private")
    assert_problem(await net.api.patch(f"{API}/switches/{private['id']}", json={
        "host_address": "10.0.0.1"}), 400, "invalid-input")


async def test_nat_mappings(net: Net) -> None:
    path = f"{API}/switches/Default Switch/mappings"
    mapping = {"protocol": "tcp", "external_port": 8080, "internal_ip": "172.16.1.10",
               "internal_port": 80}
    response = await net.api.post(path, json=mapping)
    assert response.status_code == 201, response.text
    assert response.json()["mappings"] == [mapping]
    bridge = str(response.json()["bridge"])
    assert len(net.fake.switches[bridge].mappings) == 1
    assert (await net.api.get(path)).json() == [mapping]
    other = await make(net.api, "nat2", "nat", subnet="10.77.0.0/24")
    for body, status, words in [
        ({**mapping, "internal_ip": "10.77.0.10"}, 409,
         "already mapped by switch 'Default Switch'"),
        ({**mapping, "external_port": 0}, 400, "outside 1-65535"),
        ({**mapping, "external_port": 8081, "internal_ip": "10.9.9.9"}, 400, "not an address"),
        ({**mapping, "external_port": 8081, "protocol": "icmp"}, 400, ""),
    ]:
        url = f"{API}/switches/{other['id']}/mappings" if status == 409 else path
        problem = (await net.api.post(url, json=body)).json()
        assert problem["status"] == status and words in problem["detail"], problem
    private = await make(net.api, "p", "private")
    assert_problem(await net.api.post(f"{API}/switches/p/mappings", json=mapping), 400,
                   "invalid-input")
    assert private["mappings"] == []
    response = await net.api.delete(f"{path}/tcp/8080")
    assert response.status_code == 200 and response.json()["mappings"] == []
    assert net.fake.switches[bridge].mappings == ()
    assert_problem(await net.api.delete(f"{path}/tcp/8080"), 404, "not-found")


# -- deletion -------------------------------------------------------------------------

async def test_delete_a_switch_in_use_needs_force(net: Net) -> None:
    lab = await make(net.api, "lab", "private")
    vm = await create_vm(net.api, "web", switches=["lab"])
    assert vm["network_adapters"][0]["switch"] == lab["id"]
    shown = (await net.api.get(f"{API}/switches/lab")).json()
    assert [p["vm"] for p in shown["ports"]] == ["web"]
    problem = assert_problem(await net.api.delete(f"{API}/switches/lab"), 409, "conflict")
    assert "--force" in problem["detail"] and "'web'" in problem["detail"]
    assert str(lab["bridge"]) in net.fake.switches
    response = await net.api.delete(f"{API}/switches/lab", params={"force": "true"})
    assert response.status_code == 200, response.text
    assert response.json()["disconnected"] == [{"vm": "web",
                                                "mac": vm["network_adapters"][0]["mac"]}]
    [nic] = (await show_vm(net.api, "web"))["network_adapters"]
    assert (nic["mode"], nic["switch"], nic["mac"]) == (
        "switch", "", vm["network_adapters"][0]["mac"])
    assert str(lab["bridge"]) not in net.fake.switches
    assert "lab" not in await switches(net.api)
    assert_problem(await net.api.delete(f"{API}/switches/lab"), 404, "not-found")


# -- restart ---------------------------------------------------------------------------

async def test_the_service_rebuilds_switches_and_ports_after_a_restart(
        net: Net, host_config: HostConfig, store: MemoryStore) -> None:
    lab = await make(net.api, "lab", "internal", subnet="192.168.50.0/24")
    await create_vm(net.api, "web", switches=["lab"])
    from tests.functional.fakes import run_job

    await run_job(net.api, "web", "start")
    [tap] = [t for t, p in net.fake.ports.items() if p.bridge == lab["bridge"]]
    net.fake.switches["hvb" + net.ops.tag + "stale0"] = net.fake.switches[str(lab["bridge"])]
    # a new service on the same store, as after a crash: the bridges are still there,
    # the VM runs on; the new one removes the stale bridge and re-applies the port
    await net.service.flush()
    for vm in net.service.list_vms():
        await vm.detach()
    service, ops = await start_net(host_config, store, net.driver, net.fake)
    try:
        assert {s.name for s in ops.all()} == {"Default Switch", "lab"}
        assert ("hvb" + net.ops.tag + "stale0") not in net.fake.switches
        assert str(lab["bridge"]) in net.fake.switches
        assert ("update_port", tap) in net.fake.calls
        assert service.get_vm("web").machine_running
    finally:
        net.driver.release()
        await stop_net(service, ops)


async def test_a_switch_is_deleted_with_force_on_a_host_that_lost_the_privilege(
        net: Net, host_config: HostConfig, store: MemoryStore) -> None:
    await make(net.api, "lab", "private")
    await create_vm(net.api, "web", switches=["lab"])
    await stop_net(net.service, net.ops)
    service, ops = await start_net(host_config, store, FakeDriver(),
                                   FakeNetwork(privileged=False))
    try:
        assert {s.name for s in ops.all()} == {"Default Switch", "lab"}
        result = await ops.delete("lab", force=True)
        assert [p["vm"] for p in result["disconnected"]] == ["web"]
        [nic] = service.get_vm("web").record.config.network_adapters
        assert (nic.mode, nic.switch) == ("switch", "")
        # it cannot start: its adapter needs a tap
        job = service.start_vm("web")
        await job.done.wait()
        assert job.error is not None and job.error.slug == "network-unavailable"
    finally:
        await stop_net(service, ops)
