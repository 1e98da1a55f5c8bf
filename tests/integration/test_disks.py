"""Integration tests for hvstack.storage.disks with the real qemu-img and qemu-io."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hvstack.errors import (
    AlreadyExists,
    HypervisorError,
    InsufficientResources,
    InvalidInput,
    NotFound,
    OperationTimeout,
    PathNotAllowed,
    ResourceBusy,
)
from hvstack.storage.disks import (
    DiskInfo,
    TargetFormat,
    compact_disk,
    convert_disk,
    create_disk,
    delete_disk,
    inspect_disk,
    merge_disk,
    resize_disk,
    vhd_kind,
)
from hvstack.storage.qemu_img import run_qemu_img

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
TIMEOUT = 30.0


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def qemu_io(path: Path, fmt: str, command: str) -> None:
    """Run one qemu-io command on ``path``; fail the test if it fails."""
    rc, out = await _run("qemu-io", "-f", fmt, "-c", command, str(path))
    assert rc == 0 and "failed" not in out.lower(), f"qemu-io {command!r}: {out}"


async def pattern_ok(path: Path, fmt: str, pattern: int, offset: int, length: int) -> bool:
    rc, out = await _run(
        "qemu-io", "-f", fmt, "-c", f"read -P {pattern:#x} {offset} {length}", str(path)
    )
    return rc == 0 and "failed" not in out.lower()


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def assert_no_temp(folder: Path) -> None:
    assert [n for n in os.listdir(folder) if n.endswith(".hvtmp")] == []


# -- create and inspect -------------------------------------------------------------------


async def test_create_fixed(tmp_path: Path) -> None:
    info = await create_disk(tmp_path / "fixed.raw", 4 * MiB, "fixed")
    assert (info.format, info.kind, info.virtual_size) == ("raw", "fixed", 4 * MiB)
    assert info.actual_size >= 4 * MiB  # fully allocated
    assert info.backing_file is None and info.chain == (tmp_path / "fixed.raw",)
    assert listing(tmp_path) == ["fixed.raw"]


async def test_create_dynamic(tmp_path: Path) -> None:
    info = await create_disk(tmp_path / "dyn.qcow2", 1024 * MiB, "dynamic")
    assert (info.format, info.kind, info.virtual_size) == ("qcow2", "dynamic", 1024 * MiB)
    assert info.actual_size < 2 * MiB
    assert info.cluster_size == 65536
    assert listing(tmp_path) == ["dyn.qcow2"]


async def test_create_differencing(tmp_path: Path) -> None:
    parent = await create_disk(tmp_path / "base.qcow2", 64 * MiB, "dynamic")
    child = await create_disk(tmp_path / "child.qcow2", None, "differencing", parent.path)
    assert (child.format, child.kind) == ("qcow2", "differencing")
    assert child.virtual_size == 64 * MiB
    assert child.backing_file == str(parent.path)
    assert child.backing_format == "qcow2"
    assert child.parent == parent.path
    assert child.chain == (child.path, parent.path)

    grandchild = await create_disk(
        tmp_path / "gc.qcow2", 128 * MiB, "differencing", child.path, roots=[tmp_path]
    )
    assert grandchild.virtual_size == 128 * MiB
    assert grandchild.chain == (grandchild.path, child.path, parent.path)


async def test_create_differencing_of_fixed_parent(tmp_path: Path) -> None:
    parent = await create_disk(tmp_path / "base.raw", 8 * MiB, "fixed")
    child = await create_disk(tmp_path / "child.qcow2", None, "differencing", parent.path)
    assert child.backing_format == "raw" and child.kind == "differencing"


async def test_create_refusals_leave_nothing(tmp_path: Path) -> None:
    existing = tmp_path / "taken.qcow2"
    existing.write_bytes(b"keep me")
    with pytest.raises(AlreadyExists):
        await create_disk(existing, MiB, "dynamic")
    assert existing.read_bytes() == b"keep me"
    for size in (0, -512, 1000, 511):
        with pytest.raises(InvalidInput):
            await create_disk(tmp_path / "a.qcow2", size, "dynamic")
    with pytest.raises(InsufficientResources) as info:
        await create_disk(tmp_path / "huge.raw", 1 << 50, "fixed")
    assert "free" in str(info.value)
    with pytest.raises(InvalidInput, match="needs a parent"):
        await create_disk(tmp_path / "d.qcow2", None, "differencing")
    with pytest.raises(NotFound):
        await create_disk(tmp_path / "d.qcow2", None, "differencing", tmp_path / "nope.qcow2")
    with pytest.raises(InvalidInput, match="no parent"):
        await create_disk(tmp_path / "d.qcow2", MiB, "dynamic", existing)
    with pytest.raises(InvalidInput, match="needs a size"):
        await create_disk(tmp_path / "d.qcow2", None, "dynamic")
    with pytest.raises(InvalidInput):
        await create_disk(tmp_path / "d.qcow2", MiB, "sparse")  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="folder"):
        await create_disk(tmp_path / "no-such-dir" / "d.qcow2", MiB, "dynamic")
    assert listing(tmp_path) == ["taken.qcow2"]


async def test_create_failing_in_qemu_img_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="too large"):
        await create_disk(tmp_path / "huge.qcow2", 1 << 60, "dynamic")
    assert listing(tmp_path) == []


async def test_create_differencing_smaller_than_parent(tmp_path: Path) -> None:
    parent = await create_disk(tmp_path / "base.qcow2", 64 * MiB, "dynamic")
    with pytest.raises(InvalidInput, match="smaller than its parent"):
        await create_disk(tmp_path / "c.qcow2", 32 * MiB, "differencing", parent.path)
    assert listing(tmp_path) == ["base.qcow2"]


async def test_create_differencing_parent_outside_roots(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    parent = await create_disk(outside / "base.qcow2", MiB, "dynamic")
    with pytest.raises(PathNotAllowed):
        await create_disk(inside / "c.qcow2", None, "differencing", parent.path, roots=[inside])
    assert listing(inside) == []


async def test_inspect_vhd_and_vhdx_kinds(tmp_path: Path) -> None:
    for name, fmt, sub, kind in [
        ("f.vhd", "vpc", "fixed", "fixed"),
        ("d.vhd", "vpc", "dynamic", "dynamic"),
        ("f.vhdx", "vhdx", "fixed", "fixed"),
        ("d.vhdx", "vhdx", "dynamic", "dynamic"),
    ]:
        path = tmp_path / name
        await run_qemu_img(["create", "-q", "-f", fmt, "-o", f"subformat={sub}", str(path), "4M"])
        info = await inspect_disk(path)
        assert (info.format, info.kind) == (fmt, kind), name


async def test_inspect_to_dict_is_json(tmp_path: Path) -> None:
    base = await create_disk(tmp_path / "base.qcow2", MiB, "dynamic")
    child = await create_disk(tmp_path / "c.qcow2", None, "differencing", base.path)
    data = json.loads(json.dumps(child.to_dict()))
    assert data["kind"] == "differencing"
    assert data["chain"] == [str(child.path), str(base.path)]
    assert data["path"] == str(child.path)


async def test_inspect_missing_and_explicit_format(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await inspect_disk(tmp_path / "missing.qcow2")
    info = await create_disk(tmp_path / "a.qcow2", MiB, "dynamic")
    raw_view = await inspect_disk(info.path, format="raw")
    assert raw_view.format == "raw"  # no probing when the format is given


# -- resize -------------------------------------------------------------------------------


async def test_resize_grow_and_shrink(tmp_path: Path) -> None:
    disk = await create_disk(tmp_path / "a.qcow2", 16 * MiB, "dynamic")
    grown = await resize_disk(disk.path, 32 * MiB)
    assert grown.virtual_size == 32 * MiB
    with pytest.raises(InvalidInput, match="without --allow-shrink: shrinking loses the data"):
        await resize_disk(disk.path, 16 * MiB)
    assert (await inspect_disk(disk.path)).virtual_size == 32 * MiB
    shrunk = await resize_disk(disk.path, 8 * MiB, allow_shrink=True)
    assert shrunk.virtual_size == 8 * MiB
    same = await resize_disk(disk.path, 8 * MiB)
    assert same.virtual_size == 8 * MiB
    with pytest.raises(InvalidInput):
        await resize_disk(disk.path, 8 * MiB + 100)


async def test_resize_fixed_stays_allocated(tmp_path: Path) -> None:
    disk = await create_disk(tmp_path / "a.raw", 4 * MiB, "fixed")
    grown = await resize_disk(disk.path, 12 * MiB)
    assert (grown.kind, grown.virtual_size) == ("fixed", 12 * MiB)
    assert grown.actual_size >= 12 * MiB


async def test_resize_differencing_grows(tmp_path: Path) -> None:
    base = await create_disk(tmp_path / "base.qcow2", 16 * MiB, "dynamic")
    child = await create_disk(tmp_path / "c.qcow2", None, "differencing", base.path)
    grown = await resize_disk(child.path, 32 * MiB)
    assert (grown.kind, grown.virtual_size) == ("differencing", 32 * MiB)
    assert (await inspect_disk(base.path)).virtual_size == 16 * MiB


async def test_resize_vhdx_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.vhdx"
    await run_qemu_img(["create", "-q", "-f", "vhdx", str(path), "4M"])
    with pytest.raises(InvalidInput, match="convert it to qcow2"):
        await resize_disk(path, 8 * MiB)


# -- convert ------------------------------------------------------------------------------


async def test_convert_round_trip_keeps_content(tmp_path: Path) -> None:
    src = await create_disk(tmp_path / "a.qcow2", 64 * MiB, "dynamic")
    await qemu_io(src.path, "qcow2", "write -P 0xab 0 1M")
    await qemu_io(src.path, "qcow2", "write -P 0x5c 40M 3M")
    seen: list[float] = []
    current = src
    steps: list[tuple[TargetFormat, str, str]] = [
        ("vhdx", "vhdx", "dynamic"),
        ("vhd", "vpc", "dynamic"),
        ("raw", "raw", "fixed"),
        ("qcow2", "qcow2", "dynamic"),
    ]
    for fmt, qfmt, kind in steps:
        dst = tmp_path / f"b-{fmt}.{fmt}"
        progress: list[float] = []
        info = await convert_disk(
            current.path, dst, fmt, lambda p, _m, seen=progress: seen.append(p),
            src_format=current.format,
        )
        assert (info.format, info.kind, info.virtual_size) == (qfmt, kind, 64 * MiB), fmt
        assert await pattern_ok(dst, qfmt, 0xAB, 0, MiB), fmt
        assert await pattern_ok(dst, qfmt, 0x5C, 40 * MiB, 3 * MiB), fmt
        assert await pattern_ok(dst, qfmt, 0, 8 * MiB, MiB), fmt
        assert progress == sorted(progress) and progress[-1] == 100.0
        assert all(0.0 <= p <= 100.0 for p in progress)
        seen += progress
        current = info
    rc, out = await _run("qemu-img", "compare", str(src.path), str(current.path))
    assert rc == 0, out
    assert not await pattern_ok(current.path, "qcow2", 0xCD, 0, MiB)  # the check can fail
    assert_no_temp(tmp_path)


async def test_convert_flattens_a_differencing_disk(tmp_path: Path) -> None:
    base = await create_disk(tmp_path / "base.qcow2", 8 * MiB, "dynamic")
    await qemu_io(base.path, "qcow2", "write -P 0x11 0 1M")
    child = await create_disk(tmp_path / "c.qcow2", None, "differencing", base.path)
    await qemu_io(child.path, "qcow2", "write -P 0x22 1M 1M")
    flat = await convert_disk(child.path, tmp_path / "flat.vhdx", "vhdx", roots=[tmp_path])
    assert flat.backing_file is None and flat.kind == "dynamic"
    assert await pattern_ok(flat.path, "vhdx", 0x11, 0, MiB)
    assert await pattern_ok(flat.path, "vhdx", 0x22, MiB, MiB)


async def test_convert_refusals(tmp_path: Path) -> None:
    src = await create_disk(tmp_path / "a.qcow2", MiB, "dynamic")
    taken = tmp_path / "taken.vhdx"
    taken.write_bytes(b"keep")
    with pytest.raises(AlreadyExists):
        await convert_disk(src.path, taken, "vhdx")
    assert taken.read_bytes() == b"keep"
    with pytest.raises(InvalidInput):
        await convert_disk(src.path, tmp_path / "x.vmdk", "vmdk")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await convert_disk(tmp_path / "missing.qcow2", tmp_path / "x.raw", "raw")
    with pytest.raises(NotFound):
        await convert_disk(src.path, tmp_path / "gone" / "x.raw", "raw")
    assert listing(tmp_path) == ["a.qcow2", "taken.vhdx"]


async def test_convert_failure_in_qemu_img_leaves_nothing(tmp_path: Path) -> None:
    # VHD tops out at 2040 GiB; qemu-img itself would leave an empty target behind.
    src = await create_disk(tmp_path / "big.qcow2", 3 * 1024 * 1024 * MiB, "dynamic")
    with pytest.raises(InvalidInput, match="too large"):
        await convert_disk(src.path, tmp_path / "big.vhd", "vhd")
    assert listing(tmp_path) == ["big.qcow2"]


async def test_convert_cancelled_midway_leaves_nothing(tmp_path: Path) -> None:
    src = await create_disk(tmp_path / "a.qcow2", 256 * MiB, "dynamic")
    await qemu_io(src.path, "qcow2", "write -P 0x42 0 64M")
    task: asyncio.Task[DiskInfo] | None = None
    calls: list[float] = []

    def cancel_on_first(value: float, _message: str) -> None:
        calls.append(value)
        if len(calls) == 1 and task is not None:
            task.cancel()

    task = asyncio.create_task(convert_disk(src.path, tmp_path / "b.raw", "raw", cancel_on_first))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == [0.0]  # cancelled right after qemu-img started
    await asyncio.sleep(0.2)  # a surviving qemu-img would show up here
    assert listing(tmp_path) == ["a.qcow2"]


async def test_convert_chain_outside_roots_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    base = await create_disk(outside / "secret.qcow2", MiB, "dynamic")
    child = await create_disk(inside / "c.qcow2", None, "differencing", base.path)
    with pytest.raises(PathNotAllowed):
        await convert_disk(child.path, inside / "out.raw", "raw", roots=[inside])
    with pytest.raises(PathNotAllowed):
        await merge_disk(child.path, roots=[inside])
    assert listing(inside) == ["c.qcow2"]


# -- merge --------------------------------------------------------------------------------


async def test_merge_moves_child_data_into_parent(tmp_path: Path) -> None:
    base = await create_disk(tmp_path / "base.qcow2", 16 * MiB, "dynamic")
    await qemu_io(base.path, "qcow2", "write -P 0x11 0 2M")
    child = await create_disk(tmp_path / "child.qcow2", None, "differencing", base.path)
    await qemu_io(child.path, "qcow2", "write -P 0x22 1M 2M")
    progress: list[float] = []
    merged = await merge_disk(child.path, lambda p, _m: progress.append(p), roots=[tmp_path])
    assert merged.path == base.path and merged.kind == "dynamic"
    assert not child.path.exists()
    assert listing(tmp_path) == ["base.qcow2"]
    assert await pattern_ok(base.path, "qcow2", 0x11, 0, MiB)
    assert await pattern_ok(base.path, "qcow2", 0x22, MiB, 2 * MiB)
    assert progress and progress[-1] == 100.0


async def test_merge_grown_child_grows_parent(tmp_path: Path) -> None:
    base = await create_disk(tmp_path / "base.qcow2", 8 * MiB, "dynamic")
    child = await create_disk(tmp_path / "child.qcow2", 16 * MiB, "differencing", base.path)
    await qemu_io(child.path, "qcow2", "write -P 0x33 12M 1M")
    merged = await merge_disk(child.path)
    assert merged.virtual_size == 16 * MiB
    assert await pattern_ok(base.path, "qcow2", 0x33, 12 * MiB, MiB)


async def test_merge_middle_of_chain(tmp_path: Path) -> None:
    base = await create_disk(tmp_path / "base.qcow2", 8 * MiB, "dynamic")
    mid = await create_disk(tmp_path / "mid.qcow2", None, "differencing", base.path)
    top = await create_disk(tmp_path / "top.qcow2", None, "differencing", mid.path)
    await qemu_io(top.path, "qcow2", "write -P 0x44 0 1M")
    merged = await merge_disk(top.path)
    assert merged.path == mid.path and merged.kind == "differencing"
    assert merged.chain == (mid.path, base.path)
    assert await pattern_ok(mid.path, "qcow2", 0x44, 0, MiB)


async def test_merge_refuses_non_differencing(tmp_path: Path) -> None:
    disk = await create_disk(tmp_path / "a.qcow2", MiB, "dynamic")
    with pytest.raises(InvalidInput, match="not a differencing disk"):
        await merge_disk(disk.path)
    assert disk.path.exists()


# -- compact ------------------------------------------------------------------------------


async def test_compact_dynamic(tmp_path: Path) -> None:
    disk = await create_disk(tmp_path / "a.qcow2", 64 * MiB, "dynamic")
    await qemu_io(disk.path, "qcow2", "write -P 0x00 0 16M")  # allocated, but all zero
    await qemu_io(disk.path, "qcow2", "write -P 0x77 20M 1M")
    os.chmod(disk.path, 0o640)
    progress: list[float] = []
    info = await compact_disk(disk.path, lambda p, _m: progress.append(p))
    assert info.actual_size_before is not None
    assert info.actual_size_before > 16 * MiB
    assert info.actual_size < 4 * MiB
    assert info.to_dict()["actual_size_before"] == info.actual_size_before
    assert (info.kind, info.virtual_size) == ("dynamic", 64 * MiB)
    assert await pattern_ok(disk.path, "qcow2", 0x77, 20 * MiB, MiB)
    assert await pattern_ok(disk.path, "qcow2", 0, 0, 16 * MiB)
    assert os.stat(disk.path).st_mode & 0o777 == 0o640
    assert progress[-1] == 100.0
    assert listing(tmp_path) == ["a.qcow2"]


async def test_compact_differencing_keeps_backing(tmp_path: Path) -> None:
    base = await create_disk(tmp_path / "base.qcow2", 8 * MiB, "dynamic")
    await qemu_io(base.path, "qcow2", "write -P 0xab 0 2M")
    child = await create_disk(tmp_path / "c.qcow2", None, "differencing", base.path)
    await qemu_io(child.path, "qcow2", "write -P 0x00 0 1M")  # zeros hiding parent data
    await qemu_io(child.path, "qcow2", "write -P 0xcd 4M 1M")
    info = await compact_disk(child.path, roots=[tmp_path])
    assert info.kind == "differencing" and info.backing_file == str(base.path)
    assert await pattern_ok(child.path, "qcow2", 0, 0, MiB)
    assert await pattern_ok(child.path, "qcow2", 0xAB, MiB, MiB)
    assert await pattern_ok(child.path, "qcow2", 0xCD, 4 * MiB, MiB)
    assert info.actual_size < 4 * MiB  # the parent's data was not copied in


async def test_compact_vhdx(tmp_path: Path) -> None:
    src = await create_disk(tmp_path / "a.qcow2", 32 * MiB, "dynamic")
    await qemu_io(src.path, "qcow2", "write -P 0x66 0 1M")
    vhdx = await convert_disk(src.path, tmp_path / "a.vhdx", "vhdx")
    info = await compact_disk(vhdx.path)
    assert (info.format, info.kind) == ("vhdx", "dynamic")
    assert await pattern_ok(vhdx.path, "vhdx", 0x66, 0, MiB)


async def test_compact_fixed_refused(tmp_path: Path) -> None:
    disk = await create_disk(tmp_path / "a.raw", MiB, "fixed")
    with pytest.raises(InvalidInput, match="a fixed disk cannot be compacted"):
        await compact_disk(disk.path)


# -- delete, and disks in use -------------------------------------------------------------


async def test_delete(tmp_path: Path) -> None:
    disk = await create_disk(tmp_path / "a.qcow2", MiB, "dynamic")
    await delete_disk(disk.path)
    assert listing(tmp_path) == []
    with pytest.raises(NotFound):
        await delete_disk(disk.path)


async def _hold(path: Path) -> asyncio.subprocess.Process | None:
    """Start qemu-io holding ``path`` open; None if it lost a race with our lock probe."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "sleep 60000",
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    # The probe (qemu-img info without -U) takes a lock too: if qemu-io opens the image
    # at that moment, qemu-io is the one that fails and exits.
    try:
        while (await _run("qemu-img", "info", str(path)))[0] == 0:
            if proc.returncode is not None:
                return None
            await asyncio.sleep(0.05)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc


