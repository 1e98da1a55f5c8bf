"""``hv vm ...``: VMs and their lifecycle."""

from __future__ import annotations

from typing import Any

import typer

from hvstack.cli import nic
from hvstack.cli.render import (
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    details,
    duration,
    fail,
    follow_job,
    local_path,
    local_time,
    print_json,
    size,
    table,
)
from hvstack.client import url_path
from hvstack.errors import HvError
from hvstack.units import parse_size

app = typer.Typer(help="Create, run and manage virtual machines.", no_args_is_help=True)
app.add_typer(nic.app, name="nic")

LIST_COLUMNS = [("name", "Name"), ("state", "State"), ("generation", "Gen"), ("cpus", "CPUs"),
                ("memory_bytes", "Memory"), ("uptime_seconds", "Uptime"),
                ("heartbeat", "Heartbeat"), ("state_reason", "Status")]
CHECKPOINT_TYPES = ("production", "production-only", "standard", "disabled")
SERVICES = ("heartbeat", "shutdown", "time-sync", "kvp", "backup", "guest-services")
FORMATS = {"memory_bytes": size, "uptime_seconds": duration, "created_at": local_time,
           "memory_minimum_bytes": size, "memory_maximum_bytes": size,
           "memory_assigned_bytes": size, "memory_demand_bytes": size,
           "memory_buffer_percent": lambda v: f"{v}%",
           "processor_compatibility": lambda v: "on" if v else "off"}


def _show(vm: dict[str, Any], output: Output) -> None:
    if output is Output.json:
        print_json(vm)
        return
    view = dict(vm)
    view["disks"] = [f"{d['path']} ({d['bus']}, {d['format']})" for d in vm["disks"]]
    view["network_adapters"] = [nic.adapter_line(n) for n in vm["network_adapters"]]
    view["integration_services"] = [
        f"{name.replace('_', '-')}: "
        + (s["status"] or ("enabled" if s["enabled"] else "Disabled"))
        for name, s in vm.get("integration_services", {}).items()
    ]
    details(view, FORMATS)


@app.command("list")
def list_vms(output: Output = OutputOption, host: str | None = HostOption) -> None:
    """List the VMs of this host."""
    with client(host) as api:
        vms = api.get("/vms")
    if output is Output.json:
        print_json(vms)
    elif not vms:
        console.print("No VMs. Create one with: hv vm create NAME --image tiny")
    else:
        table(vms, LIST_COLUMNS, FORMATS)


