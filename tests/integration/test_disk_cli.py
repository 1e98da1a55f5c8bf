"""`hv disk ...` through a real host service and real qemu-img."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(host: HostProcess, *args: str, needle: str) -> None:
    result = host.hv(*args)
    assert result.returncode == 2, f"hv {' '.join(args)}: {result.stdout}{result.stderr}"
    assert needle in result.stderr, result.stderr


def probed_format(path: Path) -> str:
    """qemu-img's own probe, fine for checking what hvstack wrote."""
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    fmt: str = json.loads(out)["format"]
    return fmt


def test_disk_guards_keep_the_shared_image_and_other_disks(host: HostProcess) -> None:
    d = host.data_dir
    tiny = d / "images" / "tiny.qcow2"
    image_sum = sha256(tiny)
    host.ok("vm", "create", "g1", "--generation", "1", "--image", "tiny", "--memory", "256M")
    disk0 = host.vm("g1")["disks"][0]["path"]
    assert host.vm("g1")["disks"][0]["owned"] is True

    # a VM's disk changes only through the VM, even while it is Off
    for args in (("merge", disk0), ("compact", disk0), ("resize", disk0, "2G")):
        refused(host, "disk", *args, needle="attached to VM 'g1' (Off)")
    host.json("disk", "convert", disk0, str(d / "copy.qcow2"))  # reading it is fine
    # once detached, merging it would write the shared image
    host.ok("vm", "set", "g1", "--detach-disk", disk0)
    refused(host, "disk", "merge", disk0, needle="managed image")
    for args in (("resize", str(tiny), "2G"), ("compact", str(tiny))):
        refused(host, "disk", *args, needle="managed image")
    refused(host, "vm", "set", "g1", "--attach-disk", str(tiny), needle="managed image")
    host.json("disk", "convert", str(tiny), str(d / "tiny-copy.vhdx"))
    host.ok("vm", "set", "g1", "--attach-disk", disk0)
    assert Path(disk0).exists() and sha256(tiny) == image_sum

    # the parent of another disk: not merged into, resized, attached or deleted
    base, child, sibling = (str(d / f"{n}.qcow2") for n in ("base", "child", "sibling"))
    host.json("disk", "create", base, "--size", "16M")
    host.json("disk", "create", child, "--parent", base)
    host.json("disk", "create", sibling, "--parent", base)
    base_sum = sha256(Path(base))
    refused(host, "disk", "merge", child, needle=f"it is the parent of '{sibling}'")
    refused(host, "disk", "resize", base, "32M", needle="it is the parent of")
    refused(host, "vm", "set", "g1", "--attach-disk", base, needle="it is the parent of")
    refused(host, "disk", "create", str(d / "x.qcow2"), "--parent", disk0,
            needle="attached to VM 'g1'")
    assert sha256(Path(base)) == base_sum

    # the service's own files are not disks, whatever --format says
    refused(host, "vm", "set", "g1", "--attach-disk", str(d / "hvstack.db"),
            "--disk-format", "raw", needle="is not a disk")
    refused(host, "disk", "create", str(d / "evil.qcow2"), "--parent", str(d / "hv.lock"),
            "--parent-format", "raw", needle="is not a disk")


def test_delete_disks_deletes_only_what_the_vm_owns(host: HostProcess, tmp_path: Path) -> None:
    d = host.data_dir
    host.ok("vm", "create", "g2", "--generation", "1", "--image", "tiny", "--memory", "256M")
    own = Path(host.vm("g2")["disks"][0]["path"])
    outside = d / "outside.qcow2"
    host.json("disk", "create", str(outside), "--size", "16M")
    host.ok("vm", "set", "g2", "--attach-disk", str(outside))
    # a child of the VM's own disk, made behind hvstack's back
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(own), "-F", "qcow2",
                    str(d / "behind.qcow2")], check=True)
    result = host.json("vm", "delete", "g2", "--delete-disks")
    kept = {k["path"]: k["reason"] for k in result["kept_disks"]}
    assert result["deleted_disks"] == []
    assert "not created for this VM" in kept[str(outside)]
    assert f"parent of '{d / 'behind.qcow2'}'" in kept[str(own)]
    assert outside.exists() and own.exists()

    host.ok("vm", "create", "g3", "--generation", "1", "--image", "tiny", "--memory", "256M")
    mine = host.vm("g3")["disks"][0]["path"]
    text = host.ok("vm", "delete", "g3", "--delete-disks")
    assert f"deleted disk {mine}" in text and not Path(mine).exists()
    assert (d / "images" / "tiny.qcow2").exists()


def test_formats_follow_the_name(host: HostProcess) -> None:
    d = host.data_dir
    assert host.json("disk", "create", str(d / "win.vhdx"), "--size", "16M")["format"] == "vhdx"
    assert probed_format(d / "win.vhdx") == "vhdx"
    host.json("disk", "create", str(d / "a.qcow2"), "--size", "16M")
    assert host.json("disk", "convert", str(d / "a.qcow2"), str(d / "a.vhd"))["format"] == "vpc"
    assert probed_format(d / "a.vhd") == "vpc"
    refused(host, "disk", "create", str(d / "x.vhdx"), "--size", "1M", "--format", "qcow2",
            needle="named as a vhdx disk but --format says qcow2")
    refused(host, "disk", "create", str(d / "x.bin"), "--size", "1M", "--format", "qcow2",
            needle="is not a disk: the host service keeps its own files")
    refused(host, "disk", "convert", str(d / "a.qcow2"), str(d / "b.vhdx"), "--format", "raw",
            needle="named as a vhdx disk")
    assert sorted(p.name for p in d.glob("[abwx]*")) == ["a.qcow2", "a.vhd", "win.vhdx"]
