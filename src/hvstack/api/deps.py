"""Where routes find the host service and its domain operations (the composition root
create_app was given)."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from hvstack.host.checkpoint_ops import CheckpointOperations
from hvstack.host.console_ops import ConsoleOperations
from hvstack.host.disk_ops import DiskOperations
from hvstack.host.export_ops import ExportOperations
from hvstack.host.import_ops import ImportOperations
from hvstack.host.metering import Metering
from hvstack.host.network_ops import NetworkOperations
from hvstack.host.service import HostService
from hvstack.host.storage_move import StorageMoves
from hvstack.integration.ops import GuestOperations


def service_of(connection: HTTPConnection) -> HostService:
    service: HostService = connection.app.state.root.service
    return service


def disk_ops_of(connection: HTTPConnection) -> DiskOperations:
    ops: DiskOperations = connection.app.state.root.disks
    return ops


def guest_ops_of(connection: HTTPConnection) -> GuestOperations:
    ops: GuestOperations = connection.app.state.root.guest
    return ops


def console_ops_of(connection: HTTPConnection) -> ConsoleOperations:
    ops: ConsoleOperations = connection.app.state.root.console
    return ops


def network_ops_of(connection: HTTPConnection) -> NetworkOperations:
    ops: NetworkOperations = connection.app.state.root.network
    return ops


def checkpoint_ops_of(connection: HTTPConnection) -> CheckpointOperations:
    ops: CheckpointOperations = connection.app.state.root.checkpoints
    return ops


def export_ops_of(connection: HTTPConnection) -> ExportOperations:
    ops: ExportOperations = connection.app.state.root.exports
    return ops


def import_ops_of(connection: HTTPConnection) -> ImportOperations:
    ops: ImportOperations = connection.app.state.root.imports
    return ops


def storage_moves_of(connection: HTTPConnection) -> StorageMoves:
    ops: StorageMoves = connection.app.state.root.storage_moves
    return ops


def metering_of(connection: HTTPConnection) -> Metering:
    ops: Metering = connection.app.state.root.metering
    return ops
