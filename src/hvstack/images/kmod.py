"""Kernel module selection from an extracted kernel tree (pure: text in, answers out).

Contract:

* :func:`module_name` maps a module path (``kernel/fs/ext4/ext4.ko``, ``.ko.xz`` ...)
  to the name the kernel uses (``ext4``; dashes become underscores).
* :func:`parse_modules_dep` reads ``modules.dep`` (``path: dep dep ...``) into a
  mapping of path to dependency paths; :func:`parse_modules_builtin` reads
  ``modules.builtin`` into the set of built-in module names.
* :func:`resolve_modules` returns the module paths to load, in load order (every
  dependency before its users, each once), for the wanted names. Built-in names are
  skipped; a name that is neither a module nor built in raises
  :class:`~hvstack.errors.HypervisorError`, unless it is listed as optional.
* :func:`parse_kernel_config` and :func:`check_kernel_config` read a kernel
  ``config-*`` file and list the options the tiny guest needs that the kernel lacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hvstack.errors import HypervisorError

_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")

REQUIRED_BUILTIN: tuple[str, ...] = (
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_RD_GZIP",
    "CONFIG_DEVTMPFS",
    "CONFIG_SERIAL_8250",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_UNIX",
    "CONFIG_PACKET",
    "CONFIG_EFI_STUB",
    "CONFIG_MODULES",
)
"""Config options that must be ``=y``: the guest cannot load them as modules."""


def module_name(path: str) -> str:
    """Return the kernel's name for the module at ``path``.

    >>> module_name("kernel/arch/x86/crypto/crc32c-intel.ko.xz")
    'crc32c_intel'
    """
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, ...]]:
    """Parse ``modules.dep`` into ``{module path: (dependency paths...)}``."""
    deps: dict[str, tuple[str, ...]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, sep, tail = line.partition(":")
        if not sep:
            raise HypervisorError(f"malformed modules.dep line: {raw!r}")
        deps[head.strip()] = tuple(tail.split())
    return deps


def parse_modules_builtin(text: str) -> frozenset[str]:
    """Parse ``modules.builtin`` (one path a line) into built-in module names."""
    return frozenset(module_name(line.strip()) for line in text.splitlines() if line.strip())


def resolve_modules(
    wanted: Iterable[str],
    deps: Mapping[str, tuple[str, ...]],
    builtin: frozenset[str] = frozenset(),
    optional: Iterable[str] = (),
) -> tuple[str, ...]:
    """Return the paths of ``wanted`` modules and their dependencies, in load order."""
    by_name = {module_name(path): path for path in deps}
    maybe = {name.replace("-", "_") for name in optional}
    order: list[str] = []
    done: set[str] = set()
    active: set[str] = set()

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if path in done:
            return
        if path in active:
            cycle = " -> ".join((*chain, path))
            raise HypervisorError(f"modules.dep has a dependency cycle: {cycle}")
        if path not in deps:
            raise HypervisorError(f"modules.dep names {path}, which has no entry of its own")
        active.add(path)
        for dep in deps[path]:
            visit(dep, (*chain, path))
        active.discard(path)
        done.add(path)
        order.append(path)

    missing: list[str] = []
    for raw in wanted:
        name = raw.replace("-", "_")
        if name in builtin:
            continue
        path = by_name.get(name)
        if path is None:
            if name not in maybe:
                missing.append(name)
            continue
        visit(path, ())
    if missing:
        raise HypervisorError(
            f"the kernel has no module and no built-in driver named {', '.join(missing)}",
            missing=missing,
        )
    return tuple(order)


def parse_kernel_config(text: str) -> dict[str, str]:
    """Parse a kernel ``.config`` into ``{"CONFIG_X": "y" | "m" | value}``."""
    config: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("CONFIG_"):
            continue
        key, sep, value = line.partition("=")
        if sep:
            config[key] = value.strip('"')
    return config


def check_kernel_config(
    config: Mapping[str, str], required: Iterable[str] = REQUIRED_BUILTIN
) -> list[str]:
    """Return the ``required`` options that are not built in (``=y``), in order."""
    return [key for key in required if config.get(key) != "y"]


def filtered_modules_dep(order: Iterable[str], deps: Mapping[str, tuple[str, ...]]) -> str:
    """Return a ``modules.dep`` text for just the modules in ``order`` (uncompressed names)."""
    lines = []
    for path in order:
        tail = " ".join(plain_module_path(dep) for dep in deps.get(path, ()))
        lines.append(f"{plain_module_path(path)}:{' ' + tail if tail else ''}")
    return "\n".join(lines) + "\n"


def plain_module_path(path: str) -> str:
    """Return ``path`` with a compressed module suffix turned into ``.ko``."""
    for suffix in _SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)] + ".ko"
    return path
