"""The ``hv`` process's entry point (``hv`` and ``python -m hvstack.cli``): it imports the
CLI with the cyclic garbage collector held off, then runs :func:`hvstack.cli.main.run`.

Loading hv's modules (Typer, Rich, httpx) makes about 30,000 objects that live until
the process exits, and none of them is garbage: the collector would walk them over and
over as they are made, and again in the collections at exit, about 30 ms of a 140 ms
``hv vm list``. So collection is off while they load; then they are frozen
(:func:`gc.freeze`: left out of every later collection, the one at exit included), and
collection is on again for the command itself, which may run for hours (``hv serve``,
``hv vm console``). Tests import :mod:`hvstack.cli.main` directly, collector untouched.
"""

from __future__ import annotations

import gc


def run() -> None:
    gc.disable()
    try:
        from hvstack.cli.main import run as run_cli
    finally:
        gc.freeze()
        gc.enable()
    run_cli()
