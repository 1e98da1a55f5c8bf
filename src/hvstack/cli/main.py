"""The ``hv`` entry point: noun-verb commands, ``hv serve`` for the host service.

Every failure prints one line to stderr and exits with code 2; no traceback reaches a
user (an unexpected one is logged with ``HV_DEBUG=1``).

Start-up time matters (every ``hv`` command pays it): modules only ``hv serve`` needs
(asyncio, the host service, FastAPI, uvicorn) are imported inside it.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

import typer
from rich.text import Text
from typer.main import get_command_name
from typer.models import TyperInfo

from hvstack.cli import auth, checkpoint, disk, switch, vm
from hvstack.cli import console as _console  # noqa: F401  (hv vm console, screenshot)
from hvstack.cli import export as _export  # noqa: F401  (hv vm export/import, checkpoint export)
from hvstack.cli import guest as _guest  # noqa: F401  (hv vm exec, copy-file, kvp)
from hvstack.cli import metering as _metering  # noqa: F401  (hv vm metering ...)
from hvstack.cli import storage_move as _storage_move  # noqa: F401  (hv vm move-storage)
from hvstack.cli.connection import Connection, current_connection
from hvstack.cli.render import (
    EXIT_ERROR,
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    details,
    elapsed,
    err_console,
    error_line,
    local_time,
    percent,
    print_json,
    size,
    table,
)
from hvstack.client import url_path
from hvstack.errors import HvError

app = typer.Typer(help="hvstack: Hyper-V's virtualization stack on KVM/QEMU.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(vm.app, name="vm")
app.add_typer(disk.app, name="disk")
app.add_typer(disk.image_app, name="image")
app.add_typer(switch.app, name="switch")
app.add_typer(auth.app, name="auth")
app.add_typer(checkpoint.app, name="checkpoint")
host_app = typer.Typer(help="The host and its service.", no_args_is_help=True)
job_app = typer.Typer(help="Long operations: list, show, cancel.", no_args_is_help=True)
app.add_typer(host_app, name="host")
app.add_typer(job_app, name="job")


@app.callback()
def connection(
    token: str | None = typer.Option(None, "--token", envvar="HV_TOKEN", show_envvar=True,
                                     help="API token, for a tcp: host"),
    fingerprint: str | None = typer.Option(
        None, "--fingerprint", envvar="HV_FINGERPRINT", show_envvar=True,
        help="SHA-256 fingerprint of the service's TLS certificate (pins it)"),
    ca_file: str | None = typer.Option(None, "--ca-file", envvar="HV_CA_FILE",
                                       show_envvar=True,
                                       help="CA certificates that vouch for the service"),
) -> None:
    """Options before the command apply to every connection it makes."""
    current_connection.set(Connection(token, fingerprint, ca_file))


@app.command()
def serve(
    data_dir: str | None = typer.Option(None, "--data-dir", help="default $HV_DATA_DIR"),
    listen: list[str] = typer.Option(
        [], "--listen",
        help="unix:PATH moves the socket (default: hv.sock in the data directory); "
             "tcp:HOST:PORT adds a TCP listener (TLS and tokens); may be given twice"),
    storage_root: list[str] = typer.Option([], "--storage-root",
                                           help="another folder disks may live in"),
    accelerator: str | None = typer.Option(None, "--accelerator", help="auto, kvm or tcg"),
    detach_on_exit: bool = typer.Option(False, "--detach-on-exit",
                                        help="leave VMs running when the service stops"),
    tls_cert: str | None = typer.Option(None, "--tls-cert",
                                        help="certificate (PEM) for the TCP listener; "
                                             "default: a self-signed one kept in DATA/tls"),
    tls_key: str | None = typer.Option(None, "--tls-key", help="its private key (PEM)"),
    insecure: bool = typer.Option(False, "--insecure",
                                  help="plain HTTP on the TCP listener (loopback only)"),
    default_switch: str = typer.Option(
        "default", "--default-switch",
        help="default: make the Default Switch (NAT) on first start and connect new VMs "
             "to it; none: do not (new VMs get user-mode NAT)"),
    mac_pool: str | None = typer.Option(
        None, "--mac-pool", help="FIRST-LAST: the MACs new adapters get (default "
        "52:54:00:00:00:00-52:54:00:ff:ff:ff)"),
    memory_reserve: str | None = typer.Option(
        None, "--memory-reserve", help="memory the host keeps for itself (default "
        "$HV_MEMORY_RESERVE, else 10 % of its memory, 1-8 GiB)"),
    memory_limit: str | None = typer.Option(
        None, "--memory-limit", help="the most memory this host's VMs have together "
        "(default $HV_MEMORY_LIMIT, else none)"),
) -> None:
    """Run the host service in the foreground."""
    import asyncio
    import logging

    from hvstack.host.config import load_config
    from hvstack.server import serve as run_server

    logging.basicConfig(level=logging.DEBUG if os.environ.get("HV_DEBUG") else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)  # it logs every disconnect
    config = load_config(data_dir, listen, storage_root or None, accelerator, detach_on_exit,
                         tls_cert=tls_cert, tls_key=tls_key, insecure=insecure,
                         default_switch=default_switch, mac_pool=mac_pool,
                         memory_reserve=memory_reserve, memory_limit=memory_limit)

    def announce(message: str) -> None:
        err_console.print(Text(message), highlight=False)

    asyncio.run(run_server(config, announce=announce))


@host_app.command("info")
def host_info(output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Show the host: CPUs, memory (total, reserved for the host, assigned to VMs,
    available), the accelerator in use and why."""
    with client(host) as api:
        info = api.get("/host")
    sizes = {key: size for key in ("memory_bytes", "memory_reserved_bytes",
                                   "memory_limit_bytes", "memory_assigned_bytes",
                                   "memory_available_bytes")}
    print_json(info) if output is Output.json else details(info, sizes)


