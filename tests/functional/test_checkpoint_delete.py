"""Deleting checkpoints of an Off VM through the API (fake driver, real qemu-img): the
files are merged offline, every remaining checkpoint and the current state keep their
contents byte for byte, a foreign child is refused, and a pending merge left by a
killed service is finished by ``startup``.

The tree is built the way checkpoint creation makes it (overlays beside the frozen
file, ``qemu-img create -u -F``), stored with ``CheckpointOperations.store``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from hvstack.checkpoints.model import Checkpoint, CheckpointKind, CheckpointTree, PendingMerge
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from hvstack.storage.qcow2_header import read_links
from hvstack.storage.qemu_img import run_qemu_img
from tests.functional.fakes import API, assert_problem, create_vm, finish_job

SIZE = 4 << 20


async def write(path: Path, pattern: int, offset_mib: int) -> None:
    """Guest data: 1 MiB of ``pattern`` at ``offset_mib`` (qemu-io, as a guest would)."""
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset_mib}M 1M", str(path),
        stdout=asyncio.subprocess.DEVNULL)
    assert await proc.wait() == 0


async def view(path: str, tmp: Path) -> str:
    """The digest of what the chain topped by ``path`` holds, flattened."""
    out = tmp / f"view-{hashlib.sha256(path.encode()).hexdigest()[:8]}.raw"
    await run_qemu_img(["convert", "-f", "qcow2", "-O", "raw", "--", path, str(out)])
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


async def build(service: HostService, root: HostRoot, tmp: Path, count: int) -> list[str]:
    """VM "web" (Off) with disk D and ``count`` checkpoints cp1..cpN in a line, each
    checkpoint's state written with its own pattern; returns [D, O1, ..., ON]."""
    disks = tmp / "disks"
    base = disks / "D.qcow2"
    await run_qemu_img(["create", "-q", "-f", "qcow2", "--", str(base), str(SIZE)])
    await write(base, 1, 0)
    vm = service.get_vm((await _create(root, str(base)))["name"])
    files = [str(base)]
    checkpoints: list[Checkpoint] = []
    for n in range(1, count + 1):
        overlay = disks / f"D_{n:08x}.qcow2"
        await run_qemu_img(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", files[-1],
                            "-u", "--", str(overlay), str(SIZE)])
        checkpoints.append(Checkpoint(f"id{n}", f"cp{n}", f"id{n - 1}" if n > 1 else None,
                                      float(n), CheckpointKind.PRODUCTION,
                                      {vm.record.config.disks[0].id: files[-1]}))
        files.append(str(overlay))
        await write(overlay, n + 1, n % 4)
    tree = CheckpointTree(tuple(checkpoints), f"id{count}", frozenset(files[1:]))
    disk = replace(vm.record.config.disks[0], path=files[-1])
    async with vm.lock:
        await root.checkpoints.store(vm, tree, replace(vm.record.config, disks=(disk,)))
    return files


async def _create(root: HostRoot, disk: str) -> dict[str, str]:
    from hvstack.api.app import create_app

    transport = httpx.ASGITransport(app=create_app(root))
    async with httpx.AsyncClient(transport=transport, base_url="http://hv") as api:
        return await create_vm(api, "web", disk=disk)


async def views(root: HostRoot, service: HostService, tmp: Path) -> dict[str, str]:
    vm = service.get_vm("web")
    tree = await root.checkpoints.tree_of(vm)
    found = {c.name: await view(next(iter(c.disks.values())), tmp) for c in tree.checkpoints}
    found["Now"] = await view(vm.record.config.disks[0].path, tmp)
    return found


@pytest.fixture
async def root_api(service: HostService) -> tuple[HostRoot, httpx.AsyncClient]:
    from hvstack.api.app import create_app

    root = HostRoot(service)
    return root, httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(root)),
                                   base_url="http://hv")


async def delete(api: httpx.AsyncClient, name: str, subtree: bool = False) -> dict[str, object]:
    response = await api.delete(f"{API}/vms/web/checkpoints/{name}",
                                params={"subtree": str(subtree).lower()})
    assert response.status_code == 202, response.text
    job = await finish_job(api, response.json())
    assert job["state"] == "completed", job
    return job


async def test_delete_a_middle_checkpoint_then_the_rest(
        service: HostService, root_api: tuple[HostRoot, httpx.AsyncClient],
        tmp_path: Path) -> None:
    root, api = root_api
    d, o1, o2, o3 = await build(service, root, tmp_path, 3)
    before = await views(root, service, tmp_path)

    job = await delete(api, "cp2")
    assert job["result"]["deleted"] == ["cp2"]  # type: ignore[index]
    assert not os.path.exists(o2)  # committed into O1, which cp3 now names
    tree = await root.checkpoints.tree_of(service.get_vm("web"))
    assert tree.get("cp3").disks == {service.get_vm("web").record.config.disks[0].id: o1}
    assert tree.get("cp3").parent == "id1" and tree.pending is None
    links = read_links(Path(o3))
    assert links is not None and links.backing_file == o1 and links.backing_format == "qcow2"
    after = await views(root, service, tmp_path)
    assert after == {k: v for k, v in before.items() if k != "cp2"}

    await delete(api, "cp1", subtree=True)  # cp1 and cp3: everything merges into D
    vm = service.get_vm("web")
    assert vm.record.config.disks[0].path == d
    assert [p for p in (o1, o2, o3) if os.path.exists(p)] == []
    assert await view(d, tmp_path) == before["Now"]
    assert (await root.checkpoints.tree_of(vm)) == CheckpointTree()
    await api.aclose()


async def test_bad_deletions_change_nothing(
        service: HostService, root_api: tuple[HostRoot, httpx.AsyncClient],
        tmp_path: Path) -> None:
    root, api = root_api
    d, o1, o2, o3 = await build(service, root, tmp_path, 3)
    tree = await root.checkpoints.tree_of(service.get_vm("web"))
    assert_problem(await api.delete(f"{API}/vms/web/checkpoints/nope"), 404, "not-found")
    foreign = tmp_path / "disks" / "someone.qcow2"
    await run_qemu_img(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", o1, "-u", "--",
                        str(foreign), str(SIZE)])
    body = assert_problem(await api.delete(f"{API}/vms/web/checkpoints/cp2"), 409,
                          "resource-busy")
    assert str(foreign) in body["detail"]
    assert await root.checkpoints.tree_of(service.get_vm("web")) == tree
    assert all(os.path.exists(p) for p in (d, o1, o2, o3))
    await api.aclose()


async def test_startup_finishes_a_pending_merge(
        service: HostService, root_api: tuple[HostRoot, httpx.AsyncClient],
        tmp_path: Path) -> None:
    root, api = root_api
    _, o1, o2, _ = await build(service, root, tmp_path, 3)
    before = await views(root, service, tmp_path)
    vm = service.get_vm("web")
    tree = await root.checkpoints.tree_of(vm)
    # What a service killed right after the deletion was stored leaves behind.
    async with vm.lock:
        await root.checkpoints.store(vm, tree.without(["id2"]).with_pending(
            PendingMerge(("id2",))))
    [job] = await root.checkpoints.startup()
    await job.done.wait()
    assert job.error is None, job.error
    assert not os.path.exists(o2)
    tree = await root.checkpoints.tree_of(vm)
    assert tree.pending is None and tree.get("cp3").disks[vm.record.config.disks[0].id] == o1
    assert await views(root, service, tmp_path) == {k: v for k, v in before.items()
                                                     if k != "cp2"}
    await api.aclose()
