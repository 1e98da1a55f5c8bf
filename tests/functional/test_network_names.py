"""The VMs' names in the DHCP and DNS of NAT switches, on the fake network backend:
each NAT switch's plan names the MAC of every VM on it after the VM, and follows
creation, deletion, renaming, adapters added, removed and moved, and the rebuild when
the service starts again."""

from __future__ import annotations

import httpx

from hvstack.errors import HypervisorError
from hvstack.host.config import HostConfig
from hvstack.host.store import MemoryStore
from hvstack.network.backend import SwitchPlan
from tests.functional.fakes import API, create_vm, eventually, run_job
from tests.functional.test_network_switches import Net, make, start_net, stop_net
from tests.functional.test_network_switches import net as net  # the fixture

Hosts = tuple[tuple[str, str], ...]


def plan_of(net: Net, switch: str) -> SwitchPlan:
    bridge = next(p.bridge for p in net.fake.switches.values() if p.name == switch)
    return net.fake.switches[bridge]


def hosts_of(net: Net, switch: str) -> Hosts:
    dhcp = plan_of(net, switch).dhcp
    assert dhcp is not None
    return dhcp.hosts


async def named(net: Net, switch: str, *hosts: tuple[str, str]) -> None:
    """Wait until the backend has ``hosts`` for ``switch`` (pushed after each event)."""
    want = tuple(sorted(hosts))
    await eventually(lambda: hosts_of(net, switch) == want,
                     f"{switch} names {want}, not {hosts_of(net, switch)}")


async def patch(api: httpx.AsyncClient, path: str, **body: object) -> None:
    response = await api.patch(f"{API}{path}", json=body)
    assert response.status_code == 200, response.text


async def test_new_renamed_and_deleted_vms_are_named_on_their_switch(net: Net) -> None:
    web = await create_vm(net.api, "Web Server")
    [nic] = web["network_adapters"]
    await named(net, "Default Switch", (nic["mac"], "web-server"))
    db = await create_vm(net.api, "db")
    db_mac = db["network_adapters"][0]["mac"]
    await named(net, "Default Switch", (nic["mac"], "web-server"), (db_mac, "db"))
    await patch(net.api, "/vms/Web Server", name="v1")
    await named(net, "Default Switch", (nic["mac"], "v1"), (db_mac, "db"))
    await patch(net.api, "/vms/db", notes="a change that is no rename")
    await named(net, "Default Switch", (nic["mac"], "v1"), (db_mac, "db"))
    response = await net.api.delete(f"{API}/vms/v1")
    assert response.status_code == 200, response.text
    await named(net, "Default Switch", (db_mac, "db"))
    # a name with nothing usable, and one another VM's label already has
    await create_vm(net.api, "!!!")
    await create_vm(net.api, "DB")
    await named(net, "Default Switch", (db_mac, "db"))
    assert ("update_hosts", plan_of(net, "Default Switch").bridge) in net.fake.calls


async def test_adapters_added_moved_and_removed_change_the_names(net: Net) -> None:
    await make(net.api, "natnet", "nat", subnet="192.168.100.0/24")
    await make(net.api, "lab", "private")
    vm = await create_vm(net.api, "v1", switches=["lab"])
    [first] = vm["network_adapters"]
    assert hosts_of(net, "natnet") == ()
    response = await net.api.post(f"{API}/vms/v1/adapters", json={"switch": "natnet"})
    assert response.status_code == 201, response.text
    second = response.json()["network_adapters"][-1]["mac"]
    await named(net, "natnet", (second, "v1"))
    # moved in: the VM's first adapter on the switch carries its name
    await patch(net.api, f"/vms/v1/adapters/{first['mac']}", switch="natnet")
    await named(net, "natnet", (first["mac"], "v1"))
    await patch(net.api, f"/vms/v1/adapters/{first['mac']}", switch="Default Switch")
    await named(net, "natnet", (second, "v1"))
    await named(net, "Default Switch", (first["mac"], "v1"))
    await patch(net.api, f"/vms/v1/adapters/{second}", switch="")  # disconnected
    await named(net, "natnet")
    response = await net.api.delete(f"{API}/vms/v1/adapters/{first['mac']}")
    assert response.status_code == 200, response.text
    await named(net, "Default Switch")


async def test_a_running_vm_is_named_and_renamed(net: Net) -> None:
    vm = await create_vm(net.api, "web")
    mac = vm["network_adapters"][0]["mac"]
    await run_job(net.api, "web", "start")
    await named(net, "Default Switch", (mac, "web"))
    await patch(net.api, "/vms/web", name="web2")
    await named(net, "Default Switch", (mac, "web2"))
    await run_job(net.api, "web2", "stop", {"mode": "turn-off"})


async def test_a_new_switch_and_the_rebuild_at_startup_carry_the_names(
        net: Net, host_config: HostConfig, store: MemoryStore) -> None:
    vm = await create_vm(net.api, "web")
    mac = vm["network_adapters"][0]["mac"]
    await named(net, "Default Switch", (mac, "web"))
    await net.service.flush()
    net.fake.switches.clear()  # a reboot: the bridges are gone
    await net.ops.names.close()
    service, ops = await start_net(host_config, store, net.driver, net.fake)
    try:
        assert hosts_of(net, "Default Switch") == ((mac, "web"),)
        await service.update_vm("web", name="web-2")
        await named(net, "Default Switch", (mac, "web-2"))
    finally:
        await stop_net(service, ops)


async def test_without_privilege_nothing_is_pushed(net: Net) -> None:
    net.ops.unavailable = "it lacks CAP_NET_ADMIN"
    calls = len(net.fake.calls)
    await create_vm(net.api, "web", switches=[])
    await net.ops.names.refresh()
    assert net.fake.calls[calls:] == []


async def test_a_failed_push_is_made_good_by_the_next_change(net: Net) -> None:
    net.fake.fail_on["update_hosts"] = HypervisorError("the disk is full")
    vm = await create_vm(net.api, "web")
    mac = vm["network_adapters"][0]["mac"]
    await eventually(lambda: "update_hosts" not in net.fake.fail_on, "the failed push")
    assert hosts_of(net, "Default Switch") == ()
    await patch(net.api, "/vms/web", notes="any change")
    await named(net, "Default Switch", (mac, "web"))
