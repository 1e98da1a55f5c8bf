"""Live storage migration throughput: ``hv vm move-storage`` of a running VM's disk
against a plain ``qemu-img convert`` of the same disk, in the same run.

One host service with a second storage root, one Generation 1 VM (128 MiB, TCG, no
guest OS: the firmware finds nothing to boot and waits, so the guest writes nothing)
whose disk is a qcow2 of :data:`VIRTUAL` with :data:`DATA` of random data. Each round:

* baseline: ``qemu-img convert -U -f qcow2 -O qcow2`` of the VM's disk (the same
  file, read while QEMU has it open) into the other root, timed from the process's
  start to its exit; the copy is deleted.
* the move: ``POST /vms/NAME/move-storage`` to the other root, timed from the request
  until its job completed (a mirror in write-blocking mode, the pivot, the store, the
  old file deleted); the next round moves it back.

The order of the two alternates by round. Throughput = the disk's allocated bytes /
time. No goal is set by the issue: the ratio is reported.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.report import Section, Table, ratio
from bench.support import ServiceProcess, median
from hvstack.client import url_path

ROUNDS = 4
MIB = 1024 * 1024
VIRTUAL = 2048 * MIB
DATA = 768 * MIB
VM_NAME = "bench-move"
MOVE_TIMEOUT = 900.0


def _make_disk(path: Path) -> None:
    """A qcow2 of VIRTUAL with DATA of random bytes after a zero first MiB (no boot
    sector: the firmware boots nothing)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as out:
        out.write(b"\0" * MIB)
        for _ in range((DATA - MIB) // (16 * MIB)):
            out.write(os.urandom(16 * MIB))
        out.truncate(VIRTUAL)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True)
    raw.unlink()


def _convert(source: Path, target: Path) -> float:
    began = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", str(source),
                    str(target)], check=True)
    took = time.perf_counter() - began
    target.unlink()
    return took


def _move(service: ServiceProcess, destination: Path) -> float:
    began = time.perf_counter()
    job = service.client.post(url_path("vms", VM_NAME, "move-storage"),
                              {"destination": str(destination)})
    service.client.wait_job(job, timeout=MOVE_TIMEOUT)
    return time.perf_counter() - began


def _disk(service: ServiceProcess) -> Path:
    return Path(service.client.get(url_path("vms", VM_NAME))["disks"][0]["path"])


def run(tmp: Path) -> Section:
    data, second = tmp / "data", tmp / "second"
    second.mkdir(parents=True)
    folders = (second / "vm", data / "moved")
    with ServiceProcess(data, ("--storage-root", str(second))) as service:
        disk = data / "bench-disk.qcow2"
        data.mkdir(parents=True, exist_ok=True)
        _make_disk(disk)
        allocated = os.stat(disk).st_blocks * 512
        service.client.post("/vms", {"name": VM_NAME, "generation": 1, "memory": "128M",
                                     "disk": str(disk), "auto_start": "nothing",
                                     "auto_stop": "turn-off"})
        service.client.wait_job(service.client.post(url_path("vms", VM_NAME, "start")))
        converts: list[float] = []
        moves: list[float] = []
        for round_ in range(ROUNDS):
            other = folders[round_ % 2]  # where this round's copies go
            if round_ % 2:
                moves.append(_move(service, other))
            converts.append(_convert(_disk(service), other.parent / "convert.qcow2"))
            if not round_ % 2:
                moves.append(_move(service, other))
        service.turn_off(VM_NAME)

    def rate(seconds: float) -> str:
        return f"{allocated / MIB / seconds:.0f} MiB/s"

    base, moved = median(converts), median(moves)
    table = Table(
        ("path", "rounds", "median time", "throughput", "ratio (throughput)", "result"),
        (("`qemu-img convert -U -f qcow2 -O qcow2` of the disk (baseline)", str(ROUNDS),
          f"{base:.2f} s", rate(base), "baseline", "-"),
         ("`hv vm move-storage` of the running VM (API + job)", str(ROUNDS),
          f"{moved:.2f} s", rate(moved), ratio(base / moved), "- (reported)")))
    notes = (
        f"Disk: qcow2, {VIRTUAL // MIB} MiB virtual, {allocated / MIB:.0f} MiB allocated "
        "(random data), on the same file system for both roots; the VM runs (TCG) with no "
        "guest OS, so nothing writes during the move.",
        "The move's time includes the whole job: creating the target, the mirror "
        "(write-blocking copy mode), the pivot, one store transaction, deleting the old "
        "file; the convert's only the copy.",
        "Both read the disk from the page cache (it was just written) and write into it: "
        "the convert runs at memory speed, so the ratio shows the move's overheads more "
        "than its copy rate: the job polls QEMU's mirror every 0.2 s (`run_job`: for "
        "ready, then after the switch), reads the chain's headers, runs `qemu-img info` "
        "and `create`, adds the nodes and commits the store; with a few hundred MiB these "
        "fixed costs are a large share, with larger disks a smaller one.",
        "All times (s): convert " + ", ".join(f"{t:.2f}" for t in converts) +
        "; move " + ", ".join(f"{t:.2f}" for t in moves) + ".",
    )
    return Section(
        "storage_move", "storage_move: live storage migration against `qemu-img convert`",
        "Throughput of moving a running VM's disk to another storage root with `hv vm "
        "move-storage`, against a plain `qemu-img convert` of the same disk in the same "
        "run. Ratio = move throughput / convert throughput (higher is better).",
        (table,), notes)
