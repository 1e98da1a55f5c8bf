"""`hv disk ...` through a real host service and real qemu-img."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration.hostproc import HostProcess

pytestmark = pytest.mark.integration


def test_disk_commands_end_to_end(host: HostProcess) -> None:
    d = host.data_dir
    base = str(d / "base.qcow2")
    created = host.json("disk", "create", base, "--size", "64M")
    assert (created["kind"], created["format"], created["virtual_size"]) == (
        "dynamic", "qcow2", 64 << 20)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", base], check=True,
                   capture_output=True)

    child = str(d / "child.qcow2")
    diff = host.json("disk", "create", child, "--type", "differencing", "--parent", base)
    assert diff["kind"] == "differencing" and diff["backing_file"] == base
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 1M 1M", child], check=True,
                   capture_output=True)
    merged = host.json("disk", "merge", child)
    assert merged["path"] == base
    check = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0xa5 1M 1M", base],
                           capture_output=True, text=True)
    assert "Pattern verification failed" not in check.stdout

    for fmt, ext in (("vhdx", "vhdx"), ("vhd", "vhd"), ("raw", "raw")):
        out = str(d / f"copy.{ext}")
        info = host.json("disk", "convert", base, out, "--format", fmt)
        assert info["virtual_size"] == 64 << 20
        same = subprocess.run(["qemu-img", "compare", "-q", base, out])
        assert same.returncode == 0, f"{fmt} copy differs"

    grown = host.json("disk", "resize", base, "128M")
    assert grown["virtual_size"] == 128 << 20
    shrink = host.hv("disk", "resize", base, "32M")
    assert shrink.returncode == 2 and "--allow-shrink" in shrink.stderr
    compacted = host.json("disk", "compact", base)
    assert compacted["actual_size"] <= compacted["actual_size_before"]
    assert host.json("disk", "inspect", base)["virtual_size"] == 128 << 20

    fixed = host.json("disk", "create", str(d / "fixed.raw"), "--size", "16M",
                      "--type", "fixed")
    assert fixed["kind"] == "fixed"
    exists = host.hv("disk", "create", str(d / "fixed.raw"), "--size", "16M")
    assert exists.returncode == 2 and "exists" in exists.stderr
