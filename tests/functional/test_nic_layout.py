"""A VM saved after adapters were hot added or removed comes back on the hardware it had
(Generation 2: root ports; Generation 1: root-bus slots): the layout read off the
running machine is kept beside the saved state and the restored machine is built from
it (the settings alone would build other hardware)."""

from __future__ import annotations

import json

import pytest

from hvstack.compute.nics import LAYOUT_FORMAT
from hvstack.hypervisor.spec import PortLayout
from tests.functional.fakes import API, create_vm, run_job, show_vm
from tests.functional.test_network_switches import Net
from tests.functional.test_network_switches import net as net  # the fixture


async def test_a_vm_saved_after_a_hot_add_is_restored_as_it_ran(net: Net) -> None:
    vm = await create_vm(net.api, "web")
    booted = vm["network_adapters"][0]["mac"]
    await run_job(net.api, "web", "start")
    response = await net.api.post(API + "/vms/web/adapters", json={"mode": "user"})
    assert response.status_code == 201, response.text
    added = response.json()["network_adapters"][-1]["mac"]
    await run_job(net.api, "web", "save")
    files = net.service.registry.files(vm["id"])
    kept = PortLayout.from_json(json.loads(files.saved_layout.read_text()))
    assert kept == PortLayout.at_launch([booted]).plugged(added, "hotplug-port-0")

    await run_job(net.api, "web", "start")
    spec = net.driver.machine_of(vm["id"]).spec
    assert spec is not None and spec.incoming and spec.layout == kept
    assert {n.mac: spec.nic_bus(n) for n in spec.net_devices} == {
        booted: f"port-{booted.replace(':', '')}", added: "hotplug-port-0"}
    assert (await show_vm(net.api, "web"))["state"] == "Running"


async def test_a_vm_saved_without_hot_plug_keeps_only_the_format(net: Net) -> None:
    """Every save writes the layout file (it tells this release's saved state from the
    previous release's); without hot plug it holds nothing but its format."""
    vm = await create_vm(net.api, "web")
    await run_job(net.api, "web", "start")
    await run_job(net.api, "web", "save")
    files = net.service.registry.files(vm["id"])
    assert files.saved_state.exists()
    assert json.loads(files.saved_layout.read_text()) == {"format": LAYOUT_FORMAT}
    await run_job(net.api, "web", "start")
    spec = net.driver.machine_of(vm["id"]).spec
    assert spec is not None and spec.incoming and spec.layout is None
    assert not spec.legacy_nic_layout and spec.root_ports()
    assert not files.saved_layout.exists()  # gone with the state it described


async def test_a_generation_1_vm_saved_after_add_add_remove_is_restored_as_it_ran(
        net: Net) -> None:
    """Generation 1 adapters sit on root-bus slots; after adding two and removing the
    first, the settings alone would put the second on another slot than it has."""
    vm = await create_vm(net.api, "old", generation=1)
    booted = vm["network_adapters"][0]["mac"]
    await run_job(net.api, "old", "start")
    added = []
    for _ in range(2):
        response = await net.api.post(API + "/vms/old/adapters", json={"mode": "user"})
        assert response.status_code == 201, response.text
        added.append(response.json()["network_adapters"][-1]["mac"])
    machine = net.driver.machine_of(vm["id"])
    assert {d.id: d.properties["addr"] for d in machine.devices.devices.values()} == {
        f"nic-{m.replace(':', '')}": a for m, a in zip([booted, *added],
                                                        ["0x10", "0x11", "0x12"],
                                                        strict=True)}
    response = await net.api.delete(API + f"/vms/old/adapters/{added[0]}")
    assert response.status_code == 200, response.text
    await run_job(net.api, "old", "save")
    files = net.service.registry.files(vm["id"])
    kept = PortLayout.from_json(json.loads(files.saved_layout.read_text()))
    assert kept == PortLayout(slots=((booted, 0x10), (added[1], 0x12)))

    await run_job(net.api, "old", "start")
    spec = net.driver.machine_of(vm["id"]).spec
    assert spec is not None and spec.incoming and spec.layout == kept
    assert {n.mac: spec.nic_slot(n) for n in spec.net_devices} == {booted: 0x10,
                                                                   added[1]: 0x12}
    assert '"addr":"0x12"' in " ".join(net.driver.machine_of(vm["id"]).argv)
    assert (await show_vm(net.api, "old"))["state"] == "Running"
    # a cold start lays the adapters out from the settings again
    await run_job(net.api, "old", "stop", {"mode": "turn-off"})
    await run_job(net.api, "old", "start")
    spec = net.driver.machine_of(vm["id"]).spec
    assert spec is not None and spec.layout is None
    assert sorted(spec.nic_slot(n) or 0 for n in spec.net_devices) == [0x10, 0x11]


# -- a state saved by the previous release (88d3ce2: no layout file) -----------------------


@pytest.mark.parametrize("generation", [1, 2])
async def test_a_state_the_previous_release_saved_is_restored_on_its_hardware(
        net: Net, generation: int) -> None:
    """Release 88d3ce2 kept no layout file and placed the adapters itself: its state
    is restored on that hardware; hot plug is refused (with what to do) until the VM
    starts from Off again, a save in between keeps saying so, and a start from Off
    brings this release's layout."""
    vm = await create_vm(net.api, "old", generation=generation)
    mac = vm["network_adapters"][0]["mac"]
    await run_job(net.api, "old", "start")
    await run_job(net.api, "old", "save")
    files = net.service.registry.files(vm["id"])
    files.saved_layout.unlink()  # as the previous release left it

    await run_job(net.api, "old", "start")
    machine = net.driver.machine_of(vm["id"])
    assert machine.spec is not None and machine.spec.incoming
    assert machine.spec.legacy_nic_layout and machine.spec.layout is None
    assert machine.spec.root_ports() == ()
    assert not [a for a in machine.argv if "pcie-root-port" in a or '"addr"' in a]
    assert (await show_vm(net.api, "old"))["state"] == "Running"

    for response in (await net.api.post(API + "/vms/old/adapters", json={"mode": "user"}),
                     await net.api.delete(API + f"/vms/old/adapters/{mac}")):
        assert response.status_code == 409, response.text
        assert "restart the VM once" in response.json()["detail"]
    assert [n["mac"] for n in (await show_vm(net.api, "old"))["network_adapters"]] == [mac]
    assert list(machine.devices.devices) == [f"nic-{mac.replace(':', '')}"]

    await run_job(net.api, "old", "save")  # saved again before any restart
    assert json.loads(files.saved_layout.read_text()) == {"format": LAYOUT_FORMAT,
                                                          "legacy_nic_layout": True}
    await run_job(net.api, "old", "start")
    spec = net.driver.machine_of(vm["id"]).spec
    assert spec is not None and spec.incoming and spec.legacy_nic_layout

    await run_job(net.api, "old", "stop", {"mode": "turn-off"})
    await run_job(net.api, "old", "start")
    spec = net.driver.machine_of(vm["id"]).spec
    assert spec is not None and not spec.incoming and not spec.legacy_nic_layout
    response = await net.api.post(API + "/vms/old/adapters", json={"mode": "user"})
    assert response.status_code == 201, response.text
