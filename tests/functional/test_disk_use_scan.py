"""DiskUse.parents: a quick scan runs on the event loop, a slow one in a thread; the
links are the same either way."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from hvstack.host import disk_use
from hvstack.host.config import HostConfig
from hvstack.host.disk_use import DiskUse
from tests.unit.test_qcow2_header import header


def test_a_quick_scan_runs_on_the_loop_a_slow_one_in_a_thread(
        host_config: HostConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disks = tmp_path / "disks"
    (disks / "base.qcow2").write_bytes(header())
    (disks / "child.qcow2").write_bytes(header(b"base.qcow2", b"qcow2"))
    scanned_on: list[int] = []
    scan = disk_use.usage.scan_parents

    def spy(*args: object) -> dict[Path, Path]:
        scanned_on.append(threading.get_ident())
        return scan(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(disk_use.usage, "scan_parents", spy)
    use = DiskUse(host_config, list)

    async def three_scans() -> tuple[int, list[dict[Path, Path]]]:
        links = [await use.parents(), await use.parents()]
        use._scan_took = 1.0  # as if the tree had grown large
        links.append(await use.parents())
        return threading.get_ident(), links

    loop_thread, links = asyncio.run(three_scans())
    assert [t == loop_thread for t in scanned_on] == [False, True, False]
    assert all(found == {disks / "child.qcow2": disks / "base.qcow2"} for found in links)
