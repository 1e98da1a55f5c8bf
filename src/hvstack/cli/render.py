"""Rendering for the CLI: Rich tables for people, ``-o json`` for scripts, one-line
errors with exit code 2, and progress bars for jobs.

Every value shown is text, never Rich markup: names, notes, KVP values, guest data and
error messages may hold ``[`` or escape sequences. The consoles here have markup,
highlighting and emoji codes off, and escape control characters (an ESC is shown as
the four characters ``\\x1b``) in every string they render; tables and details build
:class:`rich.text.Text` cells. Styles are applied only to our own words.

Rich's progress bars are imported only by commands that show one (start-up time).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hvstack.cli.connection import current_connection
from hvstack.client import ApiError, Client
from hvstack.units import format_size

# C0 and C1 controls, DEL, lone surrogates, and the invisible bidirectional controls
# that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u200e\u200f\u202a-\u202e"
                      "\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escaped(match: re.Match[str]) -> str:
    ch = match.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\n``)."""
    if keep_newlines:
        return "\n".join(_CONTROL.sub(_escaped, line) for line in text.split("\n"))
    return _CONTROL.sub(_escaped, text)


def plain(value: object, style: str = "") -> Text:
    """``value`` as a Rich Text that is shown as it is (markup-free, controls escaped)."""
    return Text(escape_controls(str(value)), style=style)


class PlainConsole(Console):
    """A Console for untrusted text: no markup, no highlighting, no emoji codes, and
    control characters escaped in every string it renders (newlines kept)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(markup=False, highlight=False, emoji=False, **options)

    def render_str(self, text: str, **options: Any) -> Text:
        return super().render_str(escape_controls(text, keep_newlines=True), **options)


console = PlainConsole(soft_wrap=True)  # a long path stays one line: it can be copied
err_console = PlainConsole(stderr=True, soft_wrap=True)

EXIT_ERROR = 2


class Output(StrEnum):
    table = "table"
    json = "json"


OutputOption = typer.Option(Output.table, "--output", "-o", help="table or json")
HostOption = typer.Option(None, "--host", envvar="HV_HOST",
                          help="host service: unix:PATH, tcp:HOST:PORT (TLS) or "
                               "http+tcp:HOST:PORT")


def error_line(message: str) -> Text:
    """``error: MESSAGE`` with the message as text."""
    return Text.assemble(("error:", "red"), " ", escape_controls(message))


def fail(message: str) -> NoReturn:
    err_console.print(error_line(message))
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


def local_path(path: str | None) -> str | None:
    """A path on this machine made absolute (the service does not share our working
    directory); None and "" stay as they are."""
    return os.path.abspath(path) if path else None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
          formatters: Mapping[str, Callable[[Any], str]] | None = None,
          no_wrap: Collection[str] = ()) -> None:
    """Rows as a table; the columns named in ``no_wrap`` (ids, times) are never split."""
    formatters = formatters or {}
    out = Table(box=None, header_style="bold")
    for key, title in columns:
        out.add_column(title, no_wrap=key in no_wrap)
    for row in rows:
        out.add_row(*(plain(formatters.get(key, _cell)(row.get(key))) for key, _ in columns))
    console.print(out)


def details(data: dict[str, Any], formatters: Mapping[str, Callable[[Any], str]] | None = None
            ) -> None:
    formatters = formatters or {}
    out = Table(box=None, show_header=False)
    out.add_column(style="bold")
    out.add_column(overflow="fold")  # a path folds onto the next line, never cut short
    for key, value in data.items():
        out.add_row(plain(key), plain(formatters.get(key, _cell)(value)))
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


def elapsed(value: Any) -> str:
    """Seconds as a duration: ``0.4 s``, ``12.0 s``, ``1:02:03``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _cell(value)
    return f"{value:.1f} s" if value < 60 else duration(int(value))


def local_time(value: Any) -> str:
    """A time from the API (ISO 8601, or seconds since the epoch) as this machine's local
    time: ``14:03:27`` today, else ``2026-11-30 14:03:27``."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        moment = datetime.fromtimestamp(value).astimezone()
    elif not isinstance(value, str):
        return _cell(value)
    else:
        try:
            moment = datetime.fromisoformat(value).astimezone()
        except ValueError:
            return value
    if moment.date() == datetime.now().astimezone().date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def percent(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, int | float) else _cell(value)


def follow_job(api: Client, job: dict[str, Any], what: str, quiet: bool = False
               ) -> dict[str, Any]:
    """Wait for a job with a Rich progress bar (on stderr, only on a terminal)."""
    if quiet or not err_console.is_terminal:
        return api.wait_job(job)
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("{task.description}", markup=False), BarColumn(),
               TaskProgressColumn(), TextColumn("{task.fields[message]}", markup=False),
               TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(escape_controls(what), total=100, message="")

        def update(view: dict[str, Any]) -> None:
            bar.update(task, completed=view["progress"],
                       message=escape_controls(view.get("message") or ""))

        return api.wait_job(job, update)
