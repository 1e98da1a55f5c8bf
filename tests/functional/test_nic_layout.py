"""A Generation 2 VM saved after an adapter was hot added comes back on the hardware it
had: the layout read off the running machine is kept beside the saved state and the
restored machine is built from it (the settings alone would build other hardware)."""

from __future__ import annotations

import json

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


async def test_a_vm_saved_without_hot_plug_keeps_no_layout(net: Net) -> None:
    vm = await create_vm(net.api, "web")
    await run_job(net.api, "web", "start")
    await run_job(net.api, "web", "save")
    files = net.service.registry.files(vm["id"])
    assert files.saved_state.exists() and not files.saved_layout.exists()
    await run_job(net.api, "web", "start")
    spec = net.driver.machine_of(vm["id"]).spec
    assert spec is not None and spec.incoming and spec.layout is None
