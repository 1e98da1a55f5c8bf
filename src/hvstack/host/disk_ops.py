"""Disk and image operations of the host: paths confined to the storage roots, the
disks of running VMs protected, long work run as jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hvstack import files
from hvstack.compute.model import VmState, validate_name
from hvstack.errors import AlreadyExists, InvalidInput, NotFound, ResourceBusy
from hvstack.host.jobs import Job, Progress
from hvstack.host.service import HostService
from hvstack.progress import scaled
from hvstack.storage import disks
from hvstack.storage.paths import confine

IMAGE_SUFFIXES = (".qcow2", ".raw", ".img", ".vhdx")
BUILDERS = ("tiny",)


class DiskOperations:
    def __init__(self, service: HostService) -> None:
        self._service = service
        self._roots = service.config.storage_roots

    def _path(self, path: str, *, must_exist: bool, what: str = "disk") -> Path:
        return confine(path, self._roots, must_exist=must_exist, what=what)

    def _check_not_in_use(self, path: Path, operation: str) -> None:
        for vm in self._service.list_vms():
            if vm.state is VmState.OFF:
                continue
            if any(Path(d.path) == path for d in vm.record.config.disks):
                raise ResourceBusy(
                    f"cannot {operation} {path}: VM '{vm.record.name}' is using it "
                    f"({vm.state.value})", disk=str(path), vm=vm.record.name,
                )

    async def create(self, path: str, size: int | None, kind: str,
                     parent: str | None) -> dict[str, Any]:
        target = self._path(path, must_exist=False)
        if kind not in disks.DISK_KINDS:
            raise InvalidInput(f"disk type '{kind}' is not one of fixed, dynamic, differencing")
        if kind != "differencing" and parent:
            raise InvalidInput("only a differencing disk has a parent")
        if kind == "differencing" and not parent:
            raise InvalidInput("a differencing disk needs --parent")
        if kind != "differencing" and size is None:
            raise InvalidInput("give the disk's size, e.g. --size 20G")
        base = self._path(parent, must_exist=True, what="parent disk") if parent else None
        info = await disks.create_disk(target, size, kind, parent=base,  # type: ignore[arg-type]
                                       roots=self._roots)
        return info.to_dict()

    async def inspect(self, path: str) -> dict[str, Any]:
        return (await disks.inspect_disk(self._path(path, must_exist=True))).to_dict()

    async def resize(self, path: str, size: int, allow_shrink: bool) -> dict[str, Any]:
        target = self._path(path, must_exist=True)
        self._check_not_in_use(target, "resize")
        return (await disks.resize_disk(target, size, allow_shrink=allow_shrink)).to_dict()

    def _job(self, kind: str, target: Path, verb: str,
             run: Callable[[Progress], Awaitable[disks.DiskInfo]]) -> Job:
        async def body(progress: Progress) -> dict[str, Any]:
            return (await run(scaled(progress, 0, 100, verb))).to_dict()

        return self._service.jobs.start(kind, str(target), body)

    def convert(self, source: str, destination: str, fmt: disks.TargetFormat) -> Job:
        src = self._path(source, must_exist=True)
        dst = self._path(destination, must_exist=False)
        if dst.exists():
            raise AlreadyExists(f"{dst} already exists", path=str(dst))
        return self._job("convert", src, "converting",
                         lambda p: disks.convert_disk(src, dst, fmt, p, roots=self._roots))

    def merge(self, path: str) -> Job:
        target = self._path(path, must_exist=True)
        self._check_not_in_use(target, "merge")
        return self._job("merge", target, "merging",
                         lambda p: disks.merge_disk(target, p, roots=self._roots))

    def compact(self, path: str) -> Job:
        target = self._path(path, must_exist=True)
        self._check_not_in_use(target, "compact")
        return self._job("compact", target, "compacting",
                         lambda p: disks.compact_disk(target, p, roots=self._roots))

    # -- images ----------------------------------------------------------------

    async def list_images(self) -> list[dict[str, Any]]:
        images_dir = self._service.config.images_dir
        found = []
        for path in sorted(images_dir.iterdir()) if images_dir.exists() else []:
            if path.suffix not in IMAGE_SUFFIXES or path.name.startswith("."):
                continue
            info = await disks.inspect_disk(path)
            found.append({"name": path.stem, **info.to_dict()})
        return found

    def build_image(self, name: str) -> Job:
        validate_name(name, what="image name")
        if name not in BUILDERS:
            raise NotFound(f"no image builder named '{name}'; builders: {', '.join(BUILDERS)}")
        config = self._service.config

        async def body(progress: Progress) -> dict[str, Any]:
            from hvstack.images.tiny import build_tiny  # the builder's tools load on use

            built = await build_tiny(config.cache_dir, progress)
            config.images_dir.mkdir(parents=True, exist_ok=True)
            target = config.images_dir / f"{name}{built.suffix}"
            # An image that exists is never replaced: differencing disks of VMs use it
            # as their parent, and new content under them would corrupt them.
            if not target.exists():
                with contextlib.suppress(AlreadyExists):  # built meanwhile: keep that one
                    await files.write_new(
                        target, lambda tmp: asyncio.to_thread(shutil.copyfile, built, tmp))
            info = await disks.inspect_disk(target)
            return {"name": name, **info.to_dict()}

        return self._service.jobs.start("image-build", name, body)
