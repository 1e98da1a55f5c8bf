"""``GET /metrics``: the host and its VMs in Prometheus' text format.

A collector is built at each scrape from :meth:`hvstack.host.metering.Metering.live`:
the raw counters of every VM with a worker, read at that moment (metered or not; they
start from zero when the VM's QEMU starts, which Prometheus' ``rate`` expects of a
counter), and the host's memory. Every family has the ``hvstack_`` prefix; counters end
in ``_total``; units are bytes and seconds. VM series carry the labels ``vm`` (name)
and ``id``; adapter series ``adapter`` (the MAC) as well. The listener guard protects
it like every route (a bearer token on TCP).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from hvstack.api.deps import metering_of
from hvstack.compute.model import VmState
from hvstack.host.metering import HostMemory, LiveVm

router = APIRouter(tags=["metrics"])

VM_LABELS = ["vm", "id"]
Family = TypeVar("Family", CounterMetricFamily, GaugeMetricFamily)


class _Scrape(Collector):
    """The families of one scrape, read before the registry renders them."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _per_vm(family: Family, vms: list[LiveVm], value: str) -> Family:
    for vm in vms:
        reading = getattr(vm, value)
        if reading is not None:
            family.add_metric([vm.name, vm.id], reading)
    return family


def vm_families(vms: list[LiveVm]) -> list[Metric]:
    state = GaugeMetricFamily("hvstack_vm_state", "1 for the state the VM is in, else 0",
                              labels=[*VM_LABELS, "state"])
    for vm in vms:
        for each in VmState:
            state.add_metric([vm.name, vm.id, each.value], 1.0 if vm.state is each else 0.0)
    assigned = GaugeMetricFamily("hvstack_vm_memory_assigned_bytes",
                                 "memory assigned to the running VM", labels=VM_LABELS)
    demand = GaugeMetricFamily("hvstack_vm_memory_demand_bytes",
                               "memory the running VM's guest uses (when known)",
                               labels=VM_LABELS)
    for vm in vms:
        if vm.memory is not None:
            assigned.add_metric([vm.name, vm.id], vm.memory.assigned_bytes)
            if vm.memory.demand_bytes is not None:
                demand.add_metric([vm.name, vm.id], vm.memory.demand_bytes)
    received = CounterMetricFamily("hvstack_vm_network_receive_bytes",
                                   "bytes that came in to the VM through a switch "
                                   "adapter, since its QEMU started",
                                   labels=[*VM_LABELS, "adapter"])
    sent = CounterMetricFamily("hvstack_vm_network_transmit_bytes",
                               "bytes the VM sent through a switch adapter, since its "
                               "QEMU started", labels=[*VM_LABELS, "adapter"])
    for vm in vms:
        for mac, traffic in vm.adapters:
            received.add_metric([vm.name, vm.id, mac], traffic.received)
            sent.add_metric([vm.name, vm.id, mac], traffic.sent)
    return [
        state,
        _per_vm(CounterMetricFamily("hvstack_vm_cpu_seconds",
                                    "processor time of the VM's QEMU process since it "
                                    "started", labels=VM_LABELS), vms, "cpu_seconds"),
        assigned, demand,
        _per_vm(CounterMetricFamily("hvstack_vm_disk_read_bytes",
                                    "bytes the VM read from its disks since its QEMU "
                                    "started", labels=VM_LABELS), vms, "disk_read_bytes"),
        _per_vm(CounterMetricFamily("hvstack_vm_disk_written_bytes",
                                    "bytes the VM wrote to its disks since its QEMU "
                                    "started", labels=VM_LABELS), vms, "disk_written_bytes"),
        received, sent,
    ]


def host_families(vms: list[LiveVm], memory: HostMemory) -> list[Metric]:
    families: list[Metric] = []
    for name, value, text in (
        ("total", memory.total_bytes, "the host's memory"),
        ("reserved", memory.reserved_bytes, "memory the host keeps for itself"),
        ("assigned", memory.assigned_bytes, "memory assigned to running VMs"),
        ("available", memory.available_bytes, "memory a VM starting now could get"),
    ):
        if value is not None:
            families.append(GaugeMetricFamily(f"hvstack_host_memory_{name}_bytes", text,
                                              value=value))
    counts = GaugeMetricFamily("hvstack_host_vms", "VMs of the host by state",
                               labels=["state"])
    for each in VmState:
        counts.add_metric([each.value], sum(vm.state is each for vm in vms))
    return [*families, counts]


def exposition(vms: list[LiveVm], memory: HostMemory) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape([*vm_families(vms), *host_families(vms, memory)]))
    return generate_latest(registry)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """The host and its VMs for Prometheus (text exposition format)."""
    vms, memory = await metering_of(request).live()
    return Response(exposition(vms, memory), media_type=CONTENT_TYPE_LATEST)
