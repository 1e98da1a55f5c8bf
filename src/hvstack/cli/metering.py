"""``hv vm metering enable|disable|reset|show NAME``: resource metering of a VM
(Hyper-V's Enable-VMResourceMetering, Disable-VMResourceMetering,
Reset-VMResourceMetering, Measure-VM). ``show`` prints the totals as a table (``-o
json``: the API's view); a VM without metering enabled is an error (exit code 2) that
says how to enable it. Names and MACs are printed as text, never as markup."""

from __future__ import annotations

from typing import Any

import typer

from hvstack.cli.render import (
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    details,
    duration,
    local_time,
    print_json,
    size,
    table,
)
from hvstack.cli.vm import app as vm_app

app = typer.Typer(help="Resource metering of a VM (Measure-VM): enable, show, reset, "
                       "disable.", no_args_is_help=True)
vm_app.add_typer(app, name="metering")

ADAPTER_COLUMNS = [("mac", "Adapter"), ("received", "In (to the VM)"),
                   ("sent", "Out (from the VM)")]


def _seconds(value: Any) -> str:
    return duration(round(value)) if isinstance(value, int | float) and value >= 1 else (
        f"{value:.1f} s" if isinstance(value, int | float) else "-")


def summary(view: dict[str, Any]) -> dict[str, str]:
    """The totals as rows of text, in Measure-VM's order."""
    average = view["cpu_average_percent"]
    cpu = f"{view['cpu_seconds']:.1f} s"
    if average is not None:
        cpu += f" (average {average:.1f} % of one host processor while running)"
    memory = "-"
    if view["memory_average_bytes"] is not None:
        memory = (f"average {size(view['memory_average_bytes'])}, minimum "
                  f"{size(view['memory_min_bytes'])}, maximum {size(view['memory_max_bytes'])}")
    return {
        "VM": view["vm"],
        "Metered since": f"{local_time(view['started_at'])} "
                         f"({_seconds(view['duration_seconds'])} ago)",
        "Running": _seconds(view["running_seconds"]),
        "CPU": cpu,
        "Memory": memory,
        "Disk read": size(view["disk_read_bytes"]),
        "Disk written": size(view["disk_written_bytes"]),
        "Network in": size(view["network_received_bytes"]),
        "Network out": size(view["network_sent_bytes"]),
    }


def adapter_rows(view: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for adapter in view["adapters"]:
        if adapter["metered"]:
            rows.append({"mac": adapter["mac"], "received": size(adapter["received_bytes"]),
                         "sent": size(adapter["sent_bytes"])})
        else:
            rows.append({"mac": adapter["mac"], "received": "not metered (user-mode NAT)",
                         "sent": "-"})
    return rows


def _print(view: dict[str, Any], output: Output, headline: str | None = None) -> None:
    if output is Output.json:
        print_json(view)
        return
    if headline is not None:
        console.print(headline, soft_wrap=True)
    details(summary(view))
    if view["adapters"]:
        table(adapter_rows(view), ADAPTER_COLUMNS)


@app.command("enable")
def enable(name: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Start metering a VM's CPU, memory, disk and network use (nothing changes if it
    is metered already)."""
    with client(host) as api:
        view = api.enable_metering(name)
    if output is Output.json:
        print_json(view)
    else:
        console.print(f"Metering VM '{view['vm']}' since {local_time(view['started_at'])}; "
                      f"see it with: hv vm metering show {view['vm']}", soft_wrap=True)


@app.command("show")
def show(name: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Show what the VM used since metering was enabled or last reset (Measure-VM)."""
    with client(host) as api:
        view = api.measure_vm(name)
    _print(view, output)


@app.command("reset")
def reset(name: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Start the totals again from now."""
    with client(host) as api:
        view = api.reset_metering(name)
    if output is Output.json:
        print_json(view)
    else:
        console.print(f"Metering of VM '{view['vm']}' reset.", soft_wrap=True)


@app.command("disable")
def disable(name: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Stop metering the VM; its totals are shown one last time and dropped."""
    with client(host) as api:
        view = api.disable_metering(name)
    _print(view, output, f"Metering of VM '{view['vm']}' disabled; its last totals:")
