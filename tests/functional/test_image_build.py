"""``POST /images/{name}/build``: the built image is published whole under its name, with
the builder's progress on the job, and an image that exists is never replaced."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from hvstack.host.service import HostService
from hvstack.images import tiny
from tests.functional.fakes import API, finish_job


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _qcow2(path: Path, size: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)


@pytest.fixture
def builder(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, str]]:
    """A tiny-image builder that writes a small file and reports one step."""
    seen: list[tuple[float, str]] = []

    async def build(cache_dir: Path, progress: Callable[[float, str], None] | None = None
                    ) -> Path:
        if progress is not None:
            progress(50.0, "assembling")
            seen.append((50.0, "assembling"))
        cache_dir.mkdir(parents=True, exist_ok=True)
        built = cache_dir / "tiny-0123.qcow2"
        _qcow2(built, "1M")
        return built

    monkeypatch.setattr(tiny, "build_tiny", build)
    return seen


async def _build(api: httpx.AsyncClient) -> dict[str, object]:
    response = await api.post(f"{API}/images/tiny/build")
    assert response.status_code == 202, response.text
    return await finish_job(api, response.json())


async def test_a_built_image_is_published_whole(
    api: httpx.AsyncClient, service: HostService, builder: list[tuple[float, str]]
) -> None:
    job = await _build(api)
    assert job["state"] == "completed", job
    images = service.config.images_dir
    assert sorted(p.name for p in images.iterdir()) == ["tiny.qcow2"]
    built = service.config.cache_dir / "tiny-0123.qcow2"
    assert (images / "tiny.qcow2").read_bytes() == built.read_bytes()
    assert builder == [(50.0, "assembling")]


async def test_an_image_that_exists_is_never_replaced(
    api: httpx.AsyncClient, service: HostService, builder: list[tuple[float, str]]
) -> None:
    images = service.config.images_dir
    images.mkdir(parents=True, exist_ok=True)
    _qcow2(images / "tiny.qcow2", "2M")  # the parent of VMs' disks
    before = (images / "tiny.qcow2").read_bytes()
    job = await _build(api)
    assert job["state"] == "completed", job
    assert (images / "tiny.qcow2").read_bytes() == before
    assert sorted(p.name for p in images.iterdir()) == ["tiny.qcow2"]


async def test_every_image_the_list_shows_can_give_a_vm_its_disk(
    api: httpx.AsyncClient, service: HostService
) -> None:
    images = service.config.images_dir
    images.mkdir(parents=True, exist_ok=True)
    _run("qemu-img", "create", "-q", "-f", "vpc", str(images / "legacy.vhd"), "2M")
    listed = (await api.get(f"{API}/images")).json()
    assert [(i["name"], i["format"]) for i in listed] == [("legacy", "vpc")]
    response = await api.post(f"{API}/vms", json={"name": "old", "image": "legacy"})
    assert response.status_code == 201, response.text
    [disk] = response.json()["disks"]
    info = _run("qemu-img", "info", "-U", "--output=json", disk["path"])
    assert '"backing-filename-format": "vpc"' in info
