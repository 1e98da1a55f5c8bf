"""The ``hv`` entry point: noun-verb commands, ``hv serve`` for the host service.

Every failure prints one line to stderr and exits with code 2; no traceback reaches a
user (an unexpected one is logged with ``HV_DEBUG=1``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import typer
from rich.text import Text

from hvstack.cli import auth, disk, vm
from hvstack.cli import console as _console  # noqa: F401  (hv vm console, screenshot)
from hvstack.cli import guest as _guest  # noqa: F401  (hv vm exec, copy-file, kvp)
from hvstack.cli.connection import Connection, current_connection
from hvstack.cli.render import (
    EXIT_ERROR,
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    details,
    err_console,
    print_json,
    size,
    table,
)
from hvstack.errors import HvError

app = typer.Typer(help="hvstack: Hyper-V's virtualization stack on KVM/QEMU.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(vm.app, name="vm")
app.add_typer(disk.app, name="disk")
app.add_typer(disk.image_app, name="image")
app.add_typer(auth.app, name="auth")
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
) -> None:
    """Run the host service in the foreground."""
    from hvstack.host.config import load_config
    from hvstack.server import serve as run_server

    logging.basicConfig(level=logging.DEBUG if os.environ.get("HV_DEBUG") else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)  # it logs every disconnect
    config = load_config(data_dir, listen, storage_root or None, accelerator, detach_on_exit,
                         tls_cert=tls_cert, tls_key=tls_key, insecure=insecure)

    def announce(message: str) -> None:
        err_console.print(Text(message), highlight=False)

    asyncio.run(run_server(config, announce=announce))


@host_app.command("info")
def host_info(output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Show the host: CPUs, memory, the accelerator in use and why."""
    with client(host) as api:
        info = api.get("/host")
    print_json(info) if output is Output.json else details(info, {"memory_bytes": size})


JOB_COLUMNS = [("id", "Id"), ("kind", "Kind"), ("target", "Target"), ("state", "State"),
               ("progress", "%"), ("message", "Message")]


@job_app.command("list")
def job_list(output: Output = OutputOption, host: str | None = HostOption) -> None:
    """List recent jobs."""
    with client(host) as api:
        jobs = api.get("/jobs")
    print_json(jobs) if output is Output.json else table(jobs, JOB_COLUMNS)


def _job_details(job: dict[str, Any], output: Output) -> None:
    if output is Output.json:
        print_json(job)
    else:
        details(job)


@job_app.command("show")
def job_show(job_id: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Show one job."""
    with client(host) as api:
        _job_details(api.get(f"/jobs/{job_id}"), output)


@job_app.command("cancel")
def job_cancel(job_id: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Cancel a running job."""
    with client(host) as api:
        job = api.post(f"/jobs/{job_id}/cancel")
    print_json(job) if output is Output.json else console.print(f"job {job_id}: {job['state']}")


def run() -> None:
    try:
        app()
    except HvError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}", highlight=False)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # no traceback for users; HV_DEBUG=1 shows it
        if os.environ.get("HV_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] unexpected failure: {exc}", highlight=False)
        sys.exit(EXIT_ERROR)
