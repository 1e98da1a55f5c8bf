"""The compatibility check before a move: can this VM run on that host? Pure, no I/O.

:func:`check` takes what the VM needs (:class:`MoveNeeds`, read on the source) and what
the destination has (:class:`DestinationFacts`, read from the peer) and returns every
:class:`Problem` at once, in a fixed order (:data:`CODES`), each with a stable ``code``
for programs, the names that are missing, and a message that says what to do. An empty
tuple means the move can start. :func:`format_problems` renders them one a line.

The rules (a table with what to do in docs/live-migration.md, "Compatibility check"):

* the destination has migration enabled and fewer moves running than its limit;
* it has no VM with the same name or the same id (an id is never a name: both are checked);
* the same QEMU major version, the source's accelerator, the VM's machine type (the
  versioned one, e.g. ``pc-q35-7.2``: an alias may mean another machine there);
* the CPU: a passthrough model (``host``/``max``) needs every flag the VM sees on the
  source among the flags the destination's passthrough model exposes; a named model (the
  processor compatibility setting) needs that model there and, under KVM, the flags it
  needs on the destination's processor (TCG emulates a named model's flags);
* at least as many logical processors as the VM has, and its startup memory free;
* every virtual switch its adapters use, by name;
* storage: a copy (shared-nothing) needs its bytes plus :data:`STORAGE_MARGIN` free on
  the destination's root; shared storage needs the VM's root to be one of the
  destination's storage roots (compared as normalized POSIX paths).
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass

from hvstack.errors import InvalidInput
from hvstack.units import format_size

#: Problem codes in the order :func:`check` reports them: the host's own state first
#: (nothing else matters if it refuses moves), then identity, platform, CPU, resources.
CODES = ("migration-disabled", "too-many-migrations", "name-clash", "id-clash",
         "qemu-version", "accelerator", "machine-type", "cpu-model", "cpu-features",
         "processors", "memory", "switch", "shared-root", "storage-room")
#: CPU models that pass the host's processor through (KVM) or QEMU's whole emulated set
#: (TCG): what the guest sees depends on the host, so the destination must match it.
PASSTHROUGH_MODELS = frozenset({"host", "max"})
#: Extra room asked for a disk copy, as a fraction of the bytes to copy: a copy that
#: ends a few blocks short is a failed move, and the destination's other VMs keep growing.
STORAGE_MARGIN = (1, 10)


@dataclass(frozen=True)
class MoveNeeds:
    """What the VM needs on any host it moves to (read on the source)."""

    name: str
    vm_id: str
    startup_memory: int          # bytes
    processors: int
    cpu_model: str               # "host"/"max" or a named model; QEMU options after "," ignored
    cpu_features: frozenset[str]  # flags the VM's CPU model requires / exposes
    machine_type: str            # versioned: "pc-i440fx-7.2", "pc-q35-7.2"
    generation: int
    switches: frozenset[str]     # names of the switches its adapters are connected to
    disk_bytes: int              # bytes to copy; 0 with shared storage
    shared_storage: bool
    shared_root: str | None      # the storage root the disks are on, with shared storage
    qemu_major: int              # of the source's QEMU
    accelerator: str             # "kvm" or "tcg"

    def __post_init__(self) -> None:
        if self.startup_memory < 0 or self.disk_bytes < 0 or self.processors < 1:
            raise InvalidInput("memory and disk bytes must not be negative and a VM has "
                               "at least one processor", vm=self.name)
        if self.shared_storage and not self.shared_root:
            raise InvalidInput("a move with shared storage needs the shared root",
                               vm=self.name)

    @property
    def cpu_model_name(self) -> str:
        """The model without QEMU's options: "host,hv-relaxed" -> "host"."""
        return self.cpu_model.split(",", 1)[0]


@dataclass(frozen=True)
class DestinationFacts:
    """What the destination host has (read from it just before the move)."""

    host: str
    qemu_version: tuple[int, int, int]
    machine_types: frozenset[str]
    cpu_models: frozenset[str]    # named models its QEMU can run on its processor
    cpu_flags: frozenset[str]     # flags its passthrough model exposes (host or max)
    accelerators: frozenset[str]  # "kvm" and/or "tcg"
    processors: int               # logical processors
    switches: frozenset[str]
    free_bytes: int               # free on the root the disks would be copied to
    memory_available: int         # bytes it can give a VM that starts now
    storage_roots: tuple[str, ...]
    vm_names: frozenset[str]
    vm_ids: frozenset[str]
    migration_enabled: bool
    max_simultaneous: int
    running_migrations: int


@dataclass(frozen=True)
class Problem:
    """One reason the move cannot work: ``code`` (one of :data:`CODES`) for programs,
    ``missing`` the names at fault (sorted), ``message`` for people."""

    code: str
    message: str
    missing: tuple[str, ...] = ()


def check(needs: MoveNeeds, dest: DestinationFacts) -> tuple[Problem, ...]:
    """Every reason ``needs`` cannot move to ``dest``, in :data:`CODES` order; () if none."""
    problems = [*_host(needs, dest), *_identity(needs, dest), *_platform(needs, dest),
                *_cpu(needs, dest), *_resources(needs, dest), *_storage(needs, dest)]
    order = {code: index for index, code in enumerate(CODES)}
    return tuple(sorted(problems, key=lambda problem: order[problem.code]))


