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
from hvstack.compute.model import validate_name
from hvstack.errors import AlreadyExists, InvalidInput, NotFound
from hvstack.host.jobs import Job, Progress
from hvstack.host.service import HostService
from hvstack.progress import scaled
from hvstack.storage import disks, formats

IMAGE_SUFFIXES = formats.DISK_EXTENSIONS
BUILDERS = ("tiny",)


class DiskOperations:
    """``hv disk ...``: every path confined and checked against the one disk-in-use
    rule (:mod:`hvstack.storage.usage`) before anything is written."""

    def __init__(self, service: HostService) -> None:
        self._service = service
        self._use = service.disk_use
        self._roots = service.config.storage_roots

    def _path(self, path: str, *, must_exist: bool, what: str = "disk") -> Path:
        return self._use.confine(path, must_exist=must_exist, what=what)

    async def create(self, path: str, size: int | None, kind: str | None,
                     parent: str | None, fmt: str | None = None,
                     parent_format: str | None = None) -> dict[str, Any]:
        target = self._path(path, must_exist=False)
        target_format = formats.format_for(target, fmt)
        if kind is None:  # raw is always fixed; every other format starts dynamic
            kind = "differencing" if parent else ("fixed" if target_format == "raw"
                                                  else "dynamic")
        if kind not in disks.DISK_KINDS:
            raise InvalidInput(f"disk type '{kind}' is not one of fixed, dynamic, differencing")
        if kind != "differencing" and parent:
            raise InvalidInput("only a differencing disk has a parent")
        if kind == "differencing" and not parent:
            raise InvalidInput("a differencing disk needs --parent")
        if kind != "differencing" and size is None:
            raise InvalidInput("give the disk's size, e.g. --size 20G")
        base = self._path(parent, must_exist=True, what="parent disk") if parent else None
        if base is not None:
            await self._use.check(base, "new-parent")
            formats.format_for(base, parent_format, what="parent disk")
        info = await disks.create_disk(target, size, kind, parent=base,  # type: ignore[arg-type]
                                       fmt=target_format, parent_format=parent_format,
                                       roots=self._roots, guard=self._use.guard)
        return info.to_dict()

    async def inspect(self, path: str, fmt: str | None = None) -> dict[str, Any]:
        target = self._path(path, must_exist=True)
        return (await disks.inspect_disk(target, format=self._format(target, fmt),
                                         roots=self._roots, guard=self._use.guard)).to_dict()

    def _format(self, path: Path, fmt: str | None) -> str:
        return self._use.format_of(path, fmt)

    async def resize(self, path: str, size: int, allow_shrink: bool,
                     fmt: str | None = None) -> dict[str, Any]:
        target = self._path(path, must_exist=True)
        await self._use.check(target, "modify")
        return (await disks.resize_disk(target, size, allow_shrink=allow_shrink,
                                        format=formats.format_for(target, fmt),
                                        roots=self._roots, guard=self._use.guard)).to_dict()

    def _job(self, kind: str, target: Path, verb: str,
             run: Callable[[Progress], Awaitable[disks.DiskInfo]]) -> Job:
        async def body(progress: Progress) -> dict[str, Any]:
            return (await run(scaled(progress, 0, 100, verb))).to_dict()

        return self._service.jobs.start(kind, str(target), body)

    async def convert(self, source: str, destination: str, fmt: str | None = None,
                      source_format: str | None = None) -> Job:
        src = self._path(source, must_exist=True, what="source disk")
        dst = self._path(destination, must_exist=False, what="destination")
        if dst.exists():
            raise AlreadyExists(f"{dst} already exists", path=str(dst))
        target = formats.format_for(dst, fmt, what="destination")
        src_format = self._format(src, source_format)
        await self._use.check(src, "read")
        async def run(progress: Progress) -> disks.DiskInfo:
            await self._use.check(src, "read")  # again: the job may have waited
            return await disks.convert_disk(src, dst, target, progress, src_format=src_format,
                                            roots=self._roots, guard=self._use.guard)

        return self._job("convert", src, "converting", run)

    async def merge(self, path: str, fmt: str | None = None) -> Job:
        target = self._path(path, must_exist=True)
        target_format = formats.format_for(target, fmt)
        await self._use.check(target, "modify")
        info = await disks.inspect_disk(target, format=target_format, roots=self._roots,
                                        guard=self._use.guard)
        if info.parent is not None:
            await self._use.check(info.parent, "merge-into", child=target)
        async def run(progress: Progress) -> disks.DiskInfo:
            await self._use.check(target, "modify")  # again: the job may have waited
            if info.parent is not None:
                await self._use.check(info.parent, "merge-into", child=target)
            return await disks.merge_disk(target, progress, format=target_format,
                                          roots=self._roots, guard=self._use.guard)

        return self._job("merge", target, "merging", run)

    async def compact(self, path: str, fmt: str | None = None) -> Job:
        target = self._path(path, must_exist=True)
        target_format = formats.format_for(target, fmt)
        await self._use.check(target, "modify")
        async def run(progress: Progress) -> disks.DiskInfo:
            await self._use.check(target, "modify")  # again: the job may have waited
            return await disks.compact_disk(target, progress, format=target_format,
                                            roots=self._roots, guard=self._use.guard)

        return self._job("compact", target, "compacting", run)

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