@pytest.fixture
async def held_disk(tmp_path: Path) -> AsyncIterator[Path]:
    """A qcow2 disk that a qemu-io process holds open for writing, as a VM would."""
    disk = await create_disk(tmp_path / "held.qcow2", 8 * MiB, "dynamic")
    proc = None
    async with asyncio.timeout(TIMEOUT):
        while proc is None:
            proc = await _hold(disk.path)
    try:
        yield disk.path
    finally:
        proc.kill()
        await asyncio.wait_for(proc.wait(), TIMEOUT)


async def test_operations_on_a_disk_in_use(held_disk: Path) -> None:
    info = await inspect_disk(held_disk)  # -U: works on a disk a VM has open
    assert info.kind == "dynamic"
    with pytest.raises(ResourceBusy, match="in use"):
        await delete_disk(held_disk)
    with pytest.raises(ResourceBusy):
        await resize_disk(held_disk, 16 * MiB)
    with pytest.raises(ResourceBusy):
        await compact_disk(held_disk)
    assert held_disk.exists()
    assert_no_temp(held_disk.parent)


# -- the runner ---------------------------------------------------------------------------


async def test_runner_timeout_kills_the_process() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(OperationTimeout, match=r"did not finish within 0\.3 s"):
        await run_qemu_img(["30"], timeout=0.3, binary="sleep")
    assert loop.time() - started < 5


