"""Density: how many idle tiny VMs run in a fixed memory budget, static against dynamic
memory, in the same run.

One host service started with ``--memory-limit`` :data:`BUDGET` (the most memory its
VMs may hold together). Static phase: Generation 1 tiny VMs of :data:`STATIC` each
are started one after another, each waited for until its guest agent runs a command,
until the service refuses a start (HTTP 4xx, insufficient resources) or :data:`CAP`
VMs run. All are turned off. Dynamic phase: the same VMs (and more as needed) with
dynamic memory (startup :data:`STATIC`, minimum :data:`MINIMUM`, maximum
:data:`MAXIMUM`, buffer :data:`BUFFER` %), each also waited for until its assigned
memory has settled, again until a refusal or the cap. At the end of each phase every
guest must still answer through its agent: a guest that stopped answering (or whose
console says it ran out of memory) is not counted. The ratio is dynamic / static; if
the dynamic phase hit the cap, it is a lower bound. Every VM is turned off at the end.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from bench.memory_guest import (
    MIB,
    Reading,
    exec_in,
    oom_lines,
    read,
    start,
    wait_settled,
)
from bench.report import Table, ratio
from bench.support import ServiceProcess, install_tiny_image, median
from hvstack.client import ApiError

BUDGET = "2G"
STATIC = "256M"
MINIMUM, MAXIMUM, BUFFER = "96M", "1G", 20
CAP = 16
GOAL = 2.0
SETTLE_TIMEOUT = 90.0


@dataclass(frozen=True)
class Phase:
    kind: str  # "static" or "dynamic"
    started: int  # VMs the service started
    alive: int  # of which the guest still answers at the end
    refusal: str  # the service's refusal ("" if the cap stopped it)
    seconds: float
    readings: tuple[Reading, ...]  # each running VM at the end
    host: dict[str, int]  # GET /host memory fields at the end
    dead: tuple[str, ...]  # why a VM was not counted, one line each


@dataclass(frozen=True)
class Density:
    static: Phase
    dynamic: Phase

    @property
    def ratio(self) -> float:
        return self.dynamic.alive / max(1, self.static.alive)


def _name(n: int) -> str:
    return f"bench-density-{n:02d}"


def _alive(service: ServiceProcess, name: str) -> str:
    """'' if VM ``name``'s guest answers and never ran out of memory, else why not."""
    lines = oom_lines(service, name)
    if lines:
        return f"{name}: {lines[0]}"
    try:
        exec_in(service, name, "true", timeout=30)
    except (ApiError, RuntimeError) as exc:
        return f"{name}: {exc}".splitlines()[0]
    return ""


def _phase(service: ServiceProcess, kind: str, created: list[str]) -> Phase:
    api = service.client
    began = time.monotonic()
    refusal = ""
    running: list[str] = []
    for n in range(CAP):
        name = _name(n)
        if name not in created:
            api.post("/vms", {"name": name, "generation": 1, "memory": STATIC,
                              "image": "tiny", "auto_start": "nothing",
                              "auto_stop": "turn-off"})
            created.append(name)
        if kind == "dynamic":
            api.set_memory(name, dynamic=True, startup=STATIC, minimum=MINIMUM,
                           maximum=MAXIMUM, buffer_percent=BUFFER)
        else:
            api.set_memory(name, dynamic=False, startup=STATIC)
        try:
            start(service, name)
        except ApiError as exc:
            if 400 <= exc.status < 500:
                refusal = str(exc)
                break
            raise
        running.append(name)
        if kind == "dynamic":
            # Counted, or not, by whether its guest still answers at the end.
            with contextlib.suppress(TimeoutError):
                wait_settled(service, name, SETTLE_TIMEOUT)
    seconds = time.monotonic() - began
    dead = tuple(why for why in (_alive(service, name) for name in running) if why)
    readings = tuple(read(service, name) for name in running)
    host = {k: v for k, v in api.get("/host").items() if k.startswith("memory_")}
    for name in running:
        service.turn_off(name)
    return Phase(kind, len(running), len(running) - len(dead), refusal, seconds, readings,
                 host, dead)


def run(tmp: Path) -> Density:
    data_dir = tmp / "data"
    install_tiny_image(data_dir)
    created: list[str] = []
    with ServiceProcess(data_dir, ("--memory-limit", BUDGET)) as service:
        static = _phase(service, "static", created)
        dynamic = _phase(service, "dynamic", created)
    return Density(static, dynamic)


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / MIB:.0f} MiB"


def _row(phase: Phase, base: Phase | None) -> tuple[str, ...]:
    assigned = [float(r.assigned) for r in phase.readings if r.assigned is not None]
    demand = [float(r.demand) for r in phase.readings if r.demand is not None]
    stop = "refused: " + phase.refusal if phase.refusal else f"cap of {CAP} VMs reached"
    label = (f"static memory, {STATIC} each" if phase.kind == "static" else
             f"dynamic memory, startup {STATIC}, minimum {MINIMUM}, buffer {BUFFER} %")
    return (label, str(phase.started), str(phase.alive),
            _mib(int(median(assigned))) if assigned else "-",
            _mib(int(median(demand))) if demand else "-",
            _mib(phase.host.get("memory_assigned_bytes")),
            stop.replace("\n", " "),
            "baseline" if base is None else
            ratio(phase.alive / max(1, base.alive)) + (" (at least)" if not phase.refusal
                                                         else ""),
            "-" if base is None else f">= {GOAL:.2f}x")


def table(density: Density) -> Table:
    return Table(
        ("memory", "started", "guests answering", "median assigned per VM",
         "median demand", "host: assigned", "stopped by", "ratio", "goal"),
        (_row(density.static, None), _row(density.dynamic, density.static)),
        f"Density: idle tiny VMs in a budget of {BUDGET} (host service --memory-limit)")


def notes(density: Density) -> list[str]:
    out = [f"density: the static phase took {density.static.seconds:.0f} s, the dynamic "
           f"phase {density.dynamic.seconds:.0f} s (each dynamic VM waited for until its "
           "memory settled)"]
    if not density.dynamic.refusal:
        out.append(f"density: the dynamic phase stopped at the cap of {CAP} VMs (the "
                   "machine's 2 cores run every idle TCG guest): the ratio is a lower "
                   "bound")
    for phase in (density.static, density.dynamic):
        out += [f"density, {phase.kind}: not counted: {why}" for why in phase.dead]
    return out
