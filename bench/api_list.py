"""The API at scale: listing 1,000 VMs, and defining VMs with a new disk.

1. One host service with 1,000 VMs defined (``POST /api/v1/vms`` with only a name and
   memory: no disks, they stay Off). ``GET /api/v1/vms`` is timed over
   :data:`REQUESTS` requests through the Python client (HTTP over the unix socket,
   one kept-alive connection, JSON decoding included), alternating with the baseline
   ``GET /api/v1/host``, a trivial endpoint. Goal: p99 of the list <= 50 ms.
2. A fresh host service: :data:`DEFINED_WITH_DISK` VMs defined in a row, each with a
   new 16 MiB disk (``new_disk``, so ``qemu-img`` runs), reported as VMs per second;
   the baseline is the rate of as many bare ``qemu-img create`` calls. The two are
   interleaved in blocks so that both see the same machine. No goal: reported.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from bench.report import Section, Table, ms, ratio, verdict
from bench.support import ServiceProcess, median, percentile

DEFINED = 1000
REQUESTS = 400
WARMUP = 10
GOAL_P99 = 0.050
DEFINED_WITH_DISK = 200
BLOCK = 20
DISK_SIZE = "16M"
DISK_BYTES = 16 * 1024 * 1024


def _timed_get(service: ServiceProcess, path: str) -> float:
    began = time.perf_counter()
    service.client.get(path)
    return time.perf_counter() - began


def _measure_list(workdir: Path) -> tuple[list[float], list[float], float, int, float]:
    """Define the VMs, then time the list and the baseline, alternating."""
    with ServiceProcess(workdir / "list") as service:
        began = time.perf_counter()
        for index in range(DEFINED):
            service.client.post("/vms", {"name": f"vm-{index:04d}", "memory": "128M"})
        define_seconds = time.perf_counter() - began
        vms = service.client.get("/vms")
        if len(vms) != DEFINED:
            raise RuntimeError(f"the host lists {len(vms)} VMs, not {DEFINED}")
        body = json.dumps(vms)
        decode = median([_time_decode(body) for _ in range(5)])
        for _ in range(WARMUP):
            _timed_get(service, "/vms")
            _timed_get(service, "/host")
        lists: list[float] = []
        hosts: list[float] = []
        for index in range(REQUESTS):
            if index % 2:
                lists.append(_timed_get(service, "/vms"))
                hosts.append(_timed_get(service, "/host"))
            else:
                hosts.append(_timed_get(service, "/host"))
                lists.append(_timed_get(service, "/vms"))
    return lists, hosts, define_seconds, len(body), decode


def _time_decode(body: str) -> float:
    began = time.perf_counter()
    json.loads(body)
    return time.perf_counter() - began


def _qemu_img_create(path: Path) -> float:
    began = time.perf_counter()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "--", str(path), str(DISK_BYTES)],
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True)
    return time.perf_counter() - began


def _baseline_block(scratch: Path, block: int, times: list[float]) -> None:
    for i in range(BLOCK):
        times.append(_qemu_img_create(scratch / f"disk-{block}-{i}.qcow2"))


def _service_block(service: ServiceProcess, block: int, times: list[float]) -> None:
    for i in range(BLOCK):
        began = time.perf_counter()
        service.client.post("/vms", {"name": f"disk-vm-{block}-{i}", "memory": "128M",
                                     "new_disk": DISK_SIZE})
        times.append(time.perf_counter() - began)


def _measure_define(workdir: Path) -> tuple[list[float], list[float]]:
    """Define VMs with a new disk and run bare qemu-img creates, in alternating blocks."""
    scratch = workdir / "qemu-img"
    scratch.mkdir()
    creates: list[float] = []
    defines: list[float] = []
    with ServiceProcess(workdir / "define") as service:
        for block in range(DEFINED_WITH_DISK // BLOCK):
            if block % 2:
                _baseline_block(scratch, block, creates)
                _service_block(service, block, defines)
            else:
                _service_block(service, block, defines)
                _baseline_block(scratch, block, creates)
    return defines, creates


def run(workdir: Path) -> Section:
    lists, hosts, define_seconds, body_bytes, decode = _measure_list(workdir)
    defines, creates = _measure_define(workdir)

    list_p99 = percentile(lists, 99)
    host_p50, host_p99 = median(hosts), percentile(hosts, 99)
    met = list_p99 <= GOAL_P99
    latency = Table(
        headers=("request", "requests", "p50", "p99", "baseline p50 / p99 (`GET /host`)",
                 "ratio p50 / p99", "goal", "result"),
        rows=(
            (f"`GET /api/v1/vms` ({DEFINED} VMs)", str(len(lists)), ms(median(lists)),
             ms(list_p99), f"{ms(host_p50)} / {ms(host_p99)}",
             f"{ratio(median(lists) / host_p50)} / {ratio(list_p99 / host_p99)}",
             f"p99 <= {ms(GOAL_P99)}", verdict(met)),
            ("`GET /api/v1/host` (baseline)", str(len(hosts)), ms(host_p50), ms(host_p99),
             "-", "-", "-", "baseline"),
        ),
        caption=f"Listing with {DEFINED} VMs defined:",
    )
    define_rate = len(defines) / sum(defines)
    create_rate = len(creates) / sum(creates)
    rates = Table(
        headers=("operation", "count", "per second", "median each", "p90 each",
                 "baseline (`qemu-img create`)", "ratio (rate / baseline rate)", "goal"),
        rows=(
            (f"define a VM with a new {DISK_SIZE} disk (`POST /vms`, `new_disk`)",
             str(len(defines)), f"{define_rate:.1f}", ms(median(defines)),
             ms(percentile(defines, 90)), f"{create_rate:.1f}/s",
             ratio(define_rate / create_rate), "- (reported)"),
            (f"bare `qemu-img create -f qcow2` of {DISK_SIZE} (baseline)", str(len(creates)),
             f"{create_rate:.1f}", ms(median(creates)), ms(percentile(creates, 90)), "-", "-",
             "baseline"),
            (f"context: define a VM without disks ({DEFINED} in a row, step 1)", str(DEFINED),
             f"{DEFINED / define_seconds:.1f}", "-", "-", "-", "-", "-"),
        ),
        caption=f"Defining {DEFINED_WITH_DISK} VMs in a row:",
    )
    notes = (
        f"The list response is {body_bytes / 1024:.0f} KiB of JSON; decoding it in the "
        f"client takes {ms(decode)} of each list request's time.",
        f"Requests go one at a time over one kept-alive connection; list and host requests "
        f"alternate, after {WARMUP} warm-up requests of each.",
        f"Defining: {DEFINED_WITH_DISK // BLOCK} blocks of {BLOCK}, alternating between the "
        "service and the baseline, on a fresh host service (no other VMs); the VMs are "
        "Generation 2 (the default), which also copies the OVMF variable store.",
    )
    return Section(
        name="api_list",
        title="api_list: the API with 1,000 VMs, and defining VMs",
        description=(
            "Latency of `GET /api/v1/vms` with 1,000 VMs defined (no disks, all Off), "
            "measured through the Python client, against the trivial `GET /api/v1/host` "
            f"in the same run; goal: p99 <= {ms(GOAL_P99)}. And the rate of defining "
            f"{DEFINED_WITH_DISK} VMs with a new {DISK_SIZE} disk, against the rate of as "
            "many bare `qemu-img create` calls."
        ),
        tables=(latency, rates),
        notes=notes,
        goals_met=(met,),
    )
