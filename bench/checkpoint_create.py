"""Checkpoint creation time on a running VM.

One host service; one Generation 1 VM from the tiny image (256 MiB, TCG, guest agent
answering) with a second, fully allocated qcow2 data disk (``preallocation=falloc``) of
1 GiB, then of 8 GiB (the VM is turned off, the disk swapped, the VM started again).

* production checkpoints (the guest frozen through its agent, every writable disk
  snapshotted onto a new overlay, thawed, recorded): ``POST /vms/NAME/checkpoints`` and
  the job followed, :data:`RUNS` times per disk size. Goal: independent of the disk's
  size, i.e. median(8 GiB) / median(1 GiB) <= :data:`SIZE_GOAL`.
* standard checkpoints (the guest held still, disks snapshotted, memory and device
  state saved, the guest goes on), with :data:`FILL_MIB` MiB of the guest's memory
  filled with random bytes first, :data:`STANDARD_RUNS` times. The baseline, measured
  in the same run on the same file system: writing as many bytes as the checkpoint's
  memory state holds (its file size: the memory in use, zero pages are not saved) to a
  new file, with ``fsync`` (the disk's write speed). Goal: median(standard) /
  median(baseline) <= :data:`STANDARD_GOAL`.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.report import Section, Table, ms, ratio, verdict
from bench.support import JOB_TIMEOUT, ServiceProcess, install_tiny_image, median, percentile
from hvstack.client import ApiError, url_path

RUNS = 8
STANDARD_RUNS = 3
SIZES_GIB = (1, 8)
SIZE_GOAL = 1.5
STANDARD_GOAL = 1.2
FILL_MIB = 128
VM = "bench-checkpoint"
BOOT_TIMEOUT = 300.0
REPO = Path(__file__).resolve().parent.parent


def _exec(service: ServiceProcess, *command: str) -> dict[str, Any]:
    result: dict[str, Any] = service.client.post(url_path("vms", VM, "exec"),
                                                 {"command": list(command),
                                                  "timeout_seconds": 300})
    return result


def _wait_for_agent(service: ServiceProcess) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        try:
            if service.client.get(url_path("vms", VM)).get("heartbeat") == "OK":
                _exec(service, "true")
                return
        except ApiError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the guest agent did not answer")
        time.sleep(1)


def _start(service: ServiceProcess) -> None:
    service.client.wait_job(service.client.post(url_path("vms", VM, "start")),
                            timeout=JOB_TIMEOUT)
    _wait_for_agent(service)


def _checkpoint(service: ServiceProcess, name: str, kind: str) -> tuple[float, dict[str, Any]]:
    began = time.perf_counter()
    job = service.client.post(url_path("vms", VM, "checkpoints"), {"name": name})
    job = service.client.wait_job(job, timeout=JOB_TIMEOUT)
    elapsed = time.perf_counter() - began
    result: dict[str, Any] = job["result"]
    if result["kind"] != kind:
        raise RuntimeError(f"a {result['kind']} checkpoint, not {kind}: {result}")
    return elapsed, result


def _data_disk(data_dir: Path, gib: int) -> Path:
    path = data_dir / "bench-disks" / f"data-{gib}g.qcow2"
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc",
                    "--", str(path), f"{gib}G"], check=True, capture_output=True, timeout=600)
    return path


def _swap_disk(service: ServiceProcess, old: str | None, new: Path) -> None:
    api = service.client
    if old is not None:
        api.request("DELETE", url_path("vms", VM, "disks"), params={"path": old})
    api.post(url_path("vms", VM, "disks"), {"path": str(new), "format": "qcow2"})


def _write_baseline(folder: Path, size: int, payload: bytes, sync: bool = True) -> float:
    target = folder / "baseline.bin"
    began = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, payload[:min(left, len(payload))])
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - began
    target.unlink()
    return elapsed


def _production(service: ServiceProcess, data_dir: Path) -> dict[int, list[float]]:
    times: dict[int, list[float]] = {}
    attached: str | None = None
    for gib in SIZES_GIB:
        disk = _data_disk(data_dir, gib)
        _swap_disk(service, attached, disk)
        attached = service.client.get(url_path("vms", VM))["disks"][-1]["path"]
        _start(service)
        _checkpoint(service, f"warm-{gib}", "production")
        times[gib] = [_checkpoint(service, f"p{gib}-{n}", "production")[0]
                      for n in range(RUNS)]
        service.turn_off(VM)
        attached = service.client.get(url_path("vms", VM))["disks"][-1]["path"]
    return times


def _standard(service: ServiceProcess
              ) -> tuple[list[float], list[float], list[float], list[int]]:
    api = service.client
    api.request("PATCH", url_path("vms", VM), json={"checkpoint_type": "standard"})
    _start(service)
    _exec(service, "sh", "-c", f"dd if=/dev/urandom of=/tmp/fill bs=1M count={FILL_MIB}")
    folder = Path(api.get(url_path("vms", VM))["folder"])
    payload = os.urandom(16 * 1024 * 1024)
    standard: list[float] = []
    baseline: list[float] = []
    cached: list[float] = []
    sizes: list[int] = []
    for n in range(STANDARD_RUNS):
        elapsed, result = _checkpoint(service, f"s-{n}", "standard")
        state = folder / "checkpoints" / f"{result['id']}.vmstate"
        size = state.stat().st_size
        standard.append(elapsed)
        sizes.append(size)
        baseline.append(_write_baseline(folder, size, payload))
        cached.append(_write_baseline(folder, size, payload, sync=False))
    service.turn_off(VM)
    return standard, baseline, cached, sizes


def run(tmp: Path) -> Section:
    data_dir = tmp / "data"
    install_tiny_image(data_dir)
    with ServiceProcess(data_dir) as service:
        api = service.client
        api.post("/vms", {"name": VM, "generation": 1, "memory": "256M", "image": "tiny",
                          "auto_start": "nothing", "auto_stop": "turn-off"})
        api.request("PATCH", url_path("vms", VM), json={"checkpoint_limit": 1000,
                                                        "checkpoint_type": "production"})
        production = _production(service, data_dir)
        standard, baseline, cached, sizes = _standard(service)
    return _section(production, standard, baseline, cached, sizes)


def _section(production: dict[int, list[float]], standard: list[float],
             baseline: list[float], cached: list[float], sizes: list[int]) -> Section:
    small, large = (median(production[g]) for g in SIZES_GIB)
    size_met = large / small <= SIZE_GOAL
    rows = tuple(
        (f"production, {g} GiB data disk", str(len(production[g])), ms(median(production[g])),
         ms(percentile(production[g], 90)),
         "baseline" if g == SIZES_GIB[0] else ratio(median(production[g]) / small),
         "-" if g == SIZES_GIB[0] else f"<= {SIZE_GOAL:.2f}x",
         "baseline" if g == SIZES_GIB[0] else verdict(size_met))
        for g in SIZES_GIB)
    std, base = median(standard), median(baseline)
    std_met = std / base <= STANDARD_GOAL
    mib = median([float(s) for s in sizes]) / 2**20
    std_rows = (
        (f"write {mib:.0f} MiB (the memory state's size) + fsync, same file system "
         "(baseline: memory in use / disk write speed)", str(len(baseline)), ms(base),
         f"{mib / base:.0f} MiB/s", "baseline", "-", "baseline"),
        ("the same bytes without fsync (page cache, as QEMU writes the state)",
         str(len(cached)), ms(median(cached)), f"{mib / median(cached):.0f} MiB/s",
         ratio(median(cached) / base), "- (reported)", "-"),
        ("standard checkpoint of the running VM (held still, snapshot, memory saved, "
         "goes on)", str(len(standard)), ms(std), f"{mib / std:.0f} MiB/s",
         ratio(std / base), f"<= {STANDARD_GOAL:.2f}x", verdict(std_met)),
    )
    headers = ("path", "runs", "median", "p90 / rate", "ratio", "goal", "status")
    return Section(
        name="checkpoint_create",
        title="checkpoint_create: checkpoint creation time on a running VM",
        description=__doc__ or "",
        tables=(Table(headers, rows, "Production checkpoints: time against the data "
                                     "disk's size"),
                Table(headers, std_rows, f"Standard checkpoints with {FILL_MIB} MiB of "
                                         "guest memory filled")),
        notes=(f"production: {ms(small)} with a 1 GiB disk, {ms(large)} with 8 GiB; the "
               "work is a freeze, one overlay per disk and one snapshot transaction, none "
               "of which reads the disk's data",
               "the memory state is written by QEMU's migration to a file without fsync; "
               "the baseline includes fsync (the disk's own write speed)"),
        goals_met=(size_met, std_met),
    )