async def test_runner_missing_binary() -> None:
    with pytest.raises(HypervisorError, match="not installed"):
        await run_qemu_img(["info"], binary="/nonexistent/qemu-img")


# -- formats follow the name; chains are read member by member and checked --------------


async def qemu_img_format(path: Path) -> str:
    """What qemu-img finds in the file (a probe, fine for a test's own files)."""
    rc, out = await _run("qemu-img", "info", "--output=json", str(path))
    assert rc == 0, out
    fmt: str = json.loads(out)["format"]
    return fmt


@pytest.mark.parametrize(("name", "kind", "fmt", "expected_kind"), [
    ("win.vhdx", "dynamic", "vhdx", "dynamic"),
    ("fixed.vhdx", "fixed", "vhdx", "fixed"),
    ("old.vhd", "dynamic", "vpc", "dynamic"),
    ("old-fixed.vhd", "fixed", "vpc", "fixed"),
    ("plain.img", "fixed", "raw", "fixed"),
])
async def test_create_writes_the_format_its_name_says(tmp_path: Path, name: str, kind: str,
                                                      fmt: str, expected_kind: str) -> None:
    info = await create_disk(tmp_path / name, 4 * MiB, kind)  # type: ignore[arg-type]
    assert (info.format, info.kind) == (fmt, expected_kind)
    if name == "old-fixed.vhd":  # raw data and a footer: qemu-img's probe cannot tell
        assert vhd_kind(tmp_path / name) == "fixed"
    else:
        assert await qemu_img_format(tmp_path / name) == fmt


