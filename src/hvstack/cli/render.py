"""Rendering for the CLI: Rich tables for people, ``-o json`` for scripts, one-line
errors with exit code 2, and progress bars for jobs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hvstack.cli.connection import current_connection
from hvstack.client import ApiError, Client
from hvstack.units import format_size

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

EXIT_ERROR = 2


class Output(StrEnum):
    table = "table"
    json = "json"


OutputOption = typer.Option(Output.table, "--output", "-o", help="table or json")
HostOption = typer.Option(None, "--host", envvar="HV_HOST",
                          help="host service: unix:PATH, tcp:HOST:PORT (TLS) or "
                               "http+tcp:HOST:PORT")


def fail(message: str) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(EXIT_ERROR)


@contextmanager
def client(host: str | None) -> Iterator[Client]:
    try:
        options = current_connection.get()
        with Client(host, token=options.token, fingerprint=options.fingerprint,
                    ca_file=options.ca_file) as c:
            yield c
    except ApiError as exc:
        fail(str(exc))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
          formatters: Mapping[str, Callable[[Any], str]] | None = None) -> None:
    formatters = formatters or {}
    out = Table(box=None, header_style="bold")
    for _, title in columns:
        out.add_column(title)
    for row in rows:
        out.add_row(*(formatters.get(key, _cell)(row.get(key)) for key, _ in columns))
    console.print(out)


def details(data: dict[str, Any], formatters: Mapping[str, Callable[[Any], str]] | None = None
            ) -> None:
    formatters = formatters or {}
    out = Table(box=None, show_header=False)
    out.add_column(style="bold")
    out.add_column()
    for key, value in data.items():
        out.add_row(key, formatters.get(key, _cell)(value))
    console.print(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def size(value: Any) -> str:
    return format_size(int(value)) if isinstance(value, int) else _cell(value)


def duration(value: Any) -> str:
    if not isinstance(value, int) or value <= 0:
        return "-"
    hours, rest = divmod(value, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{seconds:02}"


def follow_job(api: Client, job: dict[str, Any], what: str, quiet: bool = False
               ) -> dict[str, Any]:
    """Wait for a job with a Rich progress bar (on stderr, only on a terminal)."""
    if quiet or not err_console.is_terminal:
        return api.wait_job(job)
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[message]}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(what, total=100, message="")

        def update(view: dict[str, Any]) -> None:
            bar.update(task, completed=view["progress"], message=view.get("message", ""))

        return api.wait_job(job, update)
