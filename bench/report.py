"""Benchmark results and their Markdown rendering (docs/benchmarks.md).

A benchmark returns one :class:`Section`: a title, what it measures, tables (one per
measurement) whose rows carry the measured number, the baseline measured in the same
run, the ratio and the goal, and free-form notes. :func:`render` turns the sections
of one run, with the machine they ran on, into the whole file; :func:`kept_sections`
reads the sections of benchmarks that did not run this time from the file an earlier
run wrote, so running one benchmark updates its section and keeps the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.support import Machine


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Section:
    name: str  # the module, e.g. "vm_start"
    title: str
    description: str
    tables: tuple[Table, ...]
    notes: tuple[str, ...] = ()
    goals_met: tuple[bool, ...] = field(default=())  # one per goal that applies
    seconds: float = 0.0  # how long the benchmark took (set by the runner)
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return lines


def render_section(section: Section, machine: Machine) -> str:
    lines = [f"## {section.title}", "", section.description]
    for table in section.tables:
        lines.append("")
        if table.caption:
            lines += [table.caption, ""]
        lines += _table(table.headers, table.rows)
    lines += ["", f"Machine: {machine.short()}; the benchmark took {section.seconds:.0f} s; "
                  f"1-minute load average {section.load[0]:.2f} before, {section.load[1]:.2f} "
                  "after."]
    if section.notes:
        lines.append("")
        lines += [f"- {note}" for note in section.notes]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Kept:
    """A section of an earlier run, as text (its own machine line gives its date)."""

    name: str
    goals: str  # its cell in the summary table
    text: str


def kept_sections(text: str, names: Sequence[str]) -> list[Kept]:
    """The sections of benchmarks ``names`` in a file :func:`render` wrote."""
    goals: dict[str, str] = {}
    bodies: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            name = line[3:].split(":", 1)[0].strip()
            current = bodies.setdefault(name, []) if name in names and ":" in line else None
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0] in names:
            goals.setdefault(cells[0], cells[1].removesuffix(" (earlier run)"))
        if current is not None:
            current.append(line)
    return [Kept(n, goals.get(n, "-"), "\n".join(bodies[n]).rstrip() + "\n")
            for n in names if n in bodies]


def render(sections: Sequence[Section], machine: Machine, failures: Sequence[str] = (),
           kept: Sequence[Kept] = (), order: Sequence[str] = ()) -> str:
    def rank(item: tuple[str, str]) -> int:
        return order.index(item[0]) if item[0] in order else len(order)

    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m bench` (`make bench`); every run overwrites this file. Each",
        "benchmark measures a baseline in the same run on the same machine, so ratios carry",
        "over between machines where absolute times do not. Benchmarks are not tests: a",
        "missed goal is reported here, it does not fail a build. A run of some benchmarks",
        "keeps the others' sections from the run before (marked in the summary).",
        "",
        "## Machine",
        "",
        *_table(("", ""), machine.rows()),
        "",
        "## Summary",
        "",
        *_table(
            ("benchmark", "goals met"),
            sorted([(s.name, f"{sum(s.goals_met)} of {len(s.goals_met)}") for s in sections]
                   + [(k.name, f"{k.goals} (earlier run)") for k in kept], key=rank)
            + [(f.split(":", 1)[0], f"failed: {f.split(':', 1)[-1].strip()}")
               for f in failures],
        ),
        "",
    ]
    body = "\n".join(lines) + "\n"
    texts = [(s.name, render_section(s, machine)) for s in sections]
    texts += [(k.name, k.text) for k in kept]
    return body + "\n".join(text for _, text in sorted(texts, key=rank))
