"""Dynamic memory: reaction to a demand step, reclaim, and density.

Reaction and reclaim: one host service; one Generation 1 VM from the tiny image with
dynamic memory (startup :data:`STARTUP`, minimum :data:`MINIMUM`, maximum
:data:`MAXIMUM`, buffer :data:`BUFFER` %), TCG. Once it has settled (the balancer knows
its demand and its assigned memory holds still), :data:`REPS` times:

* demand step: the guest writes :data:`FILL_MIB` MiB into a tmpfs in
  :data:`CHUNK_MIB` MiB pieces, each piece once the guest has room for it (else the
  guest, which holds only what it was given, would run out of memory: the fill's pace
  is the balancer's). *Reaction*: from the end of the fill (its ``exec`` returned) until
  the API's VM view, read every :data:`~bench.memory_guest.POLL` s, reports a demand
  that includes the fill and assigned memory covering it with its buffer (status OK).
  *Growth*: from the start of the fill to the same moment.
* reclaim: the guest deletes the files. *Reclaim*: until the assigned memory is back
  within :data:`RECLAIM_BLOCKS` blocks of what it had settled at before the fill.

Baseline, the physical bound, measured in the same run: a bare QEMU with the same
memory layout (startup boot memory, a virtio-mem region, a balloon) on an overlay of the
tiny image, started by hand (a first plug and unplug, not measured, waits for its guest
to load the driver), then ``qom-set
requested-size`` on the virtio-mem device straight over QMP, polling
``query-memory-devices`` until the device reports the size plugged (then 0 again,
until unplugged), for as much memory as the balancer added in the demand step (median).
The ratios are reaction, growth and reclaim over plug and unplug; no goal is set for
them (reported).

Density: see :mod:`bench.memory_density`. Goal: at least :data:`~bench.memory_density.GOAL`
times as many VMs with dynamic memory as with static memory.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import memory_density
from bench.memory_guest import (
    BLOCK,
    BOOT_TIMEOUT,
    MIB,
    POLL,
    Reading,
    describe,
    died,
    exec_in,
    oom_lines,
    read,
    start,
    wait_settled,
)
from bench.report import Section, Table, ratio, verdict
from bench.support import Qmp, ServiceProcess, install_tiny_image, median
from hvstack.client import ApiError
from hvstack.hypervisor.spec import MEMORY_DEVICE

REPS = 2
STARTUP, MINIMUM, MAXIMUM, BUFFER = "256M", "128M", "1G", 20
FILL_MIB = 128  # plugged memory stays within one 128 MiB memory block of the guest (see notes)
CHUNK_MIB = 8
MARGIN_MIB = 8  # what the guest keeps free while it fills (within its buffer)
RECLAIM_BLOCKS = 4
SETTLE_TIMEOUT = 120.0
STEP_TIMEOUT = 180.0  # the fill, and then the reaction, each
RECLAIM_TIMEOUT = 180.0
PLUG_TIMEOUT = 60.0
VM = "bench-dynmem"
TMPFS = "/run/bench-fill"

FILL_SCRIPT = f"""
need=$(( ({CHUNK_MIB} + {MARGIN_MIB}) * 1024 ))
i=0
while [ $i -lt {FILL_MIB // CHUNK_MIB} ]; do
  until [ "$(awk '/^MemAvailable:/ {{print $2}}' /proc/meminfo)" -ge "$need" ]; do
    sleep 0.1
  done
  dd if=/dev/zero of={TMPFS}/fill$i bs=1M count={CHUNK_MIB} 2>/dev/null || exit 1
  i=$((i + 1))
done
"""


@dataclass(frozen=True)
class Step:
    fill: float  # seconds the fill took
    reaction: float  # fill end -> covered
    growth: float  # fill start -> covered
    reclaim: float  # delete -> back near the settled value
    settled: Reading
    peak: Reading
    back: Reading


def _wait(service: ServiceProcess, test: str, timeout: float,
          done: Callable[[Reading], bool]) -> Reading:
    """Read the VM every POLL s until ``done(reading)``; RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        now = read(service, VM)
        if done(now):
            return now
        if time.monotonic() > deadline:
            raise RuntimeError(f"{test}: not within {timeout:.0f} s; last: {describe(now)}"
                               f"{died(service, VM)}")
        time.sleep(POLL)


def _step(service: ServiceProcess, settled: Reading) -> Step:
    base_demand = settled.demand or 0
    began = time.monotonic()
    exec_in(service, VM, FILL_SCRIPT, timeout=STEP_TIMEOUT)
    filled = time.monotonic()

    def covered(r: Reading) -> bool:
        return (r.demand is not None and r.demand >= base_demand + FILL_MIB * MIB * 0.9
                and r.status == "OK")

    peak = _wait(service, "the demand step", STEP_TIMEOUT, covered)
    settled_at = settled.assigned or 0
    tolerance = RECLAIM_BLOCKS * BLOCK
    exec_in(service, VM, f"rm -f {TMPFS}/fill*", timeout=60)
    freed = time.monotonic()

    def reclaimed(r: Reading) -> bool:
        return r.assigned is not None and r.assigned <= settled_at + tolerance

    back = _wait(service, "the reclaim", RECLAIM_TIMEOUT, reclaimed)
    return Step(filled - began, peak.time - filled, peak.time - began, back.time - freed,
                settled, peak, back)


def _reaction(service: ServiceProcess) -> tuple[list[Step], str]:
    api = service.client
    api.post("/vms", {"name": VM, "generation": 1, "memory": STARTUP, "image": "tiny",
                      "auto_start": "nothing", "auto_stop": "turn-off"})
    api.set_memory(VM, dynamic=True, startup=STARTUP, minimum=MINIMUM, maximum=MAXIMUM,
                   buffer_percent=BUFFER)
    start(service, VM)
    exec_in(service, VM, f"mkdir -p {TMPFS} && mount -t tmpfs -o size=2G tmpfs {TMPFS}")
    steps: list[Step] = []
    failure = ""
    for n in range(REPS):
        try:
            settled = wait_settled(service, VM, SETTLE_TIMEOUT)
            steps.append(_step(service, settled))
        except (ApiError, RuntimeError, TimeoutError) as exc:
            lines = oom_lines(service, VM)
            failure = (f"step {n + 1} of {REPS} failed: {exc}".splitlines()[0]
                       + (f" (guest console: {lines[0]} ... {lines[-1]})" if lines else ""))
            break
    service.turn_off(VM)
    if not steps:
        raise RuntimeError(failure)
    return steps, failure


def _plugged(qmp: Qmp) -> int:
    for device in qmp.execute("query-memory-devices"):
        data = device.get("data", {})
        if data.get("id") == MEMORY_DEVICE:
            return int(data["size"])
    raise RuntimeError(f"no memory device {MEMORY_DEVICE} in query-memory-devices")


def _resize(qmp: Qmp, size: int, timeout: float = PLUG_TIMEOUT) -> float:
    began = time.perf_counter()
    qmp.execute("qom-set", {"path": f"/machine/peripheral/{MEMORY_DEVICE}",
                            "property": "requested-size", "value": size})
    deadline = time.monotonic() + timeout
    while _plugged(qmp) != size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-mem did not reach {size / MIB:.0f} MiB within "
                               f"{timeout:.0f} s (it has {_plugged(qmp) / MIB:.0f} MiB)")
        time.sleep(0.005)
    return time.perf_counter() - began


def _bare_qemu(tmp: Path, image: Path) -> tuple[list[str], Path, Path]:
    """A bare QEMU of the same memory layout as the service's VM (startup boot memory,
    a virtio-mem region, a balloon) on an overlay of the tiny image: argv, QMP socket,
    pid file."""
    tmp.mkdir(parents=True, exist_ok=True)
    overlay, qmp, pidfile = tmp / "bare.qcow2", tmp / "bare-qmp.sock", tmp / "bare.pid"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(image), str(overlay)], check=True, capture_output=True, timeout=60)
    startup = int(STARTUP.removesuffix("M"))
    region = 1024  # MiB: more than any step
    argv = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-smp", "1", "-nodefaults",
            "-display", "none", "-daemonize", "-pidfile", str(pidfile),
            "-m", f"{startup}M,slots=1,maxmem={startup + region}M",
            "-drive", f"file={overlay},format=qcow2,if=ide",
            "-object", f"memory-backend-ram,id=bare-mem,size={region}M,reserve=off",
            "-device", f"virtio-mem-pci,id={MEMORY_DEVICE},memdev=bare-mem,"
                       "block-size=2M,requested-size=0",
            "-device", "virtio-balloon-pci,free-page-reporting=on",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv, qmp, pidfile


