"""The ``hv`` CLI without a host service: one-line errors, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hvstack.cli.main import app

runner = CliRunner()


def nowhere(tmp_path: Path) -> str:
    return f"unix:{tmp_path / 'no-such.sock'}"


@pytest.mark.parametrize("args", [
    ["vm", "list"],
    ["vm", "show", "web"],
    ["vm", "start", "web"],
    ["vm", "create", "web"],
    ["host", "info"],
    ["job", "list"],
])
def test_unreachable_host_service(tmp_path: Path, args: list[str]) -> None:
    result = runner.invoke(app, args, env={"HV_HOST": nowhere(tmp_path)})
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot reach the host service at unix:")
    assert "is 'hv serve' running?" in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_host_option_overrides_the_environment(tmp_path: Path) -> None:
    result = runner.invoke(app, ["vm", "list", "--host", nowhere(tmp_path)],
                           env={"HV_HOST": "unix:/elsewhere.sock"})
    assert result.exit_code == 2
    assert str(tmp_path / "no-such.sock") in result.stderr


def test_create_with_generation_3(tmp_path: Path) -> None:
    result = runner.invoke(app, ["vm", "create", "web", "--generation", "3"],
                           env={"HV_HOST": nowhere(tmp_path)})
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --generation must be 1 or 2"
    assert "Traceback" not in result.output


def test_stop_with_turn_off_and_save(tmp_path: Path) -> None:
    result = runner.invoke(app, ["vm", "stop", "web", "--turn-off", "--save"],
                           env={"HV_HOST": nowhere(tmp_path)})
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --turn-off and --save exclude each other"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["vm", "create"], env={"HV_HOST": nowhere(tmp_path)})
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_the_real_entry_point(tmp_path: Path) -> None:
    """``hv`` as installed: a bad host address is one line and exit code 2 too."""
    hv = Path(sys.executable).parent / "hv"
    if not hv.exists():
        pytest.skip("the hv entry point is not installed in this environment")
    env = {**os.environ, "HV_HOST": "tcp:nohost"}
    env.pop("HV_DEBUG", None)
    proc = subprocess.run([str(hv), "vm", "list"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "tcp:nohost" in lines[0]
    assert "Traceback" not in proc.stderr
