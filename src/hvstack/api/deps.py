"""Where routes find the host service and its domain operations (set by create_app)."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from hvstack.host.console_ops import ConsoleOperations
from hvstack.host.disk_ops import DiskOperations
from hvstack.host.service import HostService
from hvstack.integration.ops import GuestOperations


def service_of(connection: HTTPConnection) -> HostService:
    service: HostService = connection.app.state.service
    return service


def disk_ops_of(connection: HTTPConnection) -> DiskOperations:
    ops: DiskOperations = connection.app.state.disk_ops
    return ops


def guest_ops_of(connection: HTTPConnection) -> GuestOperations:
    ops: GuestOperations = connection.app.state.guest_ops
    return ops


def console_ops_of(connection: HTTPConnection) -> ConsoleOperations:
    ops: ConsoleOperations = connection.app.state.console_ops
    return ops
