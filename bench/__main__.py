"""``python -m bench [NAME ...]``: run the benchmarks, rewrite docs/benchmarks.md (the
sections of benchmarks not run this time are kept from the file as it was).

Each benchmark runs in a fresh temporary directory, removed afterwards. A benchmark
that fails is reported in the file's summary and makes the exit status 1; the others
still run. ``--output -`` prints the Markdown instead of writing the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bench import (
    api_list,
    balancer,
    checkpoint_create,
    cli_startup,
    guest_exec,
    storage_move,
    switch_throughput,
    vm_start,
)
from bench.report import Kept, Section, kept_sections, render
from bench.support import Machine

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS: dict[str, Callable[[Path], Section]] = {
    "vm_start": vm_start.run,
    "api_list": api_list.run,
    "guest_exec": guest_exec.run,
    "cli_startup": cli_startup.run,
    "switch_throughput": switch_throughput.run,
    "checkpoint_create": checkpoint_create.run,
    "storage_move": storage_move.run,
    "balancer": balancer.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"),
                        help="where to write the results ('-' for stdout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names: list[str] = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)}; there are {', '.join(BENCHMARKS)}")
    machine = Machine.describe(REPO)
    sections: list[Section] = []
    failures: list[str] = []
    for name in names:
        print(f"bench: running {name} ...", file=sys.stderr, flush=True)
        began, load_before = time.monotonic(), os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix=f"hvbench-{name}-") as tmp:
            try:
                section = BENCHMARKS[name](Path(tmp))
            except Exception as exc:
                traceback.print_exc()
                failures.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
                continue
        seconds = time.monotonic() - began
        sections.append(replace(section, seconds=seconds,
                                load=(load_before, os.getloadavg()[0])))
        print(f"bench: {name} took {seconds:.0f} s", file=sys.stderr, flush=True)
    kept: list[Kept] = []
    if args.output != "-" and Path(args.output).is_file():
        others = [n for n in BENCHMARKS if n not in names]
        kept = kept_sections(Path(args.output).read_text(), others)
    text = render(sections, machine, failures, kept, order=list(BENCHMARKS))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        sys.stdout.write(text)
        print(f"bench: wrote {args.output}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
