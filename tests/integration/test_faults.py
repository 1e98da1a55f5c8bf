"""Faults for real: the data directory's file system full while saving, and a kill -9 of
the host service during a convert (hv serve processes, QEMU under TCG, qemu-img)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.hostproc import HostProcess, running_host

pytestmark = pytest.mark.integration
READY = "hvstack-tiny: ready"


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` up to the last block."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\xa5" * (1 << 20))
        except OSError:
            pass
        try:
            while True:
                f.write(b"\xa5" * 512)
        except OSError:
            pass
    return filler


def test_disk_full_with_the_database_on_it(small_data_dir: Path, tiny_image: Path) -> None:
    with running_host(small_data_dir, tiny_image) as host:
        host.ok("vm", "create", "full", "--generation", "1", "--image", "tiny",
                "--memory", "128M")
        host.ok("vm", "start", "full")
        host.wait_console("full", READY)
        agent = host.guest("full")
        agent.wait_ready()
        filler = fill(small_data_dir)

        result = host.hv("vm", "save", "full")
        assert result.returncode == 2, result.stderr
        message = result.stderr.lower()
        assert "cannot save vm 'full'" in message, result.stderr
        assert "full" in message or "no space" in message
        assert "internal error" not in message
        view = host.vm("full")  # the database is still readable
        assert view["state"] == "Running"
        assert view["state_reason"].startswith("save failed") or view["state_reason"] == ""
        assert not (Path(view["folder"]) / "saved-state.bin").exists()
        assert agent.sh("echo still-here")[1].strip() == "still-here"

        # Later operations work once there is space again.
        filler.unlink()
        host.ok("vm", "save", "full")
        assert host.vm("full")["state"] == "Saved"
        host.ok("vm", "start", "full")
        assert host.vm("full")["state"] == "Running"
        assert agent.sh("echo back")[1].strip() == "back"
        host.ok("vm", "stop", "full", "--turn-off")
        log = host.log.read_text()
        assert "Traceback" not in log
        assert "Failed to establish" not in log  # QMP connect retries are not errors


def _qemu_img_writing(path_part: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"qemu-img") and any(
                path_part.encode() in arg for arg in cmdline):
            found.append(int(entry.name))
    return found


def test_kill_9_during_a_convert(tmp_path: Path, tiny_image: Path) -> None:
    with running_host(tmp_path / "data", tiny_image) as host:
        source = host.data_dir / "big.raw"
        with open(source, "wb") as f:  # random data: qemu-img cannot skip it as zeros
            for _ in range(384):
                f.write(os.urandom(1 << 20))
        before = source.stat().st_size
        target = host.data_dir / "big.vhdx"
        convert = subprocess.Popen(
            [*host_cli(host), "disk", "convert", str(source), str(target), "--format", "vhdx"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=host.env)
        try:
            deadline = time.monotonic() + 120
            temps: list[Path] = []
            while time.monotonic() < deadline and not temps:
                temps = list(host.data_dir.glob(".big.vhdx.*.hvtmp"))
                time.sleep(0.05)
            assert temps, "the convert never started writing"
            host.kill9()
        finally:
            convert.wait(60)
        # The killed service's qemu-img runs on to its end, unseen (it is not the
        # service's to kill after the fact); wait for it like an admin would.
        deadline = time.monotonic() + 300
        while _qemu_img_writing(".big.vhdx.") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _qemu_img_writing(".big.vhdx.")

        host.start()
        assert list(host.data_dir.glob(".*.hvtmp")) == []
        assert not target.exists()
        assert source.stat().st_size == before
        [job] = [j for j in host.json("job", "list") if j["kind"] == "convert"]
        assert job["state"] == "failed"
        assert "interrupted by a restart of the host service" in job["error"]["detail"]
        # ... and converting again works.
        host.ok("disk", "convert", str(source), str(target), "--format", "vhdx")
        assert target.exists()


def host_cli(host: HostProcess) -> list[str]:
    from tests.integration.hostproc import HV

    return list(HV)