async def test_create_refuses_what_the_format_cannot_be(tmp_path: Path) -> None:
    base = await create_disk(tmp_path / "base.qcow2", MiB, "dynamic")
    with pytest.raises(InvalidInput, match="differencing disk is a qcow2"):
        await create_disk(tmp_path / "c.vhdx", None, "differencing", base.path)
    with pytest.raises(InvalidInput, match="named as a vhdx disk but --format says qcow2"):
        await create_disk(tmp_path / "x.vhdx", MiB, "dynamic", fmt="qcow2")
    with pytest.raises(InvalidInput, match="no known extension"):
        await create_disk(tmp_path / "x.bin", MiB, "dynamic")
    with pytest.raises(InvalidInput, match="raw disk is always fixed"):
        await create_disk(tmp_path / "x.raw", MiB, "dynamic")
    assert listing(tmp_path) == ["base.qcow2"]


async def test_convert_writes_the_format_of_the_destination_name(tmp_path: Path) -> None:
    src = await create_disk(tmp_path / "a.qcow2", 4 * MiB, "dynamic")
    out = await convert_disk(src.path, tmp_path / "a.vhd")
    assert out.format == "vpc" and await qemu_img_format(tmp_path / "a.vhd") == "vpc"
    with pytest.raises(InvalidInput, match="named as a vhdx disk"):
        await convert_disk(src.path, tmp_path / "b.vhdx", "qcow2")
    assert not (tmp_path / "b.vhdx").exists()