def _baseline(tmp: Path, image: Path, amount: int) -> tuple[list[float], list[float]]:
    """Plug and unplug ``amount`` bytes straight over QMP on a bare QEMU."""
    argv, socket_path, pidfile = _bare_qemu(tmp, image)
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    qmp = Qmp(str(socket_path))
    try:
        # Warm-up, not measured: it waits for the guest's boot to load its driver.
        _resize(qmp, amount, BOOT_TIMEOUT)
        _resize(qmp, 0)
        plug: list[float] = []
        unplug: list[float] = []
        for _ in range(REPS):
            plug.append(_resize(qmp, amount))
            unplug.append(_resize(qmp, 0))
        return plug, unplug
    finally:
        with contextlib.suppress(OSError, ConnectionError):
            qmp.execute("quit")
        qmp.close()
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def run(tmp: Path) -> Section:
    data_dir = tmp / "data"
    install_tiny_image(data_dir)
    with ServiceProcess(data_dir) as service:
        steps, failure = _reaction(service)
        grown = median([float((s.peak.assigned or 0) - (s.settled.assigned or 0))
                        for s in steps])
        amount = max(BLOCK, int(grown) // BLOCK * BLOCK)
    plug, unplug = _baseline(tmp / "bare", data_dir / "images" / "tiny.qcow2", amount)
    density = memory_density.run(tmp / "density")
    return _section(steps, failure, amount, plug, unplug, density)


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def _section(steps: list[Step], failure: str, amount: int, plug: list[float],
             unplug: list[float], density: memory_density.Density) -> Section:
    p, u = median(plug), median(unplug)
    reaction = median([s.reaction for s in steps])
    growth = median([s.growth for s in steps])
    reclaim = median([s.reclaim for s in steps])
    headers = ("path", "runs", "median", "min / max", "ratio", "goal")

    def row(label: str, values: list[float], base: float | None) -> tuple[str, ...]:
        m = median(values)
        return (label, str(len(values)), _s(m), f"{_s(min(values))} / {_s(max(values))}",
                "baseline" if base is None else ratio(m / base),
                "-" if base is None else "- (reported)")

    rows = (
        row(f"baseline: virtio-mem plugs {amount / MIB:.0f} MiB asked over QMP "
            "(qom-set requested-size until query-memory-devices says plugged)", plug, None),
        row(f"baseline: virtio-mem unplugs the same {amount / MIB:.0f} MiB", unplug, None),
        row(f"fill: the guest writes {FILL_MIB} MiB into tmpfs, {CHUNK_MIB} MiB once it has "
            "room (paced by the balancer)", [s.fill for s in steps], None),
        row("reaction: fill's end -> the API shows the demand covered with its buffer "
            "(status OK); ratio to the plug", [s.reaction for s in steps], p),
        row("growth: fill's start -> covered; ratio to the plug",
            [s.growth for s in steps], p),
        row(f"reclaim: files deleted -> assigned within {RECLAIM_BLOCKS} blocks of its "
            "settled value; ratio to the unplug", [s.reclaim for s in steps], u),
    )

    def mib(value: int | None) -> str:
        return "?" if value is None else f"{value / MIB:.0f}"

    memory_rows = tuple(
        (str(n + 1), f"{mib(s.settled.assigned)} / {mib(s.settled.demand)}",
         f"{mib(s.peak.assigned)} / {mib(s.peak.demand)}",
         f"{mib(s.back.assigned)} / {mib(s.back.demand)}")
        for n, s in enumerate(steps))
    density_met = density.ratio >= memory_density.GOAL
    return Section(
        name="dynamic_memory",
        title="dynamic_memory: reaction, reclaim and density with dynamic memory",
        description=__doc__ or "",
        tables=(
            Table(headers, rows, f"Reaction and reclaim: startup {STARTUP}, minimum "
                                 f"{MINIMUM}, maximum {MAXIMUM}, buffer {BUFFER} %"),
            Table(("step", "settled: assigned / demand (MiB)", "covered", "reclaimed"),
                  memory_rows, "The VM's memory as the API reported it"),
            memory_density.table(density),
        ),
        notes=(
            f"reaction {_s(reaction)}, growth {_s(growth)} and reclaim {_s(reclaim)} against "
            f"{_s(p)} to plug and {_s(u)} to unplug {amount / MIB:.0f} MiB directly: the "
            "balancer works in rounds (every 2 s) on the guest's statistics (reported "
            "every 2 s), and gives memory back gently (half the surplus per round)",
            f"the fill is {FILL_MIB} MiB so that what virtio-mem plugs stays within one "
            "128 MiB memory block of the guest: each new block needs 2 MiB of contiguous "
            "boot memory for its memory map (vmemmap, an order-9 kernel allocation), which "
            "fails once tmpfs has filled and fragmented the boot memory ('vmemmap alloc "
            "failure' in the guest's console; with 256 MiB the guest then ran out of "
            "memory); hot-plugged memory online movable takes no kernel allocations",
            *([f"reaction: {failure}; the medians are over the steps before it"]
              if failure else []),
            *memory_density.notes(density),
            f"density: {verdict(density_met)} (goal: at least {memory_density.GOAL:.0f}x)",
        ),
        goals_met=(density_met,),
    )
