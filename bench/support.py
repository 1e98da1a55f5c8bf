"""What the benchmarks share: a host service subprocess, a minimal QMP client,
statistics, and a description of the machine.

:class:`ServiceProcess` runs ``python -m hvstack.cli serve`` on a fresh data directory,
waits until ``GET /api/v1/host`` answers, and on exit turns off any VM still running,
stops the service with SIGTERM, kills any QEMU process left behind by its data directory
(also ones started by hand from a VM's argv) and removes the runtime socket directory.
Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from hvstack import __version__
from hvstack.client import ApiError, Client, url_path
from hvstack.host.config import HostConfig, load_config
from hvstack.hypervisor import accel
from hvstack.hypervisor.qemu import process

ACCELERATOR = "tcg"  # benchmarks never use KVM: results must compare across machines
SERVICE_READY_TIMEOUT = 60.0
SERVICE_STOP_TIMEOUT = 60.0
JOB_TIMEOUT = 60.0
QEMU_EXIT_TIMEOUT = 30.0

# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


# -- the machine --------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not available"
    return out.stdout.splitlines()[0].strip() if out.stdout else "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _count_qemu() -> int:
    count = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            count += comm.read_text().startswith("qemu-system")
    return count


@dataclass(frozen=True)
class Machine:
    cores: int
    cpu: str
    accelerator: str
    auto_accelerator: str
    qemu: str
    qemu_img: str
    python: str
    kernel: str
    hvstack: str
    commit: str
    date: str
    load: str
    other_qemu: int

    @staticmethod
    def describe(repo: Path) -> Machine:
        auto = accel.choose(accel.probe())
        qemu = _first_line(["qemu-system-x86_64", "--version"])
        commit = _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
        dirty = _first_line(["git", "-C", str(repo), "status", "--porcelain", "--", "src"])
        load1, load5, _ = os.getloadavg()
        return Machine(
            cores=os.cpu_count() or 1,
            cpu=_cpu_model(),
            accelerator=ACCELERATOR,
            auto_accelerator=f"{auto.name} ({auto.reason})",
            qemu=qemu.removeprefix("QEMU emulator version "),
            qemu_img=_first_line(["qemu-img", "--version"]).removeprefix("qemu-img version "),
            python=platform.python_version(),
            kernel=platform.release(),
            hvstack=__version__,
            commit=commit + (" with uncommitted changes in src/" if dirty not in
                             ("", "unknown", "not available") else ""),
            date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            load=f"{load1:.2f} / {load5:.2f} (1 / 5 min, at the start of the run)",
            other_qemu=_count_qemu(),
        )

    def short(self) -> str:
        return (f"{self.cores} cores, accelerator {self.accelerator}, QEMU {self.qemu.split()[0]}"
                f", {self.date}")

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("date", self.date),
            ("cores", f"{self.cores} ({self.cpu})"),
            ("accelerator", f"{self.accelerator} (forced; automatic choice here: "
                            f"{self.auto_accelerator})"),
            ("QEMU", self.qemu),
            ("qemu-img", self.qemu_img),
            ("Python", self.python),
            ("kernel", self.kernel),
            ("hvstack", f"{self.hvstack}, commit {self.commit}"),
            ("load average", self.load),
            ("other QEMU processes", f"{self.other_qemu} running at the start of the run "
                                     "(other work on the machine skews the numbers)"),
        ]


# -- a host service in a subprocess -------------------------------------------------------


def install_tiny_image(data_dir: Path) -> None:
    """Build the tiny guest image (cached in HV_CACHE_DIR, else the repository's .cache)
    and put it in ``data_dir``'s images folder, as ``hv serve`` finds managed images."""
    import asyncio

    from hvstack.images.tiny import build_tiny

    repo = Path(__file__).resolve().parent.parent
    cache = Path(os.environ.get("HV_CACHE_DIR") or repo / ".cache")
    built = asyncio.run(build_tiny(cache))
    target = data_dir / "images" / f"tiny{built.suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(built, target)
    except OSError:
        shutil.copyfile(built, target)


def hv_command() -> list[str]:
    """The ``hv`` CLI of this interpreter's environment (the console script if installed)."""
    script = Path(sys.executable).with_name("hv")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "hvstack.cli"]