JOB_COLUMNS = [("id", "Id"), ("kind", "Kind"), ("target", "Target"), ("state", "State"),
               ("progress", "%"), ("created_at", "Started"), ("duration_seconds", "Duration"),
               ("message", "Message")]
JOB_FORMATS = {"id": lambda v: str(v)[:8], "created_at": local_time,
               "finished_at": local_time, "duration_seconds": elapsed, "progress": percent}


def _job_row(job: dict[str, Any]) -> dict[str, Any]:
    """A job as a table shows it: a failed job's message is its error."""
    error = job.get("error") or {}
    return {**job, "message": job.get("message") or error.get("detail") or ""}


@job_app.command("list")
def job_list(output: Output = OutputOption, host: str | None = HostOption) -> None:
    """List recent jobs (ids are shortened: any unique prefix names a job)."""
    with client(host) as api:
        jobs = api.get("/jobs")
    if output is Output.json:
        print_json(jobs)
    elif not jobs:
        console.print("No jobs yet: starting, stopping, saving or converting makes one.")
    else:
        table([_job_row(j) for j in jobs], JOB_COLUMNS, JOB_FORMATS,
              no_wrap={"id", "created_at", "duration_seconds"})


def _job_details(job: dict[str, Any], output: Output) -> None:
    if output is Output.json:
        print_json(job)
    else:
        details(job, {**JOB_FORMATS, "id": str})


@job_app.command("show")
def job_show(job_id: str = typer.Argument(..., help="a job's id or a unique prefix of it"),
             output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Show one job."""
    with client(host) as api:
        _job_details(api.get(url_path("jobs", job_id)), output)


@job_app.command("cancel")
def job_cancel(job_id: str = typer.Argument(..., help="a job's id or a unique prefix of it"),
               output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Cancel a running job (a job that has ended is an error)."""
    with client(host) as api:
        job = api.post(url_path("jobs", job_id, "cancel"))
    print_json(job) if output is Output.json else console.print(
        f"job {job['id']} ({job['kind']} of {job['target']}): {job['state']}")


def app_for(argv: list[str]) -> typer.Typer:
    """The app that runs ``hv ARGV``: for ``hv GROUP COMMAND ...`` a root holding that group
    with that command alone (for ``hv GROUP ...`` naming no command of it, the whole group),
    else the whole app. Typer turns every command of the app it runs into a click command
    first (about 15 ms for all of them, 8 ms for the vm group's); ``hv vm list`` needs one."""
    for group in app.registered_groups:
        if argv and group.name == argv[0]:
            root = typer.Typer(help=app.info.help, no_args_is_help=True,
                               pretty_exceptions_enable=False)
            root.registered_callback = app.registered_callback  # the root options
            root.registered_groups = [_narrowed(group, argv[1:2])]
            return root
    return app


def _narrowed(group: TyperInfo, argv: list[str]) -> TyperInfo:
    """``group`` holding only the command that ``argv[0]`` names, if it names one."""
    if group.typer_instance is None or not argv:
        return group
    for command in group.typer_instance.registered_commands:
        name = command.name or (command.callback and get_command_name(command.callback.__name__))
        if name == argv[0]:
            only = copy.copy(group.typer_instance)
            only.registered_commands, only.registered_groups = [command], []
            narrowed = copy.copy(group)
            narrowed.typer_instance = only
            return narrowed
    return group


def run() -> None:
    try:
        app_for(sys.argv[1:])()
    except HvError as exc:
        err_console.print(error_line(exc.message))
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # no traceback for users; HV_DEBUG=1 shows it
        if os.environ.get("HV_DEBUG"):
            raise
        err_console.print(error_line(f"unexpected failure: {exc}"))
        sys.exit(EXIT_ERROR)