async def make_child(path: Path, backing: str, backing_format: str | None,
                     *extra: str) -> None:
    args = ["create", "-q", "-f", "qcow2", "-u", "-b", backing]
    if backing_format:
        args += ["-F", backing_format]
    await run_qemu_img([*args, *extra, str(path), "1M"])


@pytest.mark.parametrize(("backing", "backing_format", "error", "needle"), [
    ("/etc/shadow", "raw", PathNotAllowed, "outside the storage roots"),
    ("../outside/secret.raw", "raw", PathNotAllowed, "outside the storage roots"),
    ('json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}', "raw",
     InvalidInput, "not a file path"),
    ("nbd:localhost:10809", "raw", InvalidInput, "not a file path"),
    ("base.raw", "qcow2", InvalidInput, "named as raw"),
    ("base.raw", "vmdk", InvalidInput, "without a known format"),
])
async def test_chain_refusals(tmp_path: Path, backing: str, backing_format: str,
                              error: type[Exception], needle: str) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.raw").write_bytes(b"\0" * MiB)
    (inside / "base.raw").write_bytes(b"\0" * MiB)
    evil = inside / "evil.qcow2"
    await make_child(evil, backing, backing_format)
    with pytest.raises(error, match=needle):
        await inspect_disk(evil, roots=[inside])
    with pytest.raises(error, match=needle):
        await convert_disk(evil, inside / "out.raw", roots=[inside])
    assert not (inside / "out.raw").exists()


