"""Guest operations through the host service against the guest agent used directly.

One host service (``--detach-on-exit``) and one Generation 1 VM from the tiny image
(256 MiB, TCG). The agent's socket takes one client at a time and the service keeps
its connection, so the run alternates phases: with the service up, the API paths are
measured; then the service stops (the VM keeps running) and a direct agent client
measures the baselines; then the service starts again and reattaches. Both sides talk
to the same guest in the same run.

* exec, direct (baseline): ``guest-exec true`` (output captured) and
  ``guest-exec-status`` polled on a persistent socket with the service's own poll
  schedule (:data:`hvstack.integration.guest_io.POLL_STEPS`), so the ratio is the
  service's overhead, not a different polling policy.
* exec, API: ``POST /vms/NAME/exec {"command": ["true"]}`` with the Python client.
  Goal: median(API) / median(direct) <= 1.2.
* exec, CLI: ``hv vm exec NAME -- true`` as a new process (reported).
* copy into the guest: ``hv vm copy-file``'s API path (``POST /files`` + ``PUT`` of
  the bytes; includes ``sha256sum`` in the guest and the rename) against raw
  ``guest-file-write`` of the same bytes in the same 1 MiB pieces; and out of the guest:
  ``POST /files`` (``sha256sum`` in the guest) + streamed ``GET`` against raw
  ``guest-file-read`` in 4 MiB pieces. Files go to the guest's /tmp (RAM), so the
  numbers are the agent channel's, not the virtual disk's. Reported as MB/s.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.report import Section, Table, ms, ratio, verdict
from bench.support import ServiceProcess, hv_command, install_tiny_image, median, percentile
from hvstack.client import url_path
from hvstack.integration.guest_io import POLL_STEADY, POLL_STEPS

GOAL = 1.2
ROUNDS = 3
EXEC_RUNS = 20  # per path and round
CLI_RUNS = 2  # per round
COPY_BYTES = 16 * 1024 * 1024
WRITE_CHUNK = 1024 * 1024
READ_CHUNK = 4 * 1024 * 1024
VM = "bench-guest"
BOOT_TIMEOUT = 300.0
REPO = Path(__file__).resolve().parent.parent


class DirectAgent:
    """A synchronous guest agent client on the VM's socket (one persistent session)."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(str(path))
                self.stream = self.sock.makefile("rwb")
                self._sync()
                return
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _send(self, message: dict[str, Any], prefix: bytes = b"") -> None:
        self.stream.write(prefix + json.dumps(message).encode() + b"\n")
        self.stream.flush()

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.stream.readline()
            if not line:
                raise ConnectionError("the guest agent closed the connection")
            text = line.rsplit(b"\xff", 1)[-1].strip()
            try:
                message = json.loads(text) if text else None
            except ValueError:
                continue
            if isinstance(message, dict):
                return message

    def _sync(self) -> None:
        sync_id = int(time.time() * 1000) % 2**31
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}},
                   b"\xff")
        while self._read().get("return") != sync_id:
            pass

    def call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._send(message)
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def direct_exec(agent: DirectAgent) -> float:
    began = time.perf_counter()
    pid = agent.call("guest-exec", {"path": "true", "arg": [], "capture-output": True})["pid"]
    step = 0
    while not agent.call("guest-exec-status", {"pid": pid}).get("exited"):
        time.sleep(POLL_STEPS[step] if step < len(POLL_STEPS) else POLL_STEADY)
        step += 1
    return time.perf_counter() - began


def direct_write(agent: DirectAgent, data: bytes, path: str) -> float:
    began = time.perf_counter()
    handle = agent.call("guest-file-open", {"path": path, "mode": "wb"})
    for offset in range(0, len(data), WRITE_CHUNK):
        piece = base64.b64encode(data[offset:offset + WRITE_CHUNK]).decode()
        agent.call("guest-file-write", {"handle": handle, "buf-b64": piece})
    agent.call("guest-file-close", {"handle": handle})
    return time.perf_counter() - began


