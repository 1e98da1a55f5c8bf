"""``hv vm export``, ``hv vm import`` and ``hv checkpoint export`` (Export-VM,
Import-VM, Export-VMSnapshot).

``hv vm import DIR --check`` only shows what the import would find (every problem and
note), changing nothing; without ``--check`` a failing check prints every problem and
exits 2. Names and paths from the export are printed as text, control characters
escaped.
"""

from __future__ import annotations

import os
from typing import Any

import typer

from hvstack.cli.checkpoint import app as checkpoint_app
from hvstack.cli.render import (
    EXIT_ERROR,
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    err_console,
    error_line,
    follow_job,
    print_json,
)
from hvstack.cli.vm import app
from hvstack.client import ApiError


def _result(job: dict[str, Any], output: Output, line: str) -> None:
    if output is Output.json:
        print_json(job["result"])
    else:
        console.print(line)


@app.command("export")
def export_vm(name: str, directory: str = typer.Argument(..., metavar="DIR"),
              output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Export a VM into DIR/NAME: settings, disks, checkpoints, saved state (Export-VM).
    A running VM keeps running and is exported from one point in time."""
    with client(host) as api:
        job = follow_job(api, api.export_vm(name, os.path.abspath(directory)),
                         f"Exporting {name}", quiet=output is Output.json)
    result = job["result"]
    _result(job, output, f"Exported VM '{result['vm']}' to {result['path']} "
                         f"({result['files']} disk files, {result['checkpoints']} "
                         f"checkpoints, {result['consistency']})")


@checkpoint_app.command("export")
def export_checkpoint(vm: str, name: str, directory: str = typer.Argument(..., metavar="DIR"),
                      output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Export VM as it was at checkpoint NAME into DIR/VM: its settings then, its disks
    flattened, its memory state if standard; no checkpoints (Export-VMSnapshot)."""
    with client(host) as api:
        job = follow_job(api, api.export_checkpoint(vm, name, os.path.abspath(directory)),
                         f"Exporting checkpoint {name}", quiet=output is Output.json)
    result = job["result"]
    _result(job, output, f"Exported VM '{result['vm']}' at checkpoint "
                         f"'{result['checkpoint']}' to {result['path']}")


def _report(report: dict[str, Any]) -> None:
    console.print(f"Import of VM '{report['name']}' (id {report['id']}) from {report['path']}: "
                  + ("ready" if report["ok"] else f"{len(report['problems'])} problem(s)"))
    # One line each, never wrapped: scripts grep them.
    for problem in report["problems"]:
        console.print(f"  problem: {problem}", soft_wrap=True)
    for note in report["notes"]:
        console.print(f"  note: {note}", soft_wrap=True)


@app.command("import")
def import_vm(
    directory: str = typer.Argument(..., metavar="DIR"),
    copy: bool = typer.Option(False, "--copy", help="copy the files (the default)"),
    register: bool = typer.Option(False, "--register",
                                  help="use the files where they are (register in place)"),
    new_id: bool = typer.Option(False, "--new-id", help="give the VM a new id"),
    name: str | None = typer.Option(None, "--name", help="import under this name"),
    dest: str | None = typer.Option(None, "--dest", metavar="ROOT",
                                    help="--copy: put the files in ROOT/NAME (a folder in "
                                    "the storage roots); default: the VM's own folder"),
    check: bool = typer.Option(False, "--check", help="only check; change nothing"),
    output: Output = OutputOption, host: str | None = HostOption,
) -> None:
    """Import an exported VM (Import-VM), after a check that lists everything missing
    or incompatible and changes nothing when it finds a problem."""
    if copy and register:
        err_console.print(error_line("give --copy or --register, not both"))
        raise typer.Exit(EXIT_ERROR)
    mode = "register" if register else "copy"
    where = os.path.abspath(dest) if dest else None
    path = os.path.abspath(directory)
    with client(host) as api:
        report = api.check_import(path, mode=mode, new_id=new_id, name=name, dest=where)
        if check or not report["ok"]:
            print_json(report) if output is Output.json else _report(report)
            if not report["ok"]:
                raise typer.Exit(EXIT_ERROR)
            return
        try:
            job = follow_job(api, api.import_vm(path, mode=mode, new_id=new_id, name=name,
                                                       dest=where),
                             f"Importing {report['name']}", quiet=output is Output.json)
        except ApiError as exc:  # the host changed since the check
            for problem in exc.problem.get("problems") or []:
                err_console.print(error_line(problem))
            raise
    result = job["result"]
    if output is Output.json:
        print_json(result)
        return
    console.print(f"Imported VM '{result['vm']}' (id {result['id']}, {result['state']}, "
                  f"{result['checkpoints']} checkpoints)")
    for note in result["notes"]:
        console.print(f"  note: {note}")