def format_problems(problems: tuple[Problem, ...]) -> str:
    """One line per problem, "code: message"; "" for none."""
    return "\n".join(f"{problem.code}: {problem.message}" for problem in problems)


def _names(names: frozenset[str] | set[str]) -> tuple[str, ...]:
    return tuple(sorted(names))


def _host(needs: MoveNeeds, dest: DestinationFacts) -> list[Problem]:
    found = []
    if not dest.migration_enabled:
        found.append(Problem("migration-disabled", f"{dest.host} does not accept moves; "
                             f"turn it on there (hv host migration enable)"))
    if dest.running_migrations >= dest.max_simultaneous:
        found.append(Problem(
            "too-many-migrations",
            f"{dest.host} already runs {dest.running_migrations} of at most "
            f"{dest.max_simultaneous} simultaneous moves; wait for one to end or raise the "
            "limit there (hv host migration enable --max-simultaneous N)"))
    return found


def _identity(needs: MoveNeeds, dest: DestinationFacts) -> list[Problem]:
    found = []
    if needs.name in dest.vm_names:
        found.append(Problem("name-clash", f"{dest.host} already has a VM named "
                             f"{needs.name!r}; rename or remove one of them",
                             (needs.name,)))
    if needs.vm_id in dest.vm_ids:
        found.append(Problem("id-clash", f"{dest.host} already has a VM with id "
                             f"{needs.vm_id} (a copy of this VM?); remove it there first",
                             (needs.vm_id,)))
    return found


def _platform(needs: MoveNeeds, dest: DestinationFacts) -> list[Problem]:
    found = []
    if dest.qemu_version[0] != needs.qemu_major:
        version = ".".join(map(str, dest.qemu_version))
        found.append(Problem(
            "qemu-version", f"{dest.host} runs QEMU {version}, the source QEMU "
            f"{needs.qemu_major}.x; a move needs the same major version on both hosts"))
    if needs.accelerator not in dest.accelerators:
        found.append(Problem(
            "accelerator", f"the VM runs under {needs.accelerator} and {dest.host} has "
            f"only {', '.join(_names(dest.accelerators)) or 'none'}; QEMU cannot move a "
            "running VM between accelerators", (needs.accelerator,)))
    if needs.machine_type not in dest.machine_types:
        found.append(Problem(
            "machine-type", f"{dest.host}'s QEMU lacks machine type {needs.machine_type} "
            f"(Generation {needs.generation}); move to a host with the same or a newer "
            "QEMU of the same major version", (needs.machine_type,)))
    return found


def _cpu(needs: MoveNeeds, dest: DestinationFacts) -> list[Problem]:
    model = needs.cpu_model_name
    passthrough = model in PASSTHROUGH_MODELS
    if not passthrough and model not in dest.cpu_models:
        return [Problem("cpu-model", f"{dest.host} cannot run processor model {model}; "
                        "move to a host that can", (model,))]
    if not passthrough and needs.accelerator != "kvm":
        return []  # TCG emulates every flag of a named model
    lacking = _names(needs.cpu_features - dest.cpu_flags)
    if not lacking:
        return []
    flags = ", ".join(lacking)
    if passthrough:
        hint = (f"turn on processor compatibility (hv vm set {shlex.quote(needs.name)} "
                "--processor-compatibility on) or move to a host that has them")
    else:
        hint = f"model {model} needs them; move to a host that has them"
    return [Problem("cpu-features", f"the destination's processor lacks {flags}; {hint}",
                    lacking)]


def _resources(needs: MoveNeeds, dest: DestinationFacts) -> list[Problem]:
    found = []
    if needs.processors > dest.processors:
        found.append(Problem(
            "processors", f"the VM has {needs.processors} processors and {dest.host} only "
            f"{dest.processors}; give the VM fewer (hv vm set "
            f"{shlex.quote(needs.name)} --cpus N) or pick a larger host"))
    if needs.startup_memory > dest.memory_available:
        found.append(Problem(
            "memory", f"the VM needs {format_size(needs.startup_memory)} to start and "
            f"{dest.host} has {format_size(dest.memory_available)} free for VMs; free "
            "memory there or lower the VM's startup memory"))
    lacking = _names(needs.switches - dest.switches)
    if lacking:
        found.append(Problem(
            "switch", f"{dest.host} has no virtual switch named {', '.join(lacking)}; "
            "create it there with the same name or disconnect the adapter", lacking))
    return found


def _storage(needs: MoveNeeds, dest: DestinationFacts) -> list[Problem]:
    if needs.shared_storage:
        root = posixpath.normpath(needs.shared_root or "")
        if root not in {posixpath.normpath(path) for path in dest.storage_roots}:
            return [Problem(
                "shared-root", f"{dest.host} does not have the shared root {root} among "
                "its storage roots; add it there or move with --storage copy", (root,))]
        return []
    numerator, denominator = STORAGE_MARGIN
    needed = needs.disk_bytes + -(-needs.disk_bytes * numerator // denominator)
    if needed > dest.free_bytes:
        return [Problem(
            "storage-room", f"copying the disks needs {format_size(needed)} "
            f"({format_size(needs.disk_bytes)} plus {100 * numerator // denominator} %) "
            f"and {dest.host} has {format_size(dest.free_bytes)} free; free space there or "
            "pick another --dest-root")]
    return []
