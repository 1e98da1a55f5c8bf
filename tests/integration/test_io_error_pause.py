"""A guest whose disk runs out of space is paused by QEMU, and hvstack says which disk.

QEMU's default error policy for a ``-device`` disk is ``werror=enospc,rerror=report``:
a write that fails for lack of space pauses the VM (as Hyper-V's "Paused-Critical"),
any other error goes to the guest. The tiny guest writes to a data disk whose file
lives on a 4 MiB tmpfs; the VM must show Paused with a reason naming that file.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.hostproc import BOOT_TIMEOUT, HostProcess

pytestmark = pytest.mark.integration
NAME = "fulldisk"
# The guest finds the 32 MiB data disk by its size (in 512-byte sectors).
FILL = ("for d in /sys/block/*; do [ \"$(cat $d/size)\" = 65536 ] && dev=/dev/${d##*/}; done; "
        "dd if=/dev/zero of=$dev bs=1M count=32 conv=fsync >/dev/null 2>&1 &")


@pytest.fixture
def small_fs(host: HostProcess) -> Iterator[Path]:
    folder = host.data_dir / "small"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "hvtest", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_pauses_the_vm_with_the_disk_named(host: HostProcess,
                                                        small_fs: Path) -> None:
    disk = small_fs / "data.qcow2"
    host.ok("disk", "create", str(disk), "--size", "32M")
    host.ok("vm", "create", NAME, "--generation", "1", "--image", "tiny", "--memory", "256M")
    host.ok("vm", "set", NAME, "--attach-disk", str(disk), "--bus", "virtio")
    host.ok("vm", "start", NAME)
    guest = host.guest(NAME)
    guest.wait_ready()
    code, out = guest.sh(FILL)
    assert code == 0, out
    deadline = time.monotonic() + BOOT_TIMEOUT
    vm = host.vm(NAME)
    while vm["state"] != "Paused":
        assert time.monotonic() < deadline, f"the VM was not paused: {vm}"
        time.sleep(0.5)
        vm = host.vm(NAME)
    assert vm["state_reason"] == (
        f"paused: disk {disk} is full (write failed: No space left on device)")
    host.ok("vm", "stop", NAME, "--turn-off")
