"""Events from a VM's worker process, with their data, and typed views of the ones used.

A :class:`QmpEvent` is what QEMU said: the event's name, its data (JSON, read-only) and
QEMU's timestamp in seconds since the epoch. The driver hands every event to an
:data:`EventSink`. Callers above the hypervisor layer do not read ``data`` by key: they
ask for a typed view (:meth:`BlockIoError.of`, :meth:`DeviceDeleted.of`, ...), which
returns None for another event or a payload that lacks a field this view needs.

Example::

    def on_event(event: QmpEvent) -> None:
        error = BlockIoError.of(event)
        if error is not None and error.action == "stop":
            print(f"paused: {error.operation} error on {error.node_name}: {error.reason}")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_EMPTY: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True)
class QmpEvent:
    """One event of a VM's QEMU: ``STOP``, ``BLOCK_IO_ERROR``, ``DEVICE_DELETED``, ..."""

    name: str
    data: Mapping[str, object] = field(default_factory=lambda: _EMPTY, hash=False)
    timestamp: float = 0.0  # seconds since the epoch, as QEMU stamped it

    @classmethod
    def from_message(cls, message: Mapping[str, object]) -> QmpEvent:
        """Build from a QMP event message (``{"event", "data", "timestamp"}``)."""
        data = message.get("data")
        stamp = message.get("timestamp")
        when = time.time()
        if isinstance(stamp, Mapping):
            seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
            if isinstance(seconds, int) and isinstance(micros, int) and seconds >= 0:
                when = seconds + micros / 1e6
        return cls(
            name=str(message.get("event", "")),
            data=MappingProxyType(dict(data)) if isinstance(data, Mapping) else _EMPTY,
            timestamp=when,
        )

    def text(self, key: str) -> str | None:
        value = self.data.get(key)
        return value if isinstance(value, str) else None

    def flag(self, key: str) -> bool | None:
        value = self.data.get(key)
        return value if isinstance(value, bool) else None

    def number(self, key: str) -> int | None:
        value = self.data.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None


EventSink = Callable[[QmpEvent], None]
"""Called with each event of a machine, in QEMU's order, on the event loop."""


@dataclass(frozen=True)
class BlockIoError:
    """``BLOCK_IO_ERROR``: a disk request failed; ``action`` says what QEMU did.

    ``action`` is "stop" (QEMU paused the VM: the disk's werror/rerror policy),
    "report" (the guest got the error) or "ignore". ``node_name`` is the block node the
    device is attached to (hvstack names every node); ``device`` is a legacy drive name,
    empty for ``-blockdev`` disks.
    """

    node_name: str
    device: str
    operation: str  # "read" or "write"
    action: str
    nospace: bool
    reason: str  # strerror text, e.g. "No space left on device"

    @classmethod
    def of(cls, event: QmpEvent) -> BlockIoError | None:
        if event.name != "BLOCK_IO_ERROR":
            return None
        operation, action = event.text("operation"), event.text("action")
        if operation is None or action is None:
            return None
        return cls(
            node_name=event.text("node-name") or "",
            device=event.text("device") or "",
            operation=operation,
            action=action,
            nospace=bool(event.flag("nospace")),
            reason=event.text("reason") or "",
        )


@dataclass(frozen=True)
class DeviceDeleted:
    """``DEVICE_DELETED``: the guest let go of a device (``device`` is its id, if any)."""

    device: str | None
    path: str

    @classmethod
    def of(cls, event: QmpEvent) -> DeviceDeleted | None:
        if event.name != "DEVICE_DELETED":
            return None
        return cls(device=event.text("device"), path=event.text("path") or "")


@dataclass(frozen=True)
class JobStatusChange:
    """``JOB_STATUS_CHANGE``: a block job moved to ``status`` (created, running, ...)."""

    job_id: str
    status: str

    @classmethod
    def of(cls, event: QmpEvent) -> JobStatusChange | None:
        job_id, status = event.text("id"), event.text("status")
        if event.name != "JOB_STATUS_CHANGE" or job_id is None or status is None:
            return None
        return cls(job_id=job_id, status=status)


@dataclass(frozen=True)
class BalloonChange:
    """``BALLOON_CHANGE``: the guest's memory is now ``actual`` bytes."""

    actual: int

    @classmethod
    def of(cls, event: QmpEvent) -> BalloonChange | None:
        actual = event.number("actual")
        if event.name != "BALLOON_CHANGE" or actual is None:
            return None
        return cls(actual=actual)


@dataclass(frozen=True)
class MigrationStatus:
    """``MIGRATION``: the migration (or save/restore) is now ``status``."""

    status: str

    @classmethod
    def of(cls, event: QmpEvent) -> MigrationStatus | None:
        status = event.text("status")
        if event.name != "MIGRATION" or status is None:
            return None
        return cls(status=status)