def direct_read(agent: DirectAgent, path: str, size: int) -> float:
    began = time.perf_counter()
    handle = agent.call("guest-file-open", {"path": path, "mode": "rb"})
    got = 0
    while got < size:
        reply = agent.call("guest-file-read", {"handle": handle, "count": READ_CHUNK})
        got += len(base64.b64decode(reply["buf-b64"]))
        if reply.get("eof"):
            break
    agent.call("guest-file-close", {"handle": handle})
    assert got == size, f"read {got} of {size} bytes"
    return time.perf_counter() - began


def api_exec(service: ServiceProcess) -> float:
    began = time.perf_counter()
    result = service.client.post(url_path("vms", VM, "exec"), {"command": ["true"]})
    elapsed = time.perf_counter() - began
    assert result["exit_code"] == 0, result
    return elapsed


def cli_exec(service: ServiceProcess) -> float:
    began = time.perf_counter()
    subprocess.run([*hv_command(), "vm", "exec", VM, "--", "true"], env=service.cli_env,
                   check=True, capture_output=True, timeout=120)
    return time.perf_counter() - began


def api_upload(service: ServiceProcess, data: bytes, path: str) -> float:
    began = time.perf_counter()
    started = service.client.post(url_path("vms", VM, "files"), {
        "direction": "to-guest", "guest_path": path, "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "overwrite": True})
    job = service.client.request("PUT", started["data_url"].removeprefix("/api/v1"),
                                 content=data, timeout=600)
    elapsed = time.perf_counter() - began
    assert job["state"] == "completed", job
    return elapsed


def api_download(service: ServiceProcess, path: str, size: int) -> float:
    began = time.perf_counter()
    started = service.client.post(url_path("vms", VM, "files"), {"direction": "from-guest",
                                                       "guest_path": path})
    got = 0
    with service.client.stream("GET", started["data_url"].removeprefix("/api/v1"),
                               timeout=600) as reply:
        for chunk in reply.iter_bytes(READ_CHUNK):
            got += len(chunk)
    elapsed = time.perf_counter() - began
    assert got == size, f"downloaded {got} of {size} bytes"
    return elapsed


def wait_for_agent(service: ServiceProcess) -> None:
    from hvstack.client import ApiError

    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        try:
            service.client.post(url_path("vms", VM, "exec"), {"command": ["true"]})
            return
        except ApiError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def run(tmp: Path) -> Section:
    data_dir = tmp / "data"
    install_tiny_image(data_dir)
    times: dict[str, list[float]] = {k: [] for k in (
        "direct", "api", "cli", "raw-write", "api-upload", "raw-read", "api-download")}
    payload = os.urandom(COPY_BYTES)
    with ServiceProcess(data_dir, ["--detach-on-exit"]) as service:
        api = service.client
        api.post("/vms", {"name": VM, "generation": 1, "memory": "256M", "image": "tiny",
                          "auto_start": "nothing", "auto_stop": "turn-off"})
        api.request("PATCH", url_path("vms", VM), json={"integration_services":
                                                 {"guest_services": True}})
        api.wait_job(api.post(url_path("vms", VM, "start")), timeout=120)
        wait_for_agent(service)
        socket_path = service.config.run_dir / api.get(url_path("vms", VM))["id"] / "qga.sock"
        api_exec(service)  # warm-up
        api_upload(service, payload[:WRITE_CHUNK], "/tmp/warm")
        for _ in range(ROUNDS):
            for _ in range(EXEC_RUNS):
                times["api"].append(api_exec(service))
            for _ in range(CLI_RUNS):
                times["cli"].append(cli_exec(service))
            times["api-upload"].append(api_upload(service, payload, "/tmp/api.bin"))
            times["api-download"].append(api_download(service, "/tmp/api.bin", COPY_BYTES))
            service.stop_detached()
            agent = DirectAgent(socket_path)
            try:
                direct_exec(agent)  # warm-up of the new session
                for _ in range(EXEC_RUNS):
                    times["direct"].append(direct_exec(agent))
                times["raw-write"].append(direct_write(agent, payload, "/tmp/raw.bin"))
                times["raw-read"].append(direct_read(agent, "/tmp/raw.bin", COPY_BYTES))
            finally:
                agent.close()
            service.start()
            wait_for_agent(service)
    return _section(times)


def _mbps(seconds: float) -> str:
    return f"{COPY_BYTES / seconds / 1e6:.1f} MB/s"


def _section(times: dict[str, list[float]]) -> Section:
    direct, api = median(times["direct"]), median(times["api"])
    met = api / direct <= GOAL

    def exec_row(label: str, key: str, goal: str, status: str) -> tuple[str, ...]:
        values = times[key]
        return (label, str(len(values)), ms(median(values)), ms(percentile(values, 90)),
                ratio(median(values) / direct), goal, status)

    exec_rows = (
        exec_row("direct: `guest-exec` + `guest-exec-status` on the agent socket "
                 "(baseline)", "direct", "-", "baseline"),
        exec_row("service via the Python client: `POST /vms/NAME/exec`", "api",
                 f"<= {GOAL:.2f}x", verdict(met)),
        exec_row("service via the CLI: `hv vm exec NAME -- true` (new process)", "cli",
                 "- (reported)", "-"),
    )

    def copy_row(label: str, key: str, base: str) -> tuple[str, ...]:
        value, baseline = median(times[key]), median(times[base])
        return (label, str(len(times[key])), ms(value), _mbps(value),
                ratio(value / baseline) if key != base else "baseline")

    copy_rows = (
        copy_row("raw `guest-file-write`, 1 MiB pieces (baseline)", "raw-write", "raw-write"),
        copy_row("copy-file into the guest via the API (+ sha256sum, rename)", "api-upload",
                 "raw-write"),
        copy_row("raw `guest-file-read`, 4 MiB pieces (baseline)", "raw-read", "raw-read"),
        copy_row("copy-file out of the guest via the API (+ sha256sum first)",
                 "api-download", "raw-read"),
    )
    notes = (
        f"exec overhead of the service through the API: {ms(api - direct)} per call "
        f"(API median {ms(api)} - direct median {ms(direct)}). The CLI row is almost all "
        "Python start-up and imports of the new `hv` process.",
        "Output does not stream (qemu-ga returns it once the program has ended), and both "
        "paths poll `guest-exec-status` with the same schedule: "
        f"{', '.join(f'{s * 1000:g}' for s in POLL_STEPS)} ms, then every "
        f"{POLL_STEADY * 1000:g} ms.",
        f"{ROUNDS} rounds; each: {EXEC_RUNS} API and {CLI_RUNS} CLI execs and one copy each "
        f"way of {COPY_BYTES >> 20} MiB with the service up, then {EXEC_RUNS} direct execs "
        "and one raw write and read with the service stopped (the VM keeps running; the "
        "service reattaches afterwards). Warm-up runs are not counted.",
        "copy-file time includes its checks in the guest (folder, free space; sha256sum "
        "of the whole file) and, into the guest, the rename; the raw baselines only move "
        "the bytes. Ratios above 1 are that verification plus the HTTP hop.",
    )
    return Section(
        name="guest_exec",
        title="guest_exec: `hv vm exec` and copy-file against the guest agent used directly",
        description=(
            "Round trip of a trivial command (`true`) run in the tiny guest (TCG) through "
            "the host service, against the same guest-exec/guest-exec-status exchange made "
            "directly on the agent's socket in the same run; and copy-file throughput "
            f"against raw guest-file-write/read. Goal: exec via the API <= {GOAL:.2f}x."
        ),
        tables=(
            Table(("path", "runs", "median", "p90", "ratio", "goal", "result"), exec_rows,
                  caption="exec round trip"),
            Table(("path", "runs", "median", "throughput", "ratio (time)"), copy_rows,
                  caption=f"copy of {COPY_BYTES >> 20} MiB"),
        ),
        notes=notes,
        goals_met=(met,),
    )