class ServiceProcess:
    """``hv serve`` on its own data directory, as a context manager. It makes no Default
    Switch unless ``extra_args`` say otherwise: a benchmark must not leave a bridge and
    its dnsmasq in the machine's network, and its VMs keep the user-mode NAT adapter
    earlier results were measured with."""

    def __init__(self, data_dir: Path, extra_args: Sequence[str] = (),
                 prefix: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        if not any(arg.startswith("--default-switch") for arg in extra_args):
            extra_args = ("--default-switch", "none", *extra_args)
        self.extra_args = tuple(extra_args)
        self.prefix = tuple(prefix)  # e.g. ip netns exec NS: run the service in there
        self.socket = data_dir / "hv.sock"
        self.log = data_dir.parent / f"{data_dir.name}-serve.log"
        self.config: HostConfig = load_config(str(data_dir), accelerator=ACCELERATOR)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("HV_HOST", "HV_DATA_DIR", "HV_ACCELERATOR")}
        self.cli_env = {**self.env, "HV_HOST": f"unix:{self.socket}"}
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("the host service is not running")
        return self._client

    def __enter__(self) -> ServiceProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "hvstack.cli", "serve",
                 "--data-dir", str(self.data_dir),
                 "--accelerator", ACCELERATOR, *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
            )
        client = Client(f"unix:{self.socket}", timeout=30.0)
        self._client = client
        deadline = time.monotonic() + SERVICE_READY_TIMEOUT
        while True:
            try:
                client.get("/host")
                return
            except ApiError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"hv serve did not come up; its log:\n{self.log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Turn off running VMs, SIGTERM the service, then sweep up what is left."""
        if self._client is not None:
            with contextlib.suppress(ApiError, OSError):
                for vm in self._client.get("/vms"):
                    if vm["state"] != "Off" and vm["state"] != "Saved":
                        self.turn_off(vm["name"])
            self._client.close()
            self._client = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(SERVICE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None
        kill_leftover_qemu(self.config)
        remove_tree(self.config.run_dir)

    def stop_detached(self) -> None:
        """Stop the service alone (started with --detach-on-exit): its VMs keep running
        and a later :meth:`start` reattaches to them."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            self._proc.wait(SERVICE_STOP_TIMEOUT)
        self._proc = None

    def turn_off(self, name: str) -> None:
        job = self.client.post(url_path("vms", name, "stop"), {"mode": "turn-off"})
        self.client.wait_job(job, timeout=JOB_TIMEOUT)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def kill_leftover_qemu(config: HostConfig) -> list[int]:
    """Kill every QEMU process whose pidfile is in the data directory; return their pids."""
    killed: list[int] = []
    for pidfile in config.vms_dir.glob("*/qemu.pid"):
        vm_id = pidfile.parent.name
        pid = process.read_pid(pidfile)
        if pid is not None and process.is_vm_process(pid, vm_id):
            process.kill(pid, vm_id)
            wait_exit(pid, vm_id, QEMU_EXIT_TIMEOUT)
            killed.append(pid)
    return killed


def wait_exit(pid: int, vm_id: str, timeout: float) -> None:
    """Wait until QEMU process ``pid`` (not our child) has exited; TimeoutError if not."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while process.is_vm_process(pid, vm_id):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"QEMU process {pid} did not exit within {timeout:.0f} s")
            if poller.poll(min(left, 1.0) * 1000):
                return
    finally:
        os.close(pidfd)


# -- a minimal synchronous QMP client ----------------------------------------------------


class Qmp:
    """Just enough QMP to ask a QEMU for its status and tell it to quit."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self._sock = sock
        self._stream = sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise ConnectionError(f"no QMP greeting on {path}: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._stream.readline()
        if not line:
            raise ConnectionError("QEMU closed the QMP connection")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._stream.write(json.dumps(request).encode() + b"\n")
        self._stream.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QEMU refused {command}: {reply['error']}")
            # an asynchronous event: skip it

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.close()
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