@app.command()
def show(name: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Show a VM's settings and state."""
    with client(host) as api:
        _show(api.get(url_path("vms", name)), output)


@app.command()
def create(
    name: str,
    generation: int = typer.Option(2, "--generation", "-g", help="1 (BIOS, IDE) or 2 (UEFI)"),
    cpus: int = typer.Option(1, "--cpus", help="virtual processors"),
    memory: str = typer.Option("512M", "--memory", "-m", help="startup memory, e.g. 1G"),
    image: str | None = typer.Option(None, "--image", help="image to give a disk from"),
    disk: str | None = typer.Option(None, "--disk", help="an existing virtual disk"),
    disk_format: str | None = typer.Option(
        None, "--disk-format", help="format of --disk (qcow2, raw, vhdx, vhd); default: as "
        "its extension says"),
    new_disk: str | None = typer.Option(None, "--new-disk", help="size of a new empty disk"),
    dvd: str | None = typer.Option(None, "--dvd", help="ISO file for the DVD drive"),
    notes: str = typer.Option("", "--notes"),
    os_type: str = typer.Option("linux", "--os-type", help="linux, windows or other"),
    auto_start: str = typer.Option("start-if-running", "--auto-start",
                                   help="nothing, start-if-running or always-start"),
    auto_start_delay: int = typer.Option(0, "--auto-start-delay", help="seconds"),
    auto_stop: str = typer.Option("save", "--auto-stop", help="save, turn-off or shut-down"),
    switch: list[str] = typer.Option(
        [], "--switch", "-s", help="an adapter on this switch (repeatable); default: the "
        "Default Switch if the host has one, else user-mode NAT"),
    no_network: bool = typer.Option(False, "--no-network", help="no network adapter"),
    output: Output = OutputOption,
    host: str | None = HostOption,
) -> None:
    """Create a VM (Hyper-V's New-VM)."""
    if generation not in (1, 2):
        fail("--generation must be 1 or 2")
    if switch and no_network:
        fail("--switch and --no-network exclude each other")
    body = {"name": name, "generation": generation, "cpus": cpus, "memory": memory,
            "image": image, "disk": local_path(disk), "disk_format": disk_format,
            "new_disk": new_disk, "dvd": local_path(dvd),
            "notes": notes, "os_type": os_type, "auto_start": auto_start,
            "auto_start_delay_seconds": auto_start_delay, "auto_stop": auto_stop,
            "switches": switch, "no_network": no_network}
    with client(host) as api:
        vm = api.post("/vms", {k: v for k, v in body.items() if v is not None})
    if output is Output.json:
        print_json(vm)
    else:
        console.print(f"Created VM '{vm['name']}' (Generation {vm['generation']}, {vm['id']})")


def _run_job(name: str, action: str, what: str, body: dict[str, Any] | None, wait: bool,
             output: Output, host: str | None) -> None:
    with client(host) as api:
        job = api.post(url_path("vms", name, action), body)
        if wait:
            job = follow_job(api, job, what)
    if output is Output.json:
        print_json(job)
    elif wait:
        how = (job.get("result") or {}).get("how")
        state = (job.get("result") or {}).get("state", "")
        console.print(f"{what}: done, VM is {state}" + (f" ({how})" if how else ""))
    else:
        console.print(f"{what}: job {job['id']} started")


@app.command()
def start(name: str, wait: bool = typer.Option(True, "--wait/--no-wait",
                                               help="wait until the VM is running"),
          output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Start a VM (from its saved state if it has one)."""
    _run_job(name, "start", f"Starting {name}", None, wait, output, host)


@app.command()
def stop(
    name: str,
    turn_off: bool = typer.Option(False, "--turn-off", help="pull the plug"),
    save: bool = typer.Option(False, "--save", help="save the memory state instead"),
    force: bool = typer.Option(False, "--force",
                               help="turn off at once if the VM cannot be shut down"),
    discard: bool = typer.Option(False, "--discard-saved-state",
                                 help="turn a Saved VM Off without starting it: its "
                                      "saved memory is deleted"),
    timeout: float | None = typer.Option(None, "--timeout",
                                         help="seconds to wait for the guest"),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
    output: Output = OutputOption,
    host: str | None = HostOption,
) -> None:
    """Shut a VM down (guest agent, else ACPI power button); turn off after a timeout."""
    chosen = [o for o, on in (("--turn-off", turn_off), ("--save", save),
                              ("--discard-saved-state", discard)) if on]
    if len(chosen) > 1:
        fail(f"{' and '.join(chosen)} exclude each other: give one")
    if discard and (force or timeout is not None):
        fail("--discard-saved-state takes neither --force nor --timeout: nothing runs")
    mode = ("turn-off" if turn_off else "save" if save
            else "discard-saved-state" if discard else "shut-down")
    body: dict[str, Any] = {"mode": mode, "force": force}
    if timeout is not None:
        body["timeout_seconds"] = timeout
    what = {"turn-off": "Turning off", "save": "Saving", "shut-down": "Shutting down",
            "discard-saved-state": "Discarding the saved state of"}[mode]
    _run_job(name, "stop", f"{what} {name}", body, wait, output, host)


WAIT_CONDITIONS = ("heartbeat", "ip", "running", "off")


@app.command("wait")
def wait_(
    name: str,
    condition: str = typer.Option(..., "--for",
                                  help="heartbeat, ip (the guest reported an address), "
                                       "running or off"),
    timeout: float | None = typer.Option(None, "--timeout",
                                         help="give up after this many seconds, at most "
                                              "86400 (default: wait for good)"),
    output: Output = OutputOption,
    host: str | None = HostOption,
) -> None:
    """Wait until a VM is Running, Off, has a heartbeat or an IP address (Wait-VM).

    Exits 0 once the condition holds, 2 with a sentence when --timeout passes first."""
    if condition not in WAIT_CONDITIONS:
        fail(f"--for '{condition}' is not one of {', '.join(WAIT_CONDITIONS)}")
    if timeout is not None and not 0 < timeout <= 86400:
        fail("--timeout must be more than 0 and at most 86400 seconds")
    with client(host) as api:
        reached = api.wait_vm(name, condition, timeout)
    if output is Output.json:
        print_json(reached)
        return
    vm = reached["vm"]
    message = {
        "running": f"VM '{vm}' is Running",
        "off": f"VM '{vm}' is Off",
        "heartbeat": f"VM '{vm}' is Running, heartbeat {reached['heartbeat']}",
        "ip": f"VM '{vm}' reported {', '.join(reached['ip_addresses'])}",
    }[condition]
    console.print(message, markup=False, highlight=False)


@app.command()
def save(name: str, wait: bool = typer.Option(True, "--wait/--no-wait"),
         output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Save a VM's memory state and stop it; the next start resumes it."""
    _run_job(name, "save", f"Saving {name}", None, wait, output, host)


@app.command()
def restart(name: str, timeout: float | None = typer.Option(None, "--timeout"),
            wait: bool = typer.Option(True, "--wait/--no-wait"),
            output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Shut a VM down and start it again."""
    body = {"timeout_seconds": timeout} if timeout is not None else None
    _run_job(name, "restart", f"Restarting {name}", body, wait, output, host)


@app.command()
def pause(name: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Pause a running VM."""
    with client(host) as api:
        vm = api.post(url_path("vms", name, "pause"))
    print_json(vm) if output is Output.json else console.print(f"{name}: {vm['state']}")


@app.command()
def resume(name: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Resume a paused VM."""
    with client(host) as api:
        vm = api.post(url_path("vms", name, "resume"))
    print_json(vm) if output is Output.json else console.print(f"{name}: {vm['state']}")


@app.command()
def rename(name: str, new_name: str, output: Output = OutputOption,
           host: str | None = HostOption) -> None:
    """Rename a VM."""
    with client(host) as api:
        vm = api.request("PATCH", url_path("vms", name), json={"name": new_name})
    print_json(vm) if output is Output.json else console.print(f"Renamed {name} to {vm['name']}")


def _memory_body(dynamic: bool | None, startup: str | None, minimum: str | None,
                 maximum: str | None, buffer: int | None, weight: int | None
                 ) -> dict[str, Any]:
    """Dynamic memory's part of a change; sizes checked here (exit 2 on a bad one)."""
    sizes = {}
    for key, text, what in (("memory_startup", startup, "--memory-startup"),
                            ("memory_minimum", minimum, "--memory-min"),
                            ("memory_maximum", maximum, "--memory-max")):
        if text is not None:
            try:
                sizes[key] = parse_size(text, what=what, bare_unit="M")
            except HvError as exc:
                fail(exc.message)
    return {"dynamic_memory": dynamic, **sizes, "memory_buffer_percent": buffer,
            "memory_weight": weight}


@app.command("set")
def set_(
    name: str,
    cpus: int | None = typer.Option(None, "--cpus"),
    memory: str | None = typer.Option(None, "--memory", "-m"),
    notes: str | None = typer.Option(None, "--notes"),
    boot_order: str | None = typer.Option(None, "--boot-order",
                                          help="comma list of disk, dvd, network"),
    auto_start: str | None = typer.Option(None, "--auto-start"),
    auto_start_delay: int | None = typer.Option(None, "--auto-start-delay"),
    auto_stop: str | None = typer.Option(None, "--auto-stop"),
    os_type: str | None = typer.Option(None, "--os-type"),
    dvd: str | None = typer.Option(None, "--dvd", help="ISO to insert; '' ejects"),
    attach_disk: str | None = typer.Option(None, "--attach-disk", help="disk to attach"),
    bus: str | None = typer.Option(None, "--bus", help="ide, scsi or virtio (with --attach-disk)"),
    disk_format: str | None = typer.Option(
        None, "--disk-format", help="format of --attach-disk (qcow2, raw, vhdx, vhd); "
        "default: as its extension says, never probed from its content"),
    detach_disk: str | None = typer.Option(None, "--detach-disk", help="disk to detach"),
    enable: list[str] = typer.Option([], "--enable", help=f"integration service: {SERVICES}"),
    disable: list[str] = typer.Option([], "--disable", help="integration service to turn off"),
    checkpoint_type: str | None = typer.Option(
        None, "--checkpoint-type",
        help="production (default), production-only, standard or disabled"),
    automatic_checkpoints: bool | None = typer.Option(
        None, "--automatic-checkpoints/--no-automatic-checkpoints",
        help="a checkpoint each time the VM starts from Off"),
    checkpoint_limit: int | None = typer.Option(
        None, "--checkpoint-limit", help="at most this many checkpoints (1-1000; 50)"),
    dynamic_memory: bool | None = typer.Option(
        None, "--dynamic-memory/--no-dynamic-memory",
        help="memory follows the guest's demand between --memory-min and --memory-max "
             "(turned on or off only while the VM is Off)"),
    memory_startup: str | None = typer.Option(
        None, "--memory-startup", help="memory the VM starts with (same as --memory)"),
    memory_min: str | None = typer.Option(
        None, "--memory-min", help="dynamic memory's minimum (default min(512M, startup); "
        "only lowered while the VM runs)"),
    memory_max: str | None = typer.Option(
        None, "--memory-max", help="dynamic memory's maximum (default the host's memory; "
        "only raised while the VM runs)"),
    memory_buffer: int | None = typer.Option(
        None, "--memory-buffer", help="memory kept on top of the demand, in % (5-2000; 20)"),
    memory_weight: int | None = typer.Option(
        None, "--memory-weight", help="priority when the host runs short (0-10000; 5000)"),
    processor_reserve: int | None = typer.Option(
        None, "--processor-reserve", metavar="PCT",
        help="% of the VM's processors kept for it (0-100; admitted at start)"),
    processor_limit: int | None = typer.Option(
        None, "--processor-limit", metavar="PCT",
        help="at most this % of the VM's processors (1-100; 100: no limit)"),
    processor_weight: int | None = typer.Option(
        None, "--processor-weight", metavar="N",
        help="relative weight against other VMs (1-10000; 100)"),
    processor_compatibility: str | None = typer.Option(
        None, "--processor-compatibility", metavar="on|off",
        help="a baseline processor model, so the VM can move between hosts with different "
             "processors (only while the VM is Off)"),
    output: Output = OutputOption,
    host: str | None = HostOption,
) -> None:
    """Change a VM's settings (hardware changes need the VM Off; the processor
    resource controls apply at once to a running VM)."""
    if checkpoint_type is not None and checkpoint_type not in CHECKPOINT_TYPES:
        fail(f"--checkpoint-type '{checkpoint_type}' is not one of {', '.join(CHECKPOINT_TYPES)}")
    if processor_compatibility not in (None, "on", "off"):
        fail(f"--processor-compatibility '{processor_compatibility}' is not one of on, off")
    body: dict[str, Any] = {"cpus": cpus, "memory": memory, "notes": notes,
                            "auto_start": auto_start, "auto_start_delay_seconds": auto_start_delay,
                            "auto_stop": auto_stop, "os_type": os_type,
                            "checkpoint_type": checkpoint_type,
                            "automatic_checkpoints": automatic_checkpoints,
                            "checkpoint_limit": checkpoint_limit,
                            **_memory_body(dynamic_memory, memory_startup, memory_min,
                                           memory_max, memory_buffer, memory_weight),
                            "processor_reserve_percent": processor_reserve,
                            "processor_limit_percent": processor_limit,
                            "processor_weight": processor_weight,
                            "processor_compatibility": (None if processor_compatibility is None
                                                        else processor_compatibility == "on")}
    if boot_order is not None:
        body["boot_order"] = [b.strip() for b in boot_order.split(",") if b.strip()]
    body = {k: v for k, v in body.items() if v is not None}
    toggles: dict[str, bool] = {}
    for names, on in ((enable, True), (disable, False)):
        for service in names:
            if service not in SERVICES:
                fail(f"'{service}' is not an integration service; use one of {', '.join(SERVICES)}")
            toggles[service.replace("-", "_")] = on
    if toggles:
        body["integration_services"] = toggles
    with client(host) as api:
        vm = None
        if body:
            vm = api.request("PATCH", url_path("vms", name), json=body)
        if dvd is not None:
            vm = api.request("PUT", url_path("vms", name, "dvd"),
                             json={"iso": local_path(dvd) or None})
        if attach_disk:
            vm = api.post(url_path("vms", name, "disks"),
                          {"path": local_path(attach_disk), "bus": bus, "format": disk_format})
        if detach_disk:
            vm = api.request("DELETE", url_path("vms", name, "disks"),
                             params={"path": local_path(detach_disk)})
        if vm is None:
            fail("nothing to change; see hv vm set --help")
    _show(vm, output)


@app.command()
def delete(name: str,
           delete_disks: bool = typer.Option(False, "--delete-disks",
                                             help="also delete the disks created for it"),
           output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Delete a VM (it must be Off or Saved). Its disks are kept unless --delete-disks,
    which deletes only the disks created for the VM: never an attached disk, a disk
    another VM uses or the parent of another disk."""
    with client(host) as api:
        result = api.request("DELETE", url_path("vms", name),
                             params={"delete_disks": str(delete_disks).lower()})
    if output is Output.json:
        print_json(result)
        return
    console.print(f"Deleted VM '{name}'")
    for path in result.get("deleted_disks", []):
        console.print(f"  deleted disk {path}", markup=False, soft_wrap=True)
    for kept in result.get("kept_disks", []):
        console.print(f"  kept disk {kept['path']}: {kept['reason']}", markup=False,
                      soft_wrap=True)


@app.command()
def log(name: str, max_bytes: int = typer.Option(65536, "--bytes", help="at most this much"),
        host: str | None = HostOption) -> None:
    """Print the VM's serial console output so far."""
    with client(host) as api:
        text = api.get(url_path("vms", name, "console-log"), params={"max_bytes": max_bytes})
    typer.echo(text, nl=False)
