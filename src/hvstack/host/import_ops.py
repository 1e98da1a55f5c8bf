"""Importing an exported VM (Import-VM), after a check that changes nothing.

:meth:`ImportOperations.check` reads the export's ``vm.json``
(:mod:`hvstack.host.export_format`) and lists every problem at once, without writing
anything: a disk file missing, not a regular file, leading outside the export folder
(a symbolic link or '..'), named as another format than its record, or whose header
names another parent (or parent format) than the record, or an external data file; a
chain member the export does not hold; a disk of the settings or of a checkpoint that is
not in the export; a missing memory state; an ID clash (without ``--new-id``), a name
clash (without ``--name``), a static MAC another VM uses; Generation 2 without UEFI
firmware on this host, settings this host cannot run (processors, memory, accelerator);
for ``--register``, a file another VM uses; for ``--copy``, a destination that exists or
lacks the space. Formats come from the export's record and the files' extensions, never
from their bytes; qcow2 headers are read in Python (:mod:`hvstack.storage.qcow2_header`)
or with ``qemu-img info -f qcow2``. It also lists notes (what the import will adjust: a
dynamic MAC replaced, an adapter whose switch this host lacks disconnected, a DVD that
is not here dropped).

:meth:`ImportOperations.import_vm` checks again inside its job, then copies the files
(``copy``: into ``--dest ROOT/<name>`` or the new VM's folder; headers keep their
relative parent names) or uses them where they are (``register``), and stores the VM and
its checkpoint tree in one transaction. A failure deletes what it made.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hvstack.compute.files import VmFiles
from hvstack.compute.model import (
    SWITCH_MODE,
    Generation,
    NetworkAdapter,
    VmConfig,
    VmRecord,
    VmState,
    is_id,
    validate_name,
)
from hvstack.errors import HvError, InvalidInput
from hvstack.files import link_or_copy
from hvstack.host import export_files
from hvstack.host.checkpoint_ops import CheckpointOperations
from hvstack.host.export_format import (
    DISKS,
    MANIFEST,
    ExportedFile,
    Manifest,
    named_format,
    relative_name,
    relocated,
    with_disk_paths,
)
from hvstack.host.jobs import Job, Progress
from hvstack.host.provisioning import new_mac
from hvstack.host.records import CheckpointRecords
from hvstack.host.service import HostService
from hvstack.storage import chain, overlay
from hvstack.storage.paths import check_disk_file, confine
from hvstack.storage.qcow2_header import read_links

MODES = ("copy", "register")


@dataclass(frozen=True)
class ImportRequest:
    path: str
    mode: str = "copy"
    new_id: bool = False
    name: str | None = None
    dest: str | None = None


@dataclass
class ImportReport:
    """The check's findings; ``problems`` empty: the import can go ahead."""

    folder: Path
    manifest: Manifest
    vm_id: str
    name: str
    config: VmConfig  # as it will be imported (paths still relative)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    target: Path | None = None  # copy: where the disk files go

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.folder), "ok": not self.problems, "id": self.vm_id,
                "name": self.name, "generation": int(self.config.generation),
                "state": self.manifest.state, "checkpoints": len(self.manifest.tree),
                "files": len(self.manifest.files), "problems": self.problems,
                "notes": self.notes, "destination": str(self.target) if self.target else None,
                "source": self.manifest.source}

    def refuse(self) -> None:
        if self.problems:
            count = len(self.problems)
            raise InvalidInput(
                f"cannot import '{self.folder}': {count} problem{'s' * (count > 1)}: "
                + "; ".join(self.problems), problems=self.problems)


