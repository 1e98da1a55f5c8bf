"""The ``hv`` entry point: the collector is held off only while the CLI loads."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from hvstack.cli import entry, main


def test_the_command_runs_with_the_collector_on(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    monkeypatch.setattr(main, "run", lambda: seen.append(gc.isenabled()))
    frozen_before = gc.get_freeze_count()
    try:
        entry.run()
        assert gc.get_freeze_count() > frozen_before  # the loaded modules are frozen
    finally:
        gc.unfreeze()
    assert seen == [True]
    assert gc.isenabled()


def test_hv_help_runs_through_the_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "hvstack.cli", "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "vm" in done.stdout and "Create, run and manage virtual machines." in done.stdout
