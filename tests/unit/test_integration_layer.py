"""The integration services' package sits between the VM model and the host service:
it uses compute/ and hypervisor/, and only host/ and above use it."""

from __future__ import annotations

import ast
from pathlib import Path

import hvstack

SRC = Path(hvstack.__file__).parent
MAY_USE = {"errors", "units", "progress", "files", "runner", "hypervisor", "compute",
           "integration"}
BELOW = ("hypervisor", "compute", "storage", "images")


def _imported(package: str) -> set[tuple[str, str]]:
    """(module, first package under hvstack) of every import in ``package``."""
    found = set()
    for path in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "hvstack" and len(parts) > 1:
                    found.add((str(path.relative_to(SRC)), parts[1]))
    return found


def test_integration_imports_nothing_above_it() -> None:
    assert {(m, p) for m, p in _imported("integration") if p not in MAY_USE} == set()


def test_nothing_below_imports_integration() -> None:
    for package in BELOW:
        assert {(m, p) for m, p in _imported(package) if p == "integration"} == set()
