"""The API's views of resource metering (pydantic): Measure-VM's report of a VM."""

from __future__ import annotations

from pydantic import BaseModel, Field

from hvstack.host.metering import Measurement


class AdapterMeteringView(BaseModel):
    mac: str
    metered: bool = Field(description="false: the adapter has no counters (user-mode "
                                      "NAT runs inside QEMU); its byte counts are null")
    received_bytes: int | None = Field(description="bytes that came in to the VM")
    sent_bytes: int | None = Field(description="bytes the VM sent out")


class MeteringView(BaseModel):
    vm: str
    vm_id: str
    enabled: bool = Field(description="false only in the answer to disable: the last "
                                      "totals, which are then dropped")
    started_at: float = Field(description="when metering was enabled or last reset "
                                          "(seconds since the epoch)")
    measured_at: float
    duration_seconds: float = Field(description="since enabled or last reset")
    running_seconds: float = Field(description="of it, the time the VM's worker ran")
    cpu_seconds: float = Field(description="processor time of the VM's QEMU process")
    cpu_average_percent: float | None = Field(
        description="average use of one host processor while the VM ran (100 = one "
                    "processor busy)")
    memory_average_bytes: int | None = Field(description="assigned memory, averaged "
                                                          "over the time the VM ran")
    memory_min_bytes: int | None
    memory_max_bytes: int | None
    disk_read_bytes: int
    disk_written_bytes: int
    network_received_bytes: int = Field(description="in to the VM, metered adapters")
    network_sent_bytes: int = Field(description="out of the VM, metered adapters")
    adapters: list[AdapterMeteringView]


def metering_view(measurement: Measurement) -> MeteringView:
    r = measurement.report
    return MeteringView(
        vm=measurement.vm, vm_id=measurement.vm_id, enabled=measurement.enabled,
        started_at=r.started_at, measured_at=r.at, duration_seconds=r.duration_seconds,
        running_seconds=r.running_seconds, cpu_seconds=r.cpu_seconds,
        cpu_average_percent=r.cpu_average_percent,
        memory_average_bytes=r.memory_average_bytes, memory_min_bytes=r.memory_min_bytes,
        memory_max_bytes=r.memory_max_bytes, disk_read_bytes=r.disk_read_bytes,
        disk_written_bytes=r.disk_written_bytes,
        network_received_bytes=r.network_received_bytes,
        network_sent_bytes=r.network_sent_bytes,
        adapters=[AdapterMeteringView(mac=a.mac, metered=a.metered,
                                      received_bytes=a.received_bytes,
                                      sent_bytes=a.sent_bytes) for a in r.adapters])