class ImportOperations:
    def __init__(self, service: HostService, checkpoints: CheckpointOperations,
                 switch_name: Callable[[str], str | None] | None = None) -> None:
        self.service = service
        self.checkpoints = checkpoints
        # The name of the switch with an id, None if this host has none such.
        self._switch_name: Callable[[str], str | None] = switch_name or (lambda _: None)

    # -- the check ----------------------------------------------------------------------

    def _folder(self, path: str) -> Path:
        folder = confine(path, self.service.config.storage_roots, must_exist=True,
                         what="export folder")
        if not (folder / MANIFEST).exists():
            found = [p for p in sorted(folder.iterdir()) if (p / MANIFEST).is_file()] \
                if folder.is_dir() else []
            if len(found) == 1:  # a link among them must not lead out of the roots
                return confine(str(found[0]), self.service.config.storage_roots,
                               must_exist=True, what="export folder")
        return folder

    async def check(self, request: ImportRequest) -> ImportReport:
        if request.mode not in MODES:
            raise InvalidInput(f"import mode '{request.mode}' is not one of copy, register")
        if request.dest is not None and request.mode != "copy":
            raise InvalidInput("--dest is for --copy; --register leaves the files in place")
        folder = self._folder(request.path)
        manifest = await asyncio.to_thread(Manifest.read, folder)
        name = validate_name(request.name) if request.name else manifest.config.name
        vm_id = str(uuid.uuid4()) if request.new_id else manifest.vm_id.lower()
        report = ImportReport(folder, manifest, vm_id, name,
                              replace(manifest.config, name=name))
        self._check_files(report)
        self._check_references(report)
        self._check_identity(report, request)
        self._check_adapters(report)
        self._check_host(report)
        if request.mode == "copy":
            self._check_destination(report, request)
        else:
            await self._check_register(report)
        return report

    def _inside(self, report: ImportReport, name: str, what: str) -> Path | None:
        """The export's file ``name``, checked: inside the folder, a regular file."""
        try:
            path = report.folder / relative_name(name)
        except InvalidInput as exc:
            report.problems.append(exc.message)
            return None
        if not os.path.lexists(path):
            report.problems.append(f"{what} '{name}' is missing from the export")
            return None
        if path.is_symlink() or not path.is_file():
            report.problems.append(f"{what} '{name}' is not a regular file (a link or a "
                                   "folder): refused")
            return None
        if not path.resolve().is_relative_to(report.folder.resolve()):
            report.problems.append(f"{what} '{name}' leads outside the export folder")
            return None
        return path

    def _check_files(self, report: ImportReport) -> None:
        records = report.manifest.by_path()
        config = self.service.config
        for record in report.manifest.files:
            path = self._inside(report, record.path, "disk file")
            if path is None:
                continue
            if str(relative_name(record.path).parent) != DISKS:
                report.problems.append(f"disk file '{record.path}' is not in the export's "
                                       f"'{DISKS}' folder")
                continue
            try:
                check_disk_file(path.resolve(), config.data_dir, config.run_dir)
            except HvError as exc:
                report.problems.append(exc.message)
                continue
            if not named_format(record.path, record.format):
                report.problems.append(f"disk file '{record.path}' is recorded as "
                                       f"{record.format} but its name says otherwise")
                continue
            self._check_header(report, path, record, records)
        self._check_depth(report, records)

    def _check_header(self, report: ImportReport, path: Path, record: ExportedFile,
                      records: dict[str, ExportedFile]) -> None:
        """The file's own links against the export's record (a raw file's bytes are its
        guest's: never read as a header)."""
        if record.format == "raw":
            if record.parent is not None:
                report.problems.append(f"'{record.path}' is recorded as a raw disk with a "
                                       "parent, which raw disks cannot have")
            return
        if record.format != "qcow2":
            if record.parent is not None:
                report.problems.append(f"'{record.path}' is recorded with a parent; only "
                                       "qcow2 disks have one here")
            return  # vhdx/vpc: no parent of theirs is ever opened (the record has none)
        links = read_links(path)
        if links is None:
            report.problems.append(f"'{record.path}' is not a qcow2 file hvstack reads "
                                   "(its header is damaged or of an unknown kind)")
            return
        if links.data_file is not None or links.data_file_bit:
            report.problems.append(f"'{record.path}' keeps its data in an external file; "
                                   "refused")
            return
        if record.parent is None:
            if links.backing_file is not None:
                report.problems.append(
                    f"'{record.path}' names the parent '{links.backing_file}', which the "
                    "export does not record: a chain member outside the export")
            return
        parent = records.get(record.parent)
        if parent is None:
            report.problems.append(f"the parent '{record.parent}' of '{record.path}' is "
                                   "not in the export")
            return
        if links.backing_file is None:
            report.problems.append(f"'{record.path}' has no parent in its header, but the "
                                   f"export records '{record.parent}'")
            return
        named = Path(links.backing_file)
        full = named if named.is_absolute() else path.parent / named
        try:
            expected = (report.folder / relative_name(record.parent)).resolve()
        except InvalidInput as exc:
            report.problems.append(exc.message)
            return
        if Path(os.path.abspath(full)).resolve() != expected:
            report.problems.append(
                f"'{record.path}' names the parent '{links.backing_file}', not the "
                f"export's '{record.parent}': a chain member outside the export")
        elif links.backing_format != parent.format or record.parent_format != parent.format:
            report.problems.append(
                f"'{record.path}' gives its parent's format as {links.backing_format}, but "
                f"the export records {parent.format}")

    @staticmethod
    def _check_depth(report: ImportReport, records: dict[str, ExportedFile]) -> None:
        for record in records.values():
            seen = {record.path}
            node = record
            while node.parent is not None and node.parent in records:
                if node.parent in seen or len(seen) > chain.MAX_DEPTH:
                    report.problems.append(f"the chain of '{record.path}' loops or is too "
                                           "deep")
                    break
                seen.add(node.parent)
                node = records[node.parent]

    def _check_references(self, report: ImportReport) -> None:
        manifest = report.manifest
        records = manifest.by_path()

        def disks_of(config: VmConfig, what: str) -> None:
            for disk in config.disks:
                record = records.get(disk.path)
                if record is None:
                    report.problems.append(f"disk '{disk.path}' of {what} is not in the "
                                           "export")
                elif record.format != disk.format:
                    report.problems.append(f"disk '{disk.path}' of {what} is recorded as "
                                           f"{record.format} and as {disk.format}")

        disks_of(manifest.config, "the VM")
        for checkpoint in manifest.tree.checkpoints:
            what = f"checkpoint '{checkpoint.name}'"
            for path in checkpoint.disks.values():
                if path not in records:
                    report.problems.append(f"disk '{path}' of {what} is not in the export")
            if checkpoint.config:
                try:
                    disks_of(VmConfig.from_json(checkpoint.config), what)
                except (ValueError, KeyError, TypeError) as exc:
                    report.problems.append(f"the settings of {what} cannot be read: {exc}")
            for state in (checkpoint.memory_state, checkpoint.layout):
                if state is not None:
                    self._inside(report, state, f"the memory state of {what}")
        if manifest.state == "Saved":
            if manifest.saved_state is None:
                report.problems.append("the export is of a Saved VM but holds no saved "
                                       "state")
            else:
                self._inside(report, manifest.saved_state, "the saved state")
        for name in (manifest.saved_layout, manifest.efi_vars):
            if name is not None:
                self._inside(report, name, "the VM's file")

    def _check_identity(self, report: ImportReport, request: ImportRequest) -> None:
        registry = self.service.registry
        if not is_id(report.vm_id):
            report.problems.append(f"the export's VM id '{report.vm_id}' is not an id; "
                                   "import it with --new-id")
        elif not request.new_id:
            try:
                other = registry.get(report.vm_id)
            except HvError:
                other = None
            if other is not None:
                report.problems.append(
                    f"VM '{other.record.name}' already has the id {report.vm_id}; import "
                    "with --new-id")
            elif registry.files(report.vm_id).folder.exists():
                report.problems.append(f"the folder of VM id {report.vm_id} already "
                                       "exists; import with --new-id")
        try:
            validate_name(report.name)
            registry.check_free(report.name)
        except HvError as exc:
            hint = "" if request.name else "; give another with --name"
            report.problems.append(exc.message + hint)

    def _check_adapters(self, report: ImportReport) -> None:
        used = {nic.mac: vm.record.name for vm in self.service.list_vms()
                for nic in vm.record.config.network_adapters}
        adapters: list[NetworkAdapter] = []
        for nic in report.config.network_adapters:
            if nic.mac in used:
                if nic.dynamic_mac:
                    mac = new_mac()
                    report.notes.append(f"the adapter with dynamic MAC {nic.mac} gets the "
                                        f"MAC {mac} (VM '{used[nic.mac]}' has {nic.mac})")
                    nic = replace(nic, mac=mac)
                else:
                    report.problems.append(
                        f"the static MAC {nic.mac} is used by VM '{used[nic.mac]}'")
            if nic.mode == SWITCH_MODE and nic.switch and self._switch_name(nic.switch) is None:
                report.notes.append(f"adapter {nic.mac}: this host has no switch with id "
                                    f"{nic.switch}; it is imported disconnected")
                nic = replace(nic, switch="")
            adapters.append(nic)
        report.config = replace(report.config, network_adapters=tuple(adapters))

    def _check_host(self, report: ImportReport) -> None:
        config, host = report.config, self.service.config
        if config.generation is Generation.GEN2:
            if not (host.ovmf_code.is_file() and host.ovmf_vars.is_file()):
                report.problems.append("the VM is Generation 2 and this host has no UEFI "
                                       f"firmware ({host.ovmf_code}): apt-get install ovmf")
            elif report.manifest.efi_vars is None:
                report.notes.append("the export holds no UEFI variables: the VM gets "
                                    "fresh ones")
        if config.dvd:
            try:
                confine(config.dvd, host.storage_roots, must_exist=True, what="ISO")
            except HvError:
                report.notes.append(f"the DVD '{config.dvd}' is not on this host: the "
                                    "drive is imported empty")
                report.config = replace(report.config, dvd=None)
        try:
            self.service.provisioning.validate(with_disk_paths(report.config, _absolute))
            if config.accelerator:
                self.service.host.check_accelerator(config.accelerator)
        except HvError as exc:
            report.problems.append(f"this host cannot run the VM: {exc.message}")

    def _check_destination(self, report: ImportReport, request: ImportRequest) -> None:
        if request.dest is None:
            report.target = self.service.registry.files(report.vm_id).folder
        else:
            try:
                root = confine(request.dest, self.service.config.storage_roots,
                               must_exist=True, what="destination")
            except HvError as exc:
                report.problems.append(exc.message)
                return
            report.target = root / report.name
            if os.path.lexists(report.target):
                report.problems.append(f"the destination '{report.target}' already exists")
                return
        paths = [report.folder / f.path for f in report.manifest.files]
        needed = export_files.disk_bytes(paths)
        probe = report.target
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if needed > free:
            report.problems.append(f"the copy needs {needed} bytes and {probe} has "
                                   f"{free} free")

    async def _check_register(self, report: ImportReport) -> None:
        """The files become this VM's where they are: no other VM may have any of them,
        and the current disks must be free to write (no child outside the export)."""
        use = self.service.disk_use
        users = {a.path: a.vm for a in use.attachments()}
        current = {d.path for d in report.manifest.config.disks}
        for record in report.manifest.files:
            path = (report.folder / record.path).resolve()
            try:
                use.confine(str(path), must_exist=True)
                if path in users:
                    report.problems.append(f"'{path}' is a disk of VM '{users[path]}'")
                elif record.path in current:
                    await use.check(path, "attach")
            except HvError as exc:
                report.problems.append(exc.message)

    # -- the import -----------------------------------------------------------------------

    async def import_vm(self, request: ImportRequest) -> Job:
        (await self.check(request)).refuse()

        async def body(progress: Progress) -> dict[str, Any]:
            report = await self.check(request)  # again: the host may have changed
            report.refuse()
            return await self._import(report, request.mode, progress)

        return self.service.jobs.start("import", request.name or request.path, body)

    async def _import(self, report: ImportReport, mode: str,
                      progress: Progress) -> dict[str, Any]:
        manifest, vm_id = report.manifest, report.vm_id
        files = self.service.registry.files(vm_id)
        made: list[Path] = []
        try:
            files.folder.mkdir(parents=True)
            made.append(files.folder)
            if mode == "copy":
                assert report.target is not None
                if report.target != files.folder:
                    report.target.mkdir(parents=True)
                    made.append(report.target)
                await self._copy_disks(report, report.target, progress)
            files.checkpoint_dir.mkdir()
            states = await self._place_states(report, files.checkpoint_dir, mode)
            await self._machine_files(report, files)

            def disk(name: str) -> str:
                if mode == "copy":
                    assert report.target is not None
                    return str(report.target.resolve() / relative_name(name).name)
                return str((report.folder / relative_name(name)).resolve())

            config = with_disk_paths(report.config, disk)
            if mode == "copy":
                config = replace(config, disks=tuple(replace(d, owned=True)
                                                     for d in config.disks))
            tree = relocated(manifest.tree, disk, states.__getitem__)
            if mode == "copy":
                # Every copy is the VM's own: recorded as made, so deleting the VM keeps
                # or deletes the parents of its disks with them (a base image's copy too).
                tree = replace(tree, made=frozenset(disk(f.path) for f in manifest.files))
            saved = manifest.state == "Saved"
            record = VmRecord(vm_id, config, VmState.SAVED if saved else VmState.OFF,
                              "imported", created_at=time.time())
            self.service.registry.check_free(config.name)
            record = await self.service.records.create(
                record, also=[CheckpointRecords.op(vm_id, tree)])
        except BaseException:
            for path in reversed(made):
                await asyncio.to_thread(shutil.rmtree, path, True)
            raise
        self.checkpoints.forget(vm_id)  # a tree cached under this id is not this VM's
        self.service.registry.register(record)
        (files.folder / "vm.json").write_text(config.to_json())
        self.service.events.publish("vm.created", vm=config.name, id=vm_id)
        return {"vm": config.name, "id": vm_id, "state": record.state.value, "mode": mode,
                "checkpoints": len(tree), "disks": [d.path for d in config.disks],
                "notes": report.notes}

    async def _copy_disks(self, report: ImportReport, target: Path, progress: Progress) -> None:
        """Copy every disk file into ``target`` itself (not a subfolder: a VM's folder
        keeps its disks at its top, where deleting the VM looks for them), and name each
        copied parent in its child's header by its plain name: a header that named its
        parent another way in the export still leads to the copy."""
        paths = [report.folder / f.path for f in report.manifest.files]
        total = export_files.disk_bytes(paths)
        done = 0

        def count(n: int) -> None:
            nonlocal done
            done += n
            progress(90.0 * done / total if total else 90.0, "copying disk files")

        for record in report.manifest.files:
            name = relative_name(record.path)
            dst = target / name.name
            await export_files.copy_file(report.folder / name, dst, count)
            if record.parent is not None and record.parent_format is not None:
                await overlay.repoint(dst, relative_name(record.parent).name,
                                           record.parent_format)

    async def _place_states(self, report: ImportReport, folder: Path,
                            mode: str) -> dict[str, str]:
        """Each checkpoint state file's path after the import, by its name in the export."""
        states: dict[str, str] = {}
        for checkpoint in report.manifest.tree.checkpoints:
            for name in (checkpoint.memory_state, checkpoint.layout, checkpoint.efi_vars):
                if name is None or name in states:
                    continue
                source = report.folder / relative_name(name)
                if mode == "register":
                    states[name] = str(source.resolve())
                elif source.is_file():
                    dst = folder / source.name
                    await asyncio.to_thread(link_or_copy, source, dst)
                    states[name] = str(dst)
                else:
                    states[name] = str(folder / source.name)
        return states

    async def _machine_files(self, report: ImportReport, files: VmFiles) -> None:
        manifest, host = report.manifest, self.service.config
        if manifest.efi_vars is not None:
            await asyncio.to_thread(shutil.copyfile,
                                    report.folder / relative_name(manifest.efi_vars),
                                    files.efi_vars)
        elif report.config.generation is Generation.GEN2:
            await asyncio.to_thread(shutil.copyfile, host.ovmf_vars, files.efi_vars)
        if manifest.state == "Saved" and manifest.saved_state is not None:
            await asyncio.to_thread(link_or_copy,
                                    report.folder / relative_name(manifest.saved_state),
                                    files.saved_state)
            if manifest.saved_layout is not None:
                await asyncio.to_thread(shutil.copyfile,
                                        report.folder / relative_name(manifest.saved_layout),
                                        files.saved_layout)


def _absolute(name: str) -> str:
    """A placeholder absolute path for validating settings whose paths are relative."""
    return "/" + name