async def test_chain_guard_refuses_a_service_file_as_parent(tmp_path: Path) -> None:
    (tmp_path / "hvstack.db").write_bytes(b"\0" * MiB)
    evil = tmp_path / "evil.qcow2"
    await make_child(evil, str(tmp_path / "hvstack.db"), "raw")

    def guard(path: Path) -> None:
        if path.name == "hvstack.db":
            raise PathNotAllowed("a service file")

    with pytest.raises(PathNotAllowed, match="a service file"):
        await inspect_disk(evil, roots=[tmp_path], guard=guard)


async def test_external_data_files_are_refused(tmp_path: Path) -> None:
    disk = tmp_path / "data-file.qcow2"
    await run_qemu_img(["create", "-q", "-f", "qcow2", "-o",
                        f"data_file={tmp_path / 'elsewhere.raw'}", str(disk), "1M"])
    with pytest.raises(InvalidInput, match="external file"):
        await inspect_disk(disk, roots=[tmp_path])


async def test_inspect_never_probes(tmp_path: Path) -> None:
    """A raw disk holding a qcow2 header is a raw disk: the header is guest data."""
    header = tmp_path / "header.qcow2"
    await make_child(header, "/etc/shadow", "raw")
    guest_disk = tmp_path / "guest.raw"
    guest_disk.write_bytes(header.read_bytes().ljust(MiB, b"\0"))
    info = await inspect_disk(guest_disk, roots=[tmp_path])
    assert (info.format, info.kind, info.chain) == ("raw", "fixed", (guest_disk,))
