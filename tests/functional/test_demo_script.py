"""``scripts/demo.sh stop`` (``make demo-stop``) stops the demo's own host service by the
pid it recorded, and nothing else: not a process that reused the pid, not another
service. ``hv`` is a stub here that finds no service (the VM part needs a real one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLEEPER = "import time; time.sleep(120)"


def _stub_hv(tmp_path: Path) -> Path:
    hv = tmp_path / "hv"
    hv.write_text("#!/bin/sh\nexit 2\n")  # no host service answers
    hv.chmod(0o755)
    return hv


def _stop(demo: Path, hv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "stop"],
                          env={"PATH": "/usr/bin:/bin", "DEMO_DATA": str(demo), "HV": str(hv)},
                          capture_output=True, text=True, timeout=120, check=False)


def test_stop_ends_the_recorded_demo_service(tmp_path: Path) -> None:
    demo = tmp_path / "demo-data"
    demo.mkdir()
    # A process that looks like the demo's `hv serve` (its command line names the folder).
    service = subprocess.Popen([sys.executable, "-c", SLEEPER, "serve", "--data-dir",
                                str(demo), "--listen", f"unix:{demo}/hv.sock"])
    try:
        (demo / "serve.pid").write_text(f"{service.pid}\n")
        result = _stop(demo, _stub_hv(tmp_path))
        assert result.returncode == 0, result.stderr
        assert f"stopping the demo's host service (pid {service.pid})" in result.stdout
        assert service.wait(30) == -15  # SIGTERM
        assert not (demo / "serve.pid").exists()
    finally:
        service.kill()
        service.wait(10)


def test_stop_leaves_a_process_that_is_not_the_demo_service(tmp_path: Path) -> None:
    demo = tmp_path / "demo-data"
    demo.mkdir()
    other = subprocess.Popen([sys.executable, "-c", SLEEPER, "serve", "--data-dir",
                              str(tmp_path / "elsewhere"), "--listen", "unix:x"])
    try:
        (demo / "serve.pid").write_text(f"{other.pid}\n")  # a stale pid, reused
        result = _stop(demo, _stub_hv(tmp_path))
        assert result.returncode == 0, result.stderr
        assert "stopping" not in result.stdout
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(10)
