"""Control-plane overhead of ``hv vm start``: the service against QEMU started by hand.

One host service, one Generation 1 VM with a small new empty disk and 128 MiB of memory
(no guest image, so the guest's boot does not matter). "QEMU running" means the same
for every path: the daemonizing QEMU's parent has exited and QMP ``query-status`` says
``running`` (for the service: its start job completed with the VM Running, which it
reports once it has launched QEMU and connected to its QMP monitor).

* baseline, by hand: the VM's own argv, built by ``build_argv`` from the spec made the
  way ``HostService._spec_for`` makes it (the benchmark checks that it equals the
  command line of the QEMU the service starts), run with ``subprocess.run``; then
  connect to QMP and ask ``query-status``.
* the service through the Python client: ``POST /vms/NAME/start``, then follow the job.
* the service through the ``hv`` CLI: ``hv vm start NAME`` as a new process (this adds
  Python's start-up; reported, but the goal applies to the API path).

Runs alternate between the paths (the order rotates each round; the CLI, slow to
start, runs in fewer rounds) and the VM is turned off between runs.
Goal: median(service via API) / median(by hand) <= 1.10.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import Section, Table, ms, ratio, verdict
from bench.support import (
    JOB_TIMEOUT,
    QEMU_EXIT_TIMEOUT,
    Qmp,
    ServiceProcess,
    hv_command,
    median,
    percentile,
    wait_exit,
)
from hvstack.client import url_path
from hvstack.host.config import HostConfig
from hvstack.host.records import VmRecords
from hvstack.host.service import HostService
from hvstack.host.store import MemoryStore, SqliteStore
from hvstack.hypervisor.qemu import process
from hvstack.hypervisor.qemu.argv import build_argv
from hvstack.hypervisor.qemu.driver import QemuDriver
from hvstack.hypervisor.spec import MachineSpec

RUNS = 60  # hand and API runs each
CLI_RUNS = 10  # CLI runs (each costs a Python start-up), spread over the rounds
GOAL = 1.10
VM_NAME = "bench-start"
VM_BODY = {"name": VM_NAME, "generation": 1, "memory": "128M", "new_disk": "16M",
           "auto_start": "nothing", "auto_stop": "turn-off"}


def spec_for(config: HostConfig, vm_id: str) -> MachineSpec:
    """The VM's QEMU spec, made by the host service's own code from the stored record."""
    store = SqliteStore(config.data_dir / "hvstack.db")
    try:
        record = next(r for r in asyncio.run(VmRecords(store).load()) if r.id == vm_id)
    finally:
        store.close()
    service = HostService(config, MemoryStore(), QemuDriver())
    return service._spec_for(record, False)


class HandStarter:
    """Start and turn off the VM's QEMU without the host service."""

    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self.argv = build_argv(spec)
        self._qmp: Qmp | None = None
        self._pid: int | None = None

    def start(self) -> float:
        pidfile = Path(self.spec.paths.pidfile)
        pidfile.unlink(missing_ok=True)
        Path(self.spec.paths.qmp_socket).parent.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        proc = subprocess.run(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True,
                              timeout=JOB_TIMEOUT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"QEMU failed to start: {proc.stderr.decode(errors='replace')}")
        qmp = Qmp(self.spec.paths.qmp_socket)
        status = qmp.execute("query-status")["status"]
        elapsed = time.perf_counter() - began
        self._qmp = qmp
        self._pid = process.read_pid(pidfile)
        if status != "running":
            raise RuntimeError(f"QEMU started by hand is {status}, not running")
        return elapsed

    def turn_off(self) -> None:
        qmp, self._qmp = self._qmp, None
        pid, self._pid = self._pid, None
        if qmp is not None:
            with contextlib.suppress(OSError, ConnectionError):
                qmp.execute("quit")
            qmp.close()
        if pid is not None:
            wait_exit(pid, self.spec.vm_id, QEMU_EXIT_TIMEOUT)


def _api_start(service: ServiceProcess) -> float:
    began = time.perf_counter()
    job = service.client.post(url_path("vms", VM_NAME, "start"))
    job = service.client.wait_job(job, timeout=JOB_TIMEOUT)
    elapsed = time.perf_counter() - began
    if (job.get("result") or {}).get("state") != "Running":
        raise RuntimeError(f"the start job ended without the VM running: {job}")
    return elapsed


def _cli(service: ServiceProcess, *args: str) -> tuple[float, str]:
    began = time.perf_counter()
    proc = subprocess.run([*hv_command(), *args, "-o", "json"], env=service.cli_env,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT, check=False)
    elapsed = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"hv {' '.join(args)} failed: {proc.stderr.strip()}")
    return elapsed, proc.stdout


def _cli_start(service: ServiceProcess) -> float:
    elapsed, out = _cli(service, "vm", "start", VM_NAME)
    state = (json.loads(out).get("result") or {}).get("state")
    if state != "Running":
        raise RuntimeError(f"hv vm start ended with the VM {state}")
    return elapsed


