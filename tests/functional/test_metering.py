"""Resource metering through the REST API and ``hv vm metering`` on the fake driver and
the fake network backend, with the host's counters (CPU time, tap bytes) fixed by the
test: enable, show, reset, disable; totals across a QEMU restart and a restart of the
service; the sampler; the last sample when a VM saves; a deleted VM's record; and
``GET /metrics`` parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from hvstack.api.app import create_app
from hvstack.api.guard import ListenerGuard
from hvstack.cli.main import app as cli
from hvstack.client import url_path
from hvstack.host.auth import TokenStore
from hvstack.host.config import HostConfig
from hvstack.host.metering_probe import ProcessTimes
from hvstack.host.records import METERING
from hvstack.host.root import HostRoot
from hvstack.host.store import MemoryStore
from hvstack.metering.model import Totals, Traffic
from tests.functional.fake_network import FakeNetwork
from tests.functional.fakes import (
    API,
    FakeDriver,
    assert_problem,
    create_vm,
    run_job,
    serve_on_unix_socket,
)
from tests.functional.test_network_switches import start_net, stop_net

MIB = 1024 * 1024


@dataclass
class FakeCounters:
    """The host's counters as the test sets them: CPU seconds by pid (a pid is one
    process, started when first read) and tap bytes by tap name (in the VM's
    direction)."""

    cpu: dict[int, float] = field(default_factory=dict)
    started: dict[int, float] = field(default_factory=dict)
    taps: dict[str, Traffic] = field(default_factory=dict)

    def process(self, pid: int) -> ProcessTimes | None:
        started = self.started.setdefault(pid, time.time())
        return ProcessTimes(f"{pid}:7", started, self.cpu.get(pid, 0.0))

    def tap(self, name: str) -> Traffic | None:
        return self.taps.get(name)


class Metered:
    """A started service with network and metering on fakes, and its API."""

    def __init__(self, root: HostRoot, api: httpx.AsyncClient, driver: FakeDriver,
                 counters: FakeCounters, store: MemoryStore) -> None:
        self.root, self.api, self.driver, self.counters, self.store = (
            root, api, driver, counters, store)

    def vm_id(self, name: str) -> str:
        return self.root.service.get_vm(name).record.id

    def pid(self, name: str) -> int:
        return self.driver.machine_of(self.vm_id(name)).pid

    def io(self, name: str, read: int, written: int) -> None:
        machine = self.driver.machine_of(self.vm_id(name))
        device = next(iter(machine.block_jobs.io), "disk-extra-dev")  # a VM without disks
        machine.block_jobs.io[device] = (read, written)

    def tap(self, name: str, mac: str) -> str:
        return self.root.network.tap(self.vm_id(name), mac)

    async def stored(self, name: str) -> Totals | None:
        entry = await self.store.get(METERING + self.vm_id(name))
        return None if entry is None else Totals.from_json(entry.value)

    async def stored_when(self, name: str, ready: Callable[[Totals], bool]) -> Totals:
        """The stored totals once ``ready`` holds for them (bounded wait)."""
        for _ in range(3000):
            stored = await self.stored(name)
            if stored is not None and ready(stored):
                return stored
            await asyncio.sleep(0.01)
        raise AssertionError(f"the stored totals of {name} never got there: {stored}")

    async def metering(self, name: str, action: str | None = None) -> dict[str, Any]:
        path = API + url_path("vms", name, "metering", *([action] if action else []))
        response = await (self.api.post(path) if action else self.api.get(path))
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        return view


async def start_metered(config: HostConfig, store: MemoryStore, driver: FakeDriver,
                        counters: FakeCounters, fake: FakeNetwork) -> HostRoot:
    service, ops = await start_net(config, store, driver, fake)
    root = HostRoot(service, network=ops)
    root.metering.probe = counters
    await root.metering.start()
    return root


async def stop_metered(root: HostRoot) -> None:
    await stop_net(root.service, root.network)
    await root.metering.close()


@pytest.fixture
async def metered(host_config: HostConfig, store: MemoryStore,
                  driver: FakeDriver) -> AsyncIterator[Metered]:
    fake, counters = FakeNetwork(), FakeCounters()
    root = await start_metered(host_config, store, driver, counters, fake)
    transport = httpx.ASGITransport(app=create_app(root))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hv") as api:
            yield Metered(root, api, driver, counters, store)
    finally:
        driver.release()
        await stop_metered(root)
        fake.close()
        shutil.rmtree(host_config.run_dir, ignore_errors=True)


async def vm_with_two_adapters(m: Metered, name: str) -> tuple[str, str]:
    """A VM on the Default Switch with a user-mode adapter too; its (switch, user)
    MACs."""
    vm = await create_vm(m.api, name)
    response = await m.api.post(API + url_path("vms", name, "adapters"), json={"mode": "user"})
    assert response.status_code == 201, response.text
    nics = response.json()["network_adapters"]
    switch = next(n["mac"] for n in nics if n["mode"] == "switch")
    user = next(n["mac"] for n in nics if n["mode"] == "user")
    assert vm["name"] == name
    return switch, user


async def test_enable_show_reset_disable(metered: Metered) -> None:
    m = metered
    switch_mac, user_mac = await vm_with_two_adapters(m, "web")
    problem = assert_problem(await m.api.get(f"{API}/vms/web/metering"), 409,
                             "metering-disabled")
    assert "hv vm metering enable web" in problem["detail"]
    await run_job(m.api, "web", "start")
    pid, tap = m.pid("web"), m.tap("web", switch_mac)
    m.counters.cpu[pid] = 100.0
    m.io("web", 1000, 2000)
    m.counters.taps[tap] = Traffic(received=10, sent=20)

    enabled = await m.metering("web", "enable")
    assert enabled["enabled"] is True
    assert (enabled["cpu_seconds"], enabled["disk_written_bytes"]) == (0.0, 0)
    assert (await m.metering("web", "enable"))["started_at"] == enabled["started_at"]

    m.counters.cpu[pid] = 103.5
    m.io("web", 1000 + 4096, 2000 + 8192)
    m.counters.taps[tap] = Traffic(received=10 + 300, sent=20 + 500)
    shown = await m.metering("web")
    assert shown["cpu_seconds"] == pytest.approx(3.5)
    assert (shown["disk_read_bytes"], shown["disk_written_bytes"]) == (4096, 8192)
    assert (shown["network_received_bytes"], shown["network_sent_bytes"]) == (300, 500)
    adapters = {a["mac"]: a for a in shown["adapters"]}
    assert adapters[switch_mac] == {"mac": switch_mac, "metered": True,
                                    "received_bytes": 300, "sent_bytes": 500}
    assert adapters[user_mac] == {"mac": user_mac, "metered": False,
                                  "received_bytes": None, "sent_bytes": None}
    assert shown["memory_min_bytes"] == shown["memory_max_bytes"] == 64 * MIB
    assert shown["memory_average_bytes"] == 64 * MIB
    assert shown["running_seconds"] > 0 and shown["cpu_average_percent"] > 0

    reset = await m.metering("web", "reset")
    assert (reset["cpu_seconds"], reset["disk_read_bytes"], reset["network_sent_bytes"]) == (
        0.0, 0, 0)
    assert reset["started_at"] >= shown["started_at"]
    m.counters.cpu[pid] = 104.0
    assert (await m.metering("web"))["cpu_seconds"] == pytest.approx(0.5)

    disabled = await m.metering("web", "disable")
    assert disabled["enabled"] is False and disabled["cpu_seconds"] == pytest.approx(0.5)
    assert await m.stored("web") is None
    assert_problem(await m.api.get(f"{API}/vms/web/metering"), 409, "metering-disabled")
    assert_problem(await m.api.post(f"{API}/vms/web/metering/reset"), 409,
                   "metering-disabled")
    assert_problem(await m.api.post(f"{API}/vms/nope/metering/enable"), 404, "not-found")


async def test_totals_go_on_across_a_restart_of_qemu(metered: Metered) -> None:
    m = metered
    await create_vm(m.api, "db")
    await m.metering("db", "enable")  # while Off: the next process counts whole
    await run_job(m.api, "db", "start")
    m.counters.cpu[m.pid("db")] = 2.0
    m.io("db", 0, 3000)
    assert (await m.metering("db"))["cpu_seconds"] == pytest.approx(2.0)
    m.counters.cpu[m.pid("db")] = 5.0
    m.io("db", 0, 7000)  # not sampled before the VM stops: lost with turn off
    await run_job(m.api, "db", "stop", {"mode": "turn-off"})
    await run_job(m.api, "db", "start")  # a new process: its counters start again
    m.counters.cpu[m.pid("db")] = 1.25
    m.io("db", 100, 500)
    shown = await m.metering("db")
    assert shown["cpu_seconds"] == pytest.approx(2.0 + 1.25)
    assert (shown["disk_read_bytes"], shown["disk_written_bytes"]) == (100, 3000 + 500)


async def test_saving_takes_a_last_sample(metered: Metered) -> None:
    m = metered
    await create_vm(m.api, "app")
    await run_job(m.api, "app", "start")
    await m.metering("app", "enable")
    m.counters.cpu[m.pid("app")] = 9.0
    m.io("app", 0, 123)
    await run_job(m.api, "app", "save")
    stored = await m.stored_when("app", lambda t: t.cpu_seconds > 0)  # sampled at Saving
    assert stored.cpu_seconds == pytest.approx(9.0)
    assert stored.disk_written_bytes == 123


async def test_the_sampler_samples_metered_running_vms(metered: Metered) -> None:
    m = metered
    m.root.metering.interval = 0.01
    await m.root.metering.close()
    await m.root.metering.start()
    for name in ("one", "two"):
        await create_vm(m.api, name)
        await run_job(m.api, name, "start")
    await m.metering("one", "enable")
    m.counters.cpu[m.pid("one")] = 4.0
    m.counters.cpu[m.pid("two")] = 4.0
    stored = await m.stored_when("one", lambda t: t.cpu_seconds > 0)  # no show: sampled
    assert stored.cpu_seconds == pytest.approx(4.0)
    assert await m.stored("two") is None


async def test_totals_survive_a_restart_of_the_service(
        host_config: HostConfig, store: MemoryStore) -> None:
    driver, counters = FakeDriver(), FakeCounters()
    config = replace(host_config, detach_on_exit=True)  # the VM runs on meanwhile
    fake = FakeNetwork()
    try:
        root = await start_metered(config, store, driver, counters, fake)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(root)),
                                     base_url="http://hv") as api:
            await create_vm(api, "svc")
            await run_job(api, "svc", "start")
            vm_id = root.service.get_vm("svc").record.id
            pid = driver.machine_of(vm_id).pid
            await api.post(f"{API}/vms/svc/metering/enable")
            counters.cpu[pid] = 6.0
            assert (await api.get(f"{API}/vms/svc/metering")).json()["cpu_seconds"] == 6.0
        await stop_metered(root)
        fake.close()

        fake = FakeNetwork()
        root = await start_metered(config, store, driver, counters, fake)
        assert root.service.get_vm("svc").machine_running  # reattached
        counters.cpu[pid] = 7.5
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(root)),
                                     base_url="http://hv") as api:
            shown = (await api.get(f"{API}/vms/svc/metering")).json()
            assert shown["cpu_seconds"] == pytest.approx(7.5)
            await run_job(api, "svc", "stop", {"mode": "turn-off"})
        await stop_metered(root)
    finally:
        driver.release()
        fake.close()
        shutil.rmtree(config.run_dir, ignore_errors=True)


async def test_deleting_a_vm_deletes_its_record(metered: Metered) -> None:
    m = metered
    await create_vm(m.api, "gone")
    await m.metering("gone", "enable")
    vm_id = m.vm_id("gone")
    assert await m.store.get(METERING + vm_id) is not None
    response = await m.api.delete(f"{API}/vms/gone")
    assert response.status_code == 200, response.text
    assert await m.store.get(METERING + vm_id) is None


async def test_a_record_of_a_vm_that_is_gone_is_dropped_at_start(
        host_config: HostConfig, store: MemoryStore, driver: FakeDriver) -> None:
    await store.put(METERING + "0123456789abcdef0123456789abcdef", Totals(1.0).to_json())
    fake = FakeNetwork()
    root = await start_metered(host_config, store, driver, FakeCounters(), fake)
    try:
        assert await store.scan(METERING) == []
    finally:
        await stop_metered(root)
        fake.close()


# -- /metrics -------------------------------------------------------------------------


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(family: Any, **labels: str) -> float:
    found = [s.value for s in family.samples if all(s.labels.get(k) == v
                                                    for k, v in labels.items())]
    assert len(found) == 1, (family.name, labels, family.samples)
    return float(found[0])


async def test_metrics_has_every_vm_and_the_host(metered: Metered) -> None:
    m = metered
    switch_mac, _ = await vm_with_two_adapters(m, "web")
    await create_vm(m.api, "idle")
    await run_job(m.api, "web", "start")
    m.counters.cpu[m.pid("web")] = 12.5
    m.io("web", 4096, 8192)
    m.counters.taps[m.tap("web", switch_mac)] = Traffic(received=111, sent=222)
    response = await m.api.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    found = families(response.text)
    web = {"vm": "web", "id": m.vm_id("web")}
    assert value(found["hvstack_vm_state"], **web, state="Running") == 1
    assert value(found["hvstack_vm_state"], vm="idle", state="Off") == 1
    assert value(found["hvstack_vm_state"], vm="idle", state="Running") == 0
    assert found["hvstack_vm_cpu_seconds"].type == "counter"
    assert value(found["hvstack_vm_cpu_seconds"], **web) == 12.5
    assert value(found["hvstack_vm_memory_assigned_bytes"], **web) == 64 * MIB
    assert value(found["hvstack_vm_disk_read_bytes"], **web) == 4096
    assert value(found["hvstack_vm_disk_written_bytes"], **web) == 8192
    assert value(found["hvstack_vm_network_receive_bytes"], **web, adapter=switch_mac) == 111
    assert value(found["hvstack_vm_network_transmit_bytes"], **web, adapter=switch_mac) == 222
    assert [s for s in found["hvstack_vm_cpu_seconds"].samples
            if s.labels["vm"] == "idle"] == []  # no worker: no counters
    assert value(found["hvstack_host_memory_total_bytes"]) == 8 * 1024 * MIB
    assert value(found["hvstack_host_memory_assigned_bytes"]) == 64 * MIB
    # the balancer's pool: 8 GiB less the 1 GiB reserve, less what the VMs hold
    assert value(found["hvstack_host_memory_available_bytes"]) == (7 * 1024 - 64) * MIB
    assert value(found["hvstack_host_vms"], state="Running") == 1
    assert value(found["hvstack_host_vms"], state="Off") == 1
    names = {s.name for f in found.values() for s in f.samples}
    assert "hvstack_vm_cpu_seconds_total" in names
    assert all(n.startswith("hvstack_") for n in names)


async def test_metrics_reads_the_memory_it_is_given(metered: Metered) -> None:
    from hvstack.host.metering import HostMemory, MemoryReading

    m = metered
    await create_vm(m.api, "dyn")
    await run_job(m.api, "dyn", "start")
    m.root.metering.memory = lambda vm_id: MemoryReading(300 * MIB, 120 * MIB)
    m.root.metering.host_memory = lambda: HostMemory(16 * 1024 * MIB, 1024 * MIB,
                                                     300 * MIB, 2048 * MIB)
    found = families((await m.api.get("/metrics")).text)
    assert value(found["hvstack_vm_memory_assigned_bytes"], vm="dyn") == 300 * MIB
    assert value(found["hvstack_vm_memory_demand_bytes"], vm="dyn") == 120 * MIB
    assert value(found["hvstack_host_memory_reserved_bytes"]) == 1024 * MIB
    await m.metering("dyn", "enable")
    assert (await m.metering("dyn"))["memory_max_bytes"] == 300 * MIB


async def test_metrics_needs_a_token_on_tcp(metered: Metered, tmp_path: Path) -> None:
    tokens = TokenStore(tmp_path / "tokens.db")
    guarded = ListenerGuard(create_app(metered.root, tokens=tokens), tokens=tokens)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded),
                                 base_url="https://127.0.0.1:8443") as tcp:
        assert_problem(await tcp.get("/metrics"), 401, "not-authenticated")
        token = tokens.create("prometheus").token
        response = await tcp.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert "hvstack_host_vms" in families(response.text)


# -- the CLI --------------------------------------------------------------------------

runner = CliRunner()


async def hv(host: str, *args: str) -> Any:
    return await asyncio.to_thread(runner.invoke, cli, list(args), env={"HV_HOST": host})


async def test_cli_enable_show_reset_disable(metered: Metered, tmp_path: Path) -> None:
    m = metered
    switch_mac, user_mac = await vm_with_two_adapters(m, "w[b]")
    async with serve_on_unix_socket(create_app(m.root), tmp_path / "hv.sock") as host:
        result = await hv(host, "vm", "metering", "show", "w[b]")
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == (
            "error: metering is not enabled for VM 'w[b]'; enable it with: "
            "hv vm metering enable w[b]")
        result = await hv(host, "vm", "metering", "enable", "w[b]")
        assert result.exit_code == 0, result.output
        assert "Metering VM 'w[b]' since" in result.stdout
        await run_job(m.api, "w[b]", "start")
        m.counters.cpu[m.pid("w[b]")] = 1.0
        m.counters.taps[m.tap("w[b]", switch_mac)] = Traffic(received=2048, sent=4096)
        result = await hv(host, "vm", "metering", "show", "w[b]")
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert "w[b]" in out and "Disk written" in out and "Network in" in out
        assert switch_mac in out and user_mac in out and "not metered" in out
        result = await hv(host, "vm", "metering", "show", "w[b]", "-o", "json")
        view = json.loads(result.stdout)
        assert view["cpu_seconds"] == 1.0 and view["network_received_bytes"] == 2048
        result = await hv(host, "vm", "metering", "reset", "w[b]")
        assert result.exit_code == 0 and "reset" in result.stdout
        result = await hv(host, "vm", "metering", "disable", "w[b]")
        assert result.exit_code == 0 and "disabled" in result.stdout
        assert (await hv(host, "vm", "metering", "show", "w[b]")).exit_code == 2
