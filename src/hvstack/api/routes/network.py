"""Virtual switch and VM adapter routes: /api/v1/switches and /api/v1/vms/{ref}/adapters.

A switch reference is an id if it has the form of one, else a name (as for VMs); an
adapter is named by its MAC.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Query, Request

from hvstack.api.deps import network_ops_of, service_of
from hvstack.api.network_schemas import (
    AdapterBody,
    NatMappingBody,
    NatMappingView,
    SwitchCreate,
    SwitchPortView,
    SwitchUpdate,
    SwitchView,
)
from hvstack.api.schemas import NicView, VmView
from hvstack.api.views import vm_view
from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import NetworkAdapter, NicModel
from hvstack.host.adapter_ops import AdapterChange
from hvstack.host.network_ops import NetworkOperations
from hvstack.network.model import (
    AclAction,
    AclDirection,
    MirrorMode,
    PortAcl,
    Switch,
    Vlan,
    VlanMode,
    parse_acl_remote,
    parse_rate,
    parse_vlan_list,
)

router = APIRouter(prefix="/api/v1", tags=["network"])


def vlan_text(nic: NetworkAdapter) -> str:
    vlan = nic.port.vlan
    if vlan.mode is VlanMode.ACCESS:
        return str(vlan.access_id)
    if vlan.mode is VlanMode.TRUNK:
        native = f" native {vlan.native}" if vlan.native is not None else ""
        return f"trunk {','.join(map(str, vlan.allowed))}{native}"
    return ""


def switch_view(ops: NetworkOperations, switch: Switch) -> SwitchView:
    plan = ops.switch_plan(switch)
    return SwitchView(
        id=switch.id, name=switch.name, type=switch.type.value, adapter=switch.adapter,
        subnet=switch.subnet, host_address=switch.host_address,
        dhcp_range=[plan.dhcp.first, plan.dhcp.last] if plan.dhcp else None,
        mappings=[NatMappingView(protocol=m.protocol.value, external_port=m.external_port,
                                 internal_ip=m.internal_ip, internal_port=m.internal_port)
                  for m in switch.mappings],
        notes=switch.notes, default=switch.default, bridge=plan.bridge,
        ports=[SwitchPortView(vm=vm.record.name, vm_id=vm.record.id, mac=nic.mac,
                              vlan=vlan_text(nic), tap=ops.tap(vm.record.id, nic.mac))
               for vm, nic in ops.ports_of(switch.id)],
    )


async def adapter_views(ops: NetworkOperations, vm: VmController,
                        counters: bool = False) -> list[NicView]:
    """The VM's adapters with their switch's name, the guest's addresses and (with
    ``counters``) what each port ACL matched."""
    addresses = await ops.guest_addresses(vm)
    views = []
    for nic in vm.record.config.network_adapters:
        matched = await ops.acl_counters(vm, nic) if counters else ()
        views.append(NicView(mac=nic.mac, model=nic.model.value, mode=nic.mode,
                             switch=nic.switch, switch_name=ops.name_of(nic.switch),
                             dynamic_mac=nic.dynamic_mac, port=nic.port.to_json(),
                             ip_addresses=addresses.get(nic.mac, []),
                             acl_counters=[dataclasses.asdict(c) for c in matched]))
    return views


async def full_vm_view(request: Request, vm: VmController) -> VmView:
    view = vm_view(vm, service_of(request))
    view.network_adapters = await adapter_views(network_ops_of(request), vm)
    return view


def _vlan(body: AdapterBody) -> Vlan | None:
    if body.vlan is None:
        return None
    allowed = body.vlan.allowed
    ids = (parse_vlan_list(allowed) if isinstance(allowed, str)
           else tuple(sorted(set(allowed or ()))))
    return Vlan(VlanMode(body.vlan.mode), body.vlan.access_id, ids, body.vlan.native)


def _rate(value: int | str | None, what: str) -> int | None:
    if value is None:
        return None
    if value in (0, "0", "none", ""):
        return 0
    return parse_rate(value, what=what)


def adapter_change(body: AdapterBody) -> AdapterChange:
    return AdapterChange(
        switch=body.switch, mode=body.mode, mac=body.mac,
        model=NicModel(body.model) if body.model else None, vlan=_vlan(body),
        mac_spoofing=body.mac_spoofing, dhcp_guard=body.dhcp_guard,
        router_guard=body.router_guard,
        acls=None if body.acls is None else tuple(
            PortAcl(AclAction(a.action), AclDirection(a.direction), parse_acl_remote(a.remote))
            for a in body.acls),
        bandwidth_max=_rate(body.bandwidth_max, "maximum bandwidth"),
        bandwidth_min=_rate(body.bandwidth_min, "minimum bandwidth"),
        mirror=MirrorMode(body.mirror) if body.mirror else None,
    )


# -- switches ---------------------------------------------------------------------------

@router.get("/switches", response_model=list[SwitchView])
async def list_switches(request: Request) -> list[SwitchView]:
    ops = network_ops_of(request)
    return [switch_view(ops, s) for s in ops.all()]


@router.get("/network")
async def network_status(request: Request) -> dict[str, Any]:
    """Whether this service manages switches (and why not), its MAC pool."""
    ops = network_ops_of(request)
    default = ops.default_switch()
    return {"available": ops.unavailable is None, "reason": ops.unavailable,
            "default_switch": default.name if default else None,
            "mac_pool": str(ops.pool), "table": ops.table}


@router.post("/switches", response_model=SwitchView, status_code=201)
async def create_switch(request: Request, body: SwitchCreate) -> SwitchView:
    ops = network_ops_of(request)
    switch = await ops.create(body.name, body.type, adapter=body.adapter,
                              subnet=body.subnet, host_address=body.host_address,
                              notes=body.notes)
    return switch_view(ops, switch)


@router.get("/switches/{ref}", response_model=SwitchView)
async def show_switch(request: Request, ref: str) -> SwitchView:
    ops = network_ops_of(request)
    return switch_view(ops, ops.get(ref))


@router.patch("/switches/{ref}", response_model=SwitchView)
async def update_switch(request: Request, ref: str, body: SwitchUpdate) -> SwitchView:
    ops = network_ops_of(request)
    switch = await ops.change(ref, name=body.name, notes=body.notes,
                              host_address=body.host_address)
    return switch_view(ops, switch)


@router.delete("/switches/{ref}")
async def delete_switch(request: Request, ref: str,
                        force: bool = Query(False)) -> dict[str, Any]:
    return await network_ops_of(request).delete(ref, force=force)


@router.get("/switches/{ref}/mappings")
async def list_mappings(request: Request, ref: str) -> list[dict[str, Any]]:
    ops = network_ops_of(request)
    return [m.model_dump() for m in switch_view(ops, ops.get(ref)).mappings]


@router.post("/switches/{ref}/mappings", response_model=SwitchView, status_code=201)
async def add_mapping(request: Request, ref: str, body: NatMappingBody) -> SwitchView:
    ops = network_ops_of(request)
    switch = await ops.add_mapping(ref, body.protocol, body.external_port, body.internal_ip,
                                   body.internal_port)
    return switch_view(ops, switch)


@router.delete("/switches/{ref}/mappings/{protocol}/{external_port}",
               response_model=SwitchView)
async def remove_mapping(request: Request, ref: str, protocol: str,
                         external_port: int) -> SwitchView:
    ops = network_ops_of(request)
    return switch_view(ops, await ops.remove_mapping(ref, protocol, external_port))


# -- a VM's adapters -----------------------------------------------------------------

@router.get("/vms/{ref}/adapters", response_model=list[NicView])
async def list_adapters(request: Request, ref: str) -> list[NicView]:
    ops = network_ops_of(request)
    return await adapter_views(ops, service_of(request).get_vm(ref), counters=True)


@router.post("/vms/{ref}/adapters", response_model=VmView, status_code=201)
async def add_adapter(request: Request, ref: str, body: AdapterBody) -> VmView:
    vm, _ = await network_ops_of(request).adapters.add(ref, adapter_change(body))
    return await full_vm_view(request, vm)


@router.patch("/vms/{ref}/adapters/{mac}", response_model=VmView)
async def change_adapter(request: Request, ref: str, mac: str, body: AdapterBody) -> VmView:
    vm, _ = await network_ops_of(request).adapters.change(ref, mac, adapter_change(body))
    return await full_vm_view(request, vm)


@router.delete("/vms/{ref}/adapters/{mac}", response_model=VmView)
async def remove_adapter(request: Request, ref: str, mac: str) -> VmView:
    vm = await network_ops_of(request).adapters.remove(ref, mac)
    return await full_vm_view(request, vm)