def _check_same_argv(service: ServiceProcess, hand: HandStarter) -> None:
    """The service's QEMU must run exactly the argv the baseline runs."""
    pid = service.client.get(url_path("vms", VM_NAME))["pid"]
    running = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    if running != hand.argv:
        differ = sorted(set(running) ^ set(hand.argv))
        raise RuntimeError(f"the service runs another QEMU command line; differences: {differ}")


def run(workdir: Path, runs: int = RUNS, cli_runs: int = CLI_RUNS) -> Section:
    with ServiceProcess(workdir / "data") as service:
        vm = service.client.post("/vms", VM_BODY)
        hand = HandStarter(spec_for(service.config, vm["id"]))

        def api() -> float:
            elapsed = _api_start(service)
            service.turn_off(VM_NAME)
            return elapsed

        def cli() -> float:
            elapsed = _cli_start(service)
            service.turn_off(VM_NAME)
            return elapsed

        def by_hand() -> float:
            try:
                return hand.start()
            finally:
                hand.turn_off()

        def cli_trivial() -> float:
            return _cli(service, "host", "info")[0]

        # Warm-up (not counted): page cache, the service's first requests, and the check
        # that both paths run the same command line.
        _api_start(service)
        _check_same_argv(service, hand)
        service.turn_off(VM_NAME)
        by_hand()
        cli()
        cli_trivial()

        times: dict[str, list[float]] = {"hand": [], "api": [], "cli": [], "cli-trivial": []}
        every = max(1, runs // max(1, cli_runs))
        for round_ in range(runs):
            paths: list[tuple[str, Callable[[], float]]] = [("hand", by_hand), ("api", api)]
            if round_ % every == 0 and len(times["cli"]) < cli_runs:
                paths += [("cli", cli), ("cli-trivial", cli_trivial)]
            shift = round_ % len(paths)
            for name, measure in paths[shift:] + paths[:shift]:
                times[name].append(measure())
    return _section(times, len(hand.argv))


def _section(times: dict[str, list[float]], argv_length: int) -> Section:
    hand = median(times["hand"])
    api = median(times["api"])
    cli = median(times["cli"])
    met = api / hand <= GOAL
    paired = median([a / h for a, h in zip(times["api"], times["hand"], strict=True)])

    def row(label: str, key: str, goal: str, status: str, with_ratio: bool = True
            ) -> tuple[str, ...]:
        values = times[key]
        return (label, str(len(values)), ms(median(values)), ms(percentile(values, 90)),
                ms(hand), ratio(median(values) / hand) if with_ratio else "-", goal, status)

    rows = (
        row("by hand: `subprocess.run(argv)` + QMP `query-status` (baseline)", "hand",
            "-", "baseline"),
        row("service via the Python client: `POST /vms/NAME/start` + job", "api",
            f"<= {GOAL:.2f}x", verdict(met)),
        row("service via the CLI: `hv vm start NAME` (new Python process)", "cli",
            "- (reported)", "-"),
        row("context: `hv host info` (CLI start-up + one trivial request)", "cli-trivial",
            "-", "-", with_ratio=False),
    )
    notes = (
        f"Control-plane overhead through the API: {ms(api - hand)} per start "
        f"(service median {ms(api)} - hand median {ms(hand)}). The median of the per-round "
        f"ratios (each round runs both paths back to back, so it is less sensitive to load "
        f"that changes during the run) is {ratio(paired)}.",
        f"The CLI adds {ms(cli - api)} over the API path; a trivial CLI call "
        f"(`hv host info`) takes {ms(median(times['cli-trivial']))}, so nearly all of it "
        "is Python start-up and imports in the new process.",
        f"VM: Generation 1, 128 MiB, a new empty 16 MiB qcow2 disk, one e1000 NIC; QEMU "
        f"command line of {argv_length} arguments, the same for every path (checked "
        "against /proc/PID/cmdline of the service's QEMU).",
        f"{len(times['hand'])} measured rounds of hand and API runs, with a CLI run in "
        f"{len(times['cli'])} of them, after one warm-up run of each; the order of the paths "
        "rotates every round; the VM is turned off between runs (not timed).",
    )
    return Section(
        name="vm_start",
        title="vm_start: control-plane overhead of `hv vm start`",
        description=(
            "Time from the start call until the VM's QEMU is running (the daemonizing "
            "QEMU's parent has exited and QMP says `running`; for the service: the start "
            "job completed with the VM Running), against running the same QEMU command "
            "line by hand in the same run. Ratio = path median / hand median. "
            f"Goal: service via the API <= {GOAL:.2f}x."
        ),
        tables=(Table(("path", "runs", "median", "p90", "baseline (hand median)", "ratio",
                       "goal", "result"), rows),),
        notes=notes,
        goals_met=(met,),
    )
