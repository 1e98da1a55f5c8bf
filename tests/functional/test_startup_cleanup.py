"""Start-up after a kill -9: the service cleans what it left at each step of create,
delete and convert, marks interrupted jobs failed, and touches nothing of anyone else.

A killed service is simulated by planting exactly the files it leaves at each step
(the integration tests kill a real one during a convert).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hvstack.compute.model import VmConfig, VmRecord, VmState
from hvstack.errors import Interrupted
from hvstack.host import cleanup
from hvstack.host.config import HostConfig
from hvstack.host.facts import FixedHost
from hvstack.host.jobs import JobState
from hvstack.host.records import JobRecord, JobRecords, VmRecords
from hvstack.host.service import HostService, NewVm
from hvstack.host.store import MemoryStore
from hvstack.storage.disks import _temp_path
from tests.functional.conftest import make_config
from tests.functional.fakes import FakeDriver

MIB = 1024 * 1024


@pytest.fixture
def config(tmp_path: Path) -> Iterator[HostConfig]:
    config = make_config(tmp_path)
    config.vms_dir.mkdir(parents=True)
    config.images_dir.mkdir(parents=True)
    yield config
    shutil.rmtree(config.run_dir, ignore_errors=True)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def boot(config: HostConfig, store: MemoryStore) -> AsyncIterator[object]:
    services: list[HostService] = []

    async def start(driver: FakeDriver | None = None) -> HostService:
        service = HostService(config, store, driver or FakeDriver(), FixedHost())
        await service.startup()
        services.append(service)
        return service

    yield start
    for service in services:
        await asyncio.wait_for(service.shutdown(), 10)


def new_id() -> str:
    return str(uuid.uuid4())


def disks_dir(config: HostConfig) -> Path:
    return config.storage_roots[1]


def test_the_temporary_name_pattern_is_the_disk_operations_one(tmp_path: Path) -> None:
    assert cleanup.DISK_TEMP.fullmatch(_temp_path(tmp_path / "a b.qcow2").name)
    assert cleanup.VM_ID.fullmatch(new_id())


# -- create ----------------------------------------------------------------------------------


async def test_killed_at_each_step_of_create(config: HostConfig, boot: object,
                                             store: MemoryStore) -> None:
    # 1. the folder was made, nothing else
    empty = config.vms_dir / new_id()
    empty.mkdir()
    # 2. qemu-img was writing the VM's disk under its temporary name
    writing = config.vms_dir / new_id()
    writing.mkdir()
    temp = _temp_path(writing / "disk0.qcow2")
    temp.write_bytes(b"QFI\xfb partial")
    # 3. the disk and firmware variables were in place, the record not yet written
    unrecorded = config.vms_dir / new_id()
    unrecorded.mkdir()
    (unrecorded / "disk0.qcow2").write_bytes(b"QFI\xfb")
    (unrecorded / "efivars.fd").write_bytes(b"\0")
    # 4. the record was written, vm.json not yet: a real VM, kept
    kept_id = new_id()
    (config.vms_dir / kept_id).mkdir()
    (config.vms_dir / kept_id / "disk0.qcow2").write_bytes(b"QFI\xfb")
    kept = VmConfig(name="kept", memory_bytes=64 * MIB)
    await VmRecords(store).create(VmRecord(id=kept_id, config=kept, created_at=1.0))

    service = await boot()  # type: ignore[operator]
    assert sorted(p.name for p in config.vms_dir.iterdir()) == [kept_id]
    assert (config.vms_dir / kept_id / "disk0.qcow2").exists()
    assert service.get_vm("kept").state is VmState.OFF
    report = service.cleanup_report
    assert set(report.removed_folders) == {empty, writing, unrecorded}
    assert report.moved_folders == []
    # ... and the service works on: the same name can be created again.
    await service.create_vm(NewVm(VmConfig(name="again", memory_bytes=64 * MIB)))


# -- delete ----------------------------------------------------------------------------------


async def test_killed_at_each_step_of_delete(config: HostConfig, boot: object,
                                             caplog: pytest.LogCaptureFixture) -> None:
    # 1. the record was deleted; its disks and files not yet
    with_disks = config.vms_dir / new_id()
    with_disks.mkdir()
    (with_disks / "vm.json").write_text("{}")
    (with_disks / "disk0.qcow2").write_bytes(b"QFI\xfb data someone may want")
    (with_disks / "console.log").write_text("boot\n")
    # 2. the disks were deleted; the service's own files not yet
    leftovers = config.vms_dir / new_id()
    leftovers.mkdir()
    for name in ("vm.json", "console.log", "qemu.pid", "efivars.fd", "saved-state.bin"):
        (leftovers / name).write_bytes(b"x")

    service = await boot()  # type: ignore[operator]
    lost = config.data_dir / "lost+found" / with_disks.name
    assert (lost / "disk0.qcow2").read_bytes() == b"QFI\xfb data someone may want"
    assert not with_disks.exists() and not leftovers.exists()
    assert service.cleanup_report.moved_folders == [(with_disks, lost)]
    assert service.cleanup_report.removed_folders == [leftovers]
    assert any(str(lost) in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    # The next start leaves lost+found alone.
    await boot()  # type: ignore[operator]
    assert (lost / "disk0.qcow2").exists()


# -- convert ---------------------------------------------------------------------------------


async def test_killed_during_a_convert(config: HostConfig, boot: object,
                                       store: MemoryStore) -> None:
    source = disks_dir(config) / "big.qcow2"
    source.write_bytes(b"QFI\xfb source")
    nested = disks_dir(config) / "sub" / "deeper"
    nested.mkdir(parents=True)
    temps = [_temp_path(disks_dir(config) / "big.vhdx"), _temp_path(nested / "c.raw"),
             _temp_path(config.images_dir / "x.qcow2"),
             config.images_dir / ".tiny.qcow2.tmp"]
    for temp in temps:
        temp.write_bytes(b"partial")
    await JobRecords(store).save(JobRecord(id="j-convert", kind="convert", target=str(source),
                             state="running", created_at=1.0))
    # A convert that finished writing, but the service died before recording it.
    await JobRecords(store).save(JobRecord(id="j-unseen", kind="convert", target=str(source),
                             state="running", created_at=2.0))

    service = await boot()  # type: ignore[operator]
    assert [t for t in temps if t.exists()] == []
    assert source.read_bytes() == b"QFI\xfb source"
    for job_id in ("j-convert", "j-unseen"):
        job = service.jobs.get(job_id)
        assert job.state is JobState.FAILED
        assert isinstance(job.error, Interrupted)
        assert "interrupted by a restart of the host service" in job.error.message
    await service.flush()
    assert {r.id: r.state for r in await JobRecords(store).load()} == {"j-convert": "failed",
                                                     "j-unseen": "failed"}


# -- what is not the service's ----------------------------------------------------------------


@pytest.fixture
def locked_temp(config: HostConfig) -> Iterator[Path]:
    """A temporary another process is still writing (it holds a lock, as qemu-img does)."""
    temp = _temp_path(disks_dir(config) / "busy.qcow2")
    temp.write_bytes(b"being written")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'r+b')\n"
         "fcntl.lockf(f, fcntl.LOCK_SH)\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n", str(temp)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    with holder:  # closes its pipes
        try:
            yield temp
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)


async def test_nothing_else_is_touched(config: HostConfig, boot: object,
                                       locked_temp: Path) -> None:
    disks = disks_dir(config)
    keep = [
        disks / ".notes.hvtmp",  # not the pattern: no 8 hex digits
        disks / ".a.qcow2.XYZ12345.hvtmp",
        disks / "a.qcow2.1a2b3c4d.hvtmp",  # not hidden
        disks / "user.qcow2",
        config.images_dir / "tiny.qcow2",
        config.images_dir / ".notes.tmp",
    ]
    for path in keep:
        path.write_bytes(b"mine")
    elsewhere = disks.parent / "outside"
    elsewhere.mkdir()
    outside_temp = _temp_path(elsewhere / "x.qcow2")  # not in a storage root
    outside_temp.write_bytes(b"x")
    link = _temp_path(disks / "link.qcow2")
    link.symlink_to(disks / "user.qcow2")
    user_folder = config.vms_dir / "my-notes"  # not a VM id
    user_folder.mkdir()
    (user_folder / "readme").write_text("mine")
    other_run = config.run_dir.parent / "hvstack-0000000000"  # another service's
    (other_run / new_id()).mkdir(parents=True, exist_ok=True)
    try:
        await boot()  # type: ignore[operator]
        assert all(p.read_bytes() == b"mine" for p in keep)
        assert outside_temp.exists() and link.is_symlink() and locked_temp.exists()
        assert (user_folder / "readme").exists()
        assert any(other_run.iterdir())
    finally:
        shutil.rmtree(other_run, ignore_errors=True)


# -- run directories ---------------------------------------------------------------------------


async def test_run_directories_of_vms_not_running_are_removed(
    config: HostConfig, boot: object, store: MemoryStore,
) -> None:
    first: HostService = await boot()  # type: ignore[operator]
    running = await first.create_vm(NewVm(VmConfig(name="run", memory_bytes=64 * MIB)))
    idle = await first.create_vm(NewVm(VmConfig(name="idle", memory_bytes=64 * MIB)))
    job = first.start_vm("run")
    await asyncio.wait_for(job.done.wait(), 5)
    pid = running.record.pid
    assert pid is not None
    await asyncio.wait_for(first.shutdown(), 10)  # as if killed: VMs keep running
    # Leftovers: sockets of a VM that is off, of one that no longer exists, a stale pid.
    gone = config.run_dir / new_id()
    for folder in (idle.files.run_dir, gone):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "qmp.sock").write_bytes(b"")
    idle.files.pidfile.write_text("12345\n")
    running.files.run_dir.mkdir(parents=True, exist_ok=True)

    second: HostService = await boot(FakeDriver(alive_pids={pid}))  # type: ignore[operator]
    assert second.get_vm("run").state is VmState.RUNNING
    assert running.files.run_dir.exists()
    assert not idle.files.run_dir.exists() and not gone.exists()
    assert not idle.files.pidfile.exists()
    assert set(second.cleanup_report.run_dirs) == {idle.files.run_dir, gone}


# -- automatic actions are logged with the VM's name -------------------------------------------


async def test_automatic_actions_are_logged_once_with_the_vm_name(
    config: HostConfig, store: MemoryStore, caplog: pytest.LogCaptureFixture,
) -> None:
    from dataclasses import replace

    caplog.set_level(logging.INFO)
    service = HostService(replace(config, detach_on_exit=False), store, FakeDriver(),
                          FixedHost())
    await service.startup()
    await service.create_vm(NewVm(VmConfig(name="web", memory_bytes=64 * MIB)))
    job = service.start_vm("web")
    await asyncio.wait_for(job.done.wait(), 5)
    await asyncio.wait_for(service.shutdown(), 10)
    lines = [r.getMessage() for r in caplog.records if "automatic" in r.getMessage()]
    assert lines == ["VM web: automatic stop action (save)"]
