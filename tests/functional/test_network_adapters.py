"""VM network adapters through the REST API on the fake network backend: taps opened
for a start and closed after, ports closed when the VM stops, adapters added, changed
and removed on stopped and running VMs (also one the guest lets go of only after its
hot remove timed out), and every bad input."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from hvstack.errors import HypervisorError
from hvstack.host.adapter_ops import MachineHotPlug
from hvstack.host.events import Event, Subscription
from hvstack.hypervisor.capabilities import DeviceSpec
from hvstack.hypervisor.spec import TapNetdev, nic_device_id, nic_netdev_id
from hvstack.network.model import MirrorMode
from tests.functional.fakes import API, assert_problem, create_vm, eventually, run_job, show_vm
from tests.functional.test_network_switches import Net, make
from tests.functional.test_network_switches import net as net  # the fixture

ADAPTERS = API + "/vms/web/adapters"


async def add(api: httpx.AsyncClient, **body: object) -> dict[str, object]:
    response = await api.post(ADAPTERS, json=body)
    assert response.status_code == 201, response.text
    nic: dict[str, object] = response.json()["network_adapters"][-1]
    return nic


# -- starting and stopping --------------------------------------------------------------

async def test_a_start_opens_the_taps_and_closes_the_hosts_copies(net: Net) -> None:
    lab = await make(net.api, "lab", "private")
    vm = await create_vm(net.api, "web", switches=["lab", "Default Switch"])
    await run_job(net.api, "web", "start")
    spec = net.driver.machine_of(vm["id"]).spec
    assert spec is not None
    taps = {d.mac: d.backend for d in spec.net_devices}
    assert all(isinstance(b, TapNetdev) for b in taps.values())
    assert sorted(int(b.fd) for b in taps.values()  # type: ignore[union-attr]
                  ) == sorted(spec.pass_fds)
    ports = {p.mac: p for p in net.fake.ports.values()}
    assert ports[vm["network_adapters"][0]["mac"]].bridge == lab["bridge"]
    # The fake QEMU keeps no copy: once the host closed its own, nobody holds the tap.
    for tap in list(net.fake.fds):
        assert not net.fake.open_fds(tap)
    await run_job(net.api, "web", "stop", {"mode": "turn-off"})
    await eventually(lambda: net.fake.ports == {}, "the ports to be closed")


async def test_a_start_that_fails_to_open_a_port_leaves_nothing(net: Net) -> None:
    await make(net.api, "lab", "private")
    await create_vm(net.api, "web", switches=["lab", "Default Switch"])
    net.fake.fail_on["open_port"] = HypervisorError("cannot create the tap")
    job = await run_job(net.api, "web", "start", ok=False)
    assert "cannot create the tap" in job["error"]["detail"]
    assert (await show_vm(net.api, "web"))["state"] == "Off"
    await eventually(lambda: net.fake.ports == {}, "no port left")
    assert net.driver.live_machines() == []


async def test_a_start_refused_by_a_later_check_closes_the_taps(net: Net) -> None:
    vm = await create_vm(net.api, "web")
    net.service.host.available_memory = lambda: 1  # type: ignore[method-assign]
    job = await run_job(net.api, "web", "start", ok=False)
    assert job["error"]["status"] == 422
    await eventually(lambda: net.fake.ports == {}, "the port to be closed")
    assert net.ops.hooks._fds == {}
    assert vm["network_adapters"][0]["switch"]


# -- a stopped VM's adapters ------------------------------------------------------------

async def test_add_change_and_remove_adapters_of_a_stopped_vm(net: Net) -> None:
    await make(net.api, "lab", "private")
    await create_vm(net.api, "web", no_network=True)
    assert (await show_vm(net.api, "web"))["network_adapters"] == []
    nic = await add(net.api, switch="lab", mac="52:54:00:aa:bb:cc",
                    vlan={"mode": "access", "access_id": 10}, bandwidth_max="100M",
                    bandwidth_min="10M", dhcp_guard=True, router_guard=True,
                    acls=[{"action": "deny", "direction": "outbound",
                           "remote": "10.0.0.0/8"}])
    assert (nic["mac"], nic["switch_name"], nic["dynamic_mac"]) == (
        "52:54:00:aa:bb:cc", "lab", False)
    port = nic["port"]
    assert isinstance(port, dict)
    assert port["vlan"]["access_id"] == 10 and port["bandwidth_max"] == 100_000_000
    assert port["acls"] == [{"action": "deny", "direction": "outbound",
                             "remote": "10.0.0.0/8"}]
    user = await add(net.api, mode="user")
    assert (user["mode"], user["switch"]) == ("user", "")
    response = await net.api.patch(f"{ADAPTERS}/52:54:00:AA:BB:CC", json={
        "vlan": {"mode": "trunk", "allowed": "10,20-22", "native": 10},
        "bandwidth_max": 0, "mac": "dynamic"})
    assert response.status_code == 200, response.text
    changed = response.json()["network_adapters"][0]
    assert changed["port"]["vlan"]["allowed"] == [10, 20, 21, 22]
    assert changed["port"]["bandwidth_max"] is None
    assert changed["dynamic_mac"] is True and changed["mac"] != "52:54:00:aa:bb:cc"
    listed = (await net.api.get(ADAPTERS)).json()
    assert [n["mac"] for n in listed] == [changed["mac"], user["mac"]]
    response = await net.api.delete(f"{ADAPTERS}/{user['mac']}")
    assert response.status_code == 200
    assert len(response.json()["network_adapters"]) == 1
    assert net.fake.ports == {}  # a stopped VM has no ports


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"mac": "01:00:5e:00:00:01"}, 400, "multicast"),
    ({"mac": "52:54:00:zz:00:01"}, 400, "six hex pairs"),
    ({"mac": "00:00:00:00:00:00"}, 400, "not usable"),
    ({"mac": "52:54:00:00:00:99"}, 409, "already used by VM 'other'"),
    ({"switch": "nowhere"}, 404, "no switch named 'nowhere'"),
    ({"vlan": {"mode": "access", "access_id": 4095}}, 400, "outside 1-4094"),
    ({"vlan": {"mode": "access", "access_id": 0}}, 400, "outside 1-4094"),
    ({"vlan": {"mode": "trunk", "allowed": "10,5000"}}, 400, "outside 1-4094"),
    ({"vlan": {"mode": "trunk"}}, 400, "at least one"),
    ({"bandwidth_max": "fast"}, 400, "not a rate"),
    ({"bandwidth_max": "10M", "bandwidth_min": "20M"}, 400, "above the maximum"),
    ({"acls": [{"action": "deny", "direction": "inbound", "remote": "10.1.2.3/8"}]}, 400,
     "neither a MAC address nor an IP prefix"),
    ({"mode": "user", "dhcp_guard": True}, 400, "user-mode NAT"),
    ({"mode": "user", "switch": "Default Switch"}, 400, "no switch"),
    ({"model": "rtl8139"}, 400, ""),
])
async def test_bad_adapter_input_changes_nothing(net: Net, body: dict[str, object],
                                                 status: int, words: str) -> None:
    await create_vm(net.api, "other", no_network=True)
    response = await net.api.post(API + "/vms/other/adapters",
                                  json={"mac": "52:54:00:00:00:99", "mode": "user"})
    assert response.status_code == 201, response.text
    before = await create_vm(net.api, "web")
    response = await net.api.post(ADAPTERS, json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    after = await show_vm(net.api, "web")
    assert after["network_adapters"] == before["network_adapters"]


async def test_bad_changes_of_an_adapter(net: Net) -> None:
    vm = await create_vm(net.api, "web")
    mac = vm["network_adapters"][0]["mac"]
    assert_problem(await net.api.patch(f"{ADAPTERS}/52:54:00:01:02:03", json={}), 404,
                   "not-found")
    assert_problem(await net.api.delete(f"{ADAPTERS}/52:54:00:01:02:03"), 404, "not-found")
    await add(net.api, mac="52:54:00:00:00:07")
    assert_problem(await net.api.patch(f"{ADAPTERS}/{mac}", json={
        "mac": "52:54:00:00:00:07"}), 409, "conflict")
    await add(net.api, mirror="destination")
    problem = assert_problem(await net.api.patch(f"{ADAPTERS}/{mac}", json={
        "mirror": "destination"}), 409, "conflict")
    assert "already has a mirror destination" in problem["detail"]


# -- a running VM's adapters ------------------------------------------------------------

async def test_connect_disconnect_and_port_changes_while_running(net: Net) -> None:
    lab = await make(net.api, "lab", "private")
    vm = await create_vm(net.api, "web")
    mac = vm["network_adapters"][0]["mac"]
    await run_job(net.api, "web", "start")
    [tap] = list(net.fake.ports)
    devices = net.driver.machine_of(vm["id"]).devices
    device = nic_device_id(mac)  # the fake machine's devices start empty
    devices.devices[device] = DeviceSpec("virtio-net-pci", device, {"mac": mac})
    response = await net.api.patch(f"{ADAPTERS}/{mac}", json={"switch": ""})
    assert response.status_code == 200, response.text
    assert net.fake.ports[tap].bridge is None
    assert devices.links[device] is False
    response = await net.api.patch(f"{ADAPTERS}/{mac}", json={"switch": "lab"})
    assert response.status_code == 200, response.text
    assert net.fake.ports[tap].bridge == lab["bridge"]
    assert devices.links[device] is True
    response = await net.api.patch(f"{ADAPTERS}/{mac}", json={
        "vlan": {"mode": "access", "access_id": 42}, "mirror": "source"})
    assert response.status_code == 200, response.text
    assert net.fake.ports[tap].settings.vlan.access_id == 42
    assert net.fake.ports[tap].settings.mirror is MirrorMode.SOURCE
    response = await net.api.patch(f"{ADAPTERS}/{mac}", json={"acls": [
        {"action": "deny", "direction": "both", "remote": "10.0.0.0/8"}]})
    assert response.status_code == 200, response.text
    [listed] = (await net.api.get(ADAPTERS)).json()
    assert listed["acl_counters"] == [{"index": 0, "direction": "both", "packets": 0,
                                       "bytes": 0}]
    # the MAC and the model change only while the VM is off
    assert_problem(await net.api.patch(f"{ADAPTERS}/{mac}", json={"mac": "dynamic"}), 409,
                   "invalid-state")
    assert_problem(await net.api.patch(f"{ADAPTERS}/{mac}", json={"mode": "user"}), 409,
                   "invalid-state")
    # a failed port update changes nothing
    net.fake.fail_on["update_port"] = HypervisorError("tc failed")
    assert_problem(await net.api.patch(f"{ADAPTERS}/{mac}", json={
        "bandwidth_max": "1G"}), 500, "hypervisor-error")
    [nic] = (await show_vm(net.api, "web"))["network_adapters"]
    assert nic["port"]["bandwidth_max"] is None and nic["switch_name"] == "lab"


async def test_hot_add_and_remove_while_running(net: Net) -> None:
    vm = await create_vm(net.api, "web")
    await run_job(net.api, "web", "start")
    devices = net.driver.machine_of(vm["id"]).devices
    nic = await add(net.api, switch="Default Switch")
    mac = str(nic["mac"])
    assert nic_device_id(mac) in devices.devices
    [port] = [p for p in net.fake.ports.values() if p.mac == mac]
    response = await net.api.delete(f"{ADAPTERS}/{mac}")
    assert response.status_code == 200, response.text
    assert nic_device_id(mac) not in devices.devices
    assert port.tap not in net.fake.ports
    # a hot add that fails part-way leaves no port and no adapter
    net.fake.fail_on["open_port"] = HypervisorError("no tap")
    assert_problem(await net.api.post(ADAPTERS, json={"switch": "Default Switch"}), 500,
                   "hypervisor-error")
    assert len((await show_vm(net.api, "web"))["network_adapters"]) == 1


async def test_vm_show_has_the_guests_addresses_by_mac(net: Net,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from hvstack.compute.model import ServiceStatus

    vm_view = await create_vm(net.api, "web", switches=["Default Switch", "Default Switch"])
    first, second = (n["mac"] for n in vm_view["network_adapters"])
    await run_job(net.api, "web", "start")
    vm = net.service.get_vm("web")
    answer = [
        {"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [
            {"ip-address": "127.0.0.1", "ip-address-type": "ipv4"}]},
        {"name": "eth0", "hardware-address": first.upper(), "ip-addresses": [
            {"ip-address": "172.16.1.23", "ip-address-type": "ipv4"},
            {"ip-address": "fe80::1", "ip-address-type": "ipv6"}]},
    ]

    async def call(command: str, *args: object, **kwargs: object) -> object:
        assert command == "guest-network-get-interfaces"
        return answer

    monkeypatch.setattr(vm.link, "status", ServiceStatus.OK)
    monkeypatch.setattr(vm.agent, "call", call)
    shown = await show_vm(net.api, "web")
    assert [(n["mac"], n["ip_addresses"]) for n in shown["network_adapters"]] == [
        (first, ["172.16.1.23"]), (second, [])]


async def test_mirror_sources_follow_their_destination(net: Net) -> None:
    await make(net.api, "lab", "private")
    source = await create_vm(net.api, "src", switches=["lab"])
    dest = await create_vm(net.api, "dst", switches=["lab"])
    source_mac = source["network_adapters"][0]["mac"]
    dest_mac = dest["network_adapters"][0]["mac"]
    response = await net.api.patch(f"{API}/vms/src/adapters/{source_mac}",
                                   json={"mirror": "source"})
    assert response.status_code == 200, response.text
    response = await net.api.patch(f"{API}/vms/dst/adapters/{dest_mac}",
                                   json={"mirror": "destination"})
    assert response.status_code == 200, response.text
    await run_job(net.api, "src", "start")
    source_tap, dest_tap = net.ops.tap(source["id"], source_mac), net.ops.tap(dest["id"],
                                                                              dest_mac)
    assert net.fake.ports[source_tap].mirror_to is None  # the destination is not running
    await run_job(net.api, "dst", "start")
    await eventually(lambda: net.fake.ports[source_tap].mirror_to == dest_tap,
                     "the source to mirror to the destination")
    await run_job(net.api, "dst", "stop", {"mode": "turn-off"})
    await eventually(lambda: net.fake.ports[source_tap].mirror_to is None,
                     "the source to stop mirroring")
    await run_job(net.api, "dst", "start")
    await eventually(lambda: net.fake.ports[source_tap].mirror_to == dest_tap,
                     "the source to mirror again")
    response = await net.api.patch(f"{API}/vms/dst/adapters/{dest_mac}",
                                   json={"mirror": "none"})
    assert response.status_code == 200, response.text
    assert net.fake.ports[source_tap].mirror_to is None


async def test_an_adapter_the_guest_lets_go_of_late_leaves_then(net: Net) -> None:
    """A hot remove that timed out keeps the adapter (settings, device, netdev, port);
    when the guest lets go of it later, its netdev and port go and it leaves the
    settings, with an event saying so."""
    vm = await create_vm(net.api, "web")
    await run_job(net.api, "web", "start")
    machine = net.driver.machine_of(vm["id"])
    mac = str((await add(net.api, switch="Default Switch"))["mac"])
    [port] = [p for p in net.fake.ports.values() if p.mac == mac]
    net.ops.adapters.hot_plug = MachineHotPlug(remove_timeout=0.05)
    machine.devices.auto_release = False
    events = net.service.events.subscribe()
    try:
        problem = assert_problem(await net.api.delete(f"{ADAPTERS}/{mac}"), 504, "timeout")
        assert "did not release network adapter" in problem["detail"]
        assert mac in await shown_macs(net)
        assert nic_netdev_id(mac) in machine.devices.netdevs and port.tap in net.fake.ports

        machine.devices.release(nic_device_id(mac))  # the guest, at last
        removed = await asyncio.wait_for(anext_of(events, "vm.adapter-removed"), 30)
        assert (removed.data["mac"], removed.data["late"]) == (mac, True)
        assert nic_netdev_id(mac) not in machine.devices.netdevs
        assert port.tap not in net.fake.ports
        assert mac not in await shown_macs(net)
        assert len(await shown_macs(net)) == 1  # the adapter it started with stays
    finally:
        await events.aclose()


async def test_a_removal_that_finished_in_time_is_finished_once(net: Net) -> None:
    vm = await create_vm(net.api, "web")
    await run_job(net.api, "web", "start")
    machine = net.driver.machine_of(vm["id"])
    events = net.service.events.subscribe()
    try:
        mac = str((await add(net.api, mode="user"))["mac"])
        response = await net.api.delete(f"{ADAPTERS}/{mac}")
        assert response.status_code == 200, response.text
        # The DEVICE_DELETED it caused waits for the lock, which it gets before the save
        # does, and finds nothing left to do.
        await run_job(net.api, "web", "save")
        assert nic_netdev_id(mac) not in machine.devices.netdevs
        seen = []
        async for event in events:
            seen.append(event.type)
            if event.type == "vm.state" and event.data["state"] == "Saved":
                break
        assert "vm.adapter-removed" not in seen
    finally:
        await events.aclose()


async def shown_macs(net: Net) -> list[str]:
    return [str(n["mac"]) for n in (await show_vm(net.api, "web"))["network_adapters"]]


async def anext_of(events: Subscription, kind: str) -> Event:
    async for event in events:
        if event.type == kind:
            return event
    raise AssertionError(f"no {kind} event")
