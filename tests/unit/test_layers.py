"""The layers hold: hypervisor/ imports nothing from the layers above it, compute/,
storage/ and network/ nothing from host/, api/ or cli/.

Read from the modules' syntax trees (every ``import``, also inside functions and
``TYPE_CHECKING`` blocks), so a lazy import cannot hide an upward call.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hvstack

PACKAGE = Path(hvstack.__file__).resolve().parent
ABOVE_HYPERVISOR = ("compute", "storage", "network", "host", "api", "cli", "images", "client",
                    "server", "web")


def imported_modules(source: str, package: list[str]) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, relative imports
    resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def upward_imports(layer: str, above: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        package = ["hvstack", *path.relative_to(PACKAGE).parent.parts]
        for name in sorted(imported_modules(path.read_text(), package)):
            parts = name.split(".")
            if parts[0] == "hvstack" and len(parts) > 1 and parts[1] in above:
                found.append(f"{path.relative_to(PACKAGE)} imports {name}")
    return found


def test_hypervisor_imports_nothing_from_the_layers_above() -> None:
    assert upward_imports("hypervisor", ABOVE_HYPERVISOR) == []


def test_domain_packages_import_nothing_from_the_host_and_clients() -> None:
    assert upward_imports("compute", ("host", "api", "cli", "client", "server")) == []
    assert upward_imports("storage", ("host", "api", "cli", "client", "server")) == []
    assert upward_imports("checkpoints", ("host", "api", "cli", "client", "server")) == []
    # Migration decisions are pure: they import no other domain either.
    assert upward_imports("migration", ("host", "api", "cli", "client", "server", "compute",
                                        "storage", "network", "hypervisor")) == []
    # Dynamic memory policy is pure: it imports no other domain either.
    assert upward_imports("memory", ("host", "api", "cli", "client", "server", "compute",
                                      "storage", "network", "hypervisor")) == []
    # Metering's accounting is pure as well: counters in, totals out.
    assert upward_imports("metering", ("host", "api", "cli", "client", "server", "compute",
                                        "storage", "network", "hypervisor", "memory")) == []
    # Processor resource controls: pure mapping and the cgroup files, no other domain.
    assert upward_imports("resources", ("host", "api", "cli", "client", "server", "compute",
                                         "storage", "network", "hypervisor")) == []
    # The network package is a domain package too, below compute (whose adapters carry
    # its port settings): it imports neither the host nor compute.
    assert upward_imports("network", ("host", "api", "cli", "client", "server",
                                      "compute", "storage", "integration")) == []


def test_the_check_sees_every_kind_of_import() -> None:
    source = ("from ..compute import model\nimport hvstack.host.store\n"
              "if TYPE_CHECKING:\n    from hvstack.storage.chain import read_chain\n"
              "def f():\n    from hvstack import api\n")
    names = imported_modules(source, ["hvstack", "hypervisor", "qemu"])
    assert {"hvstack.hypervisor.compute", "hvstack.host.store",
            "hvstack.storage.chain", "hvstack.api"} <= names
    names = imported_modules("from ...compute import model\n", ["hvstack", "hypervisor",
                                                                  "qemu"])
    assert "hvstack.compute.model" in names
