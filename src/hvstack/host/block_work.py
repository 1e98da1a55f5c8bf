"""One disk-changing job per VM at a time: checkpoints, merges, exports, storage moves.

Each of these works on a VM's chain of disk files with block jobs or qemu-img; two at
once would change a chain under the other. :meth:`BlockWork.claim` is held for the
whole job (a merge can run for minutes while the VM lock is free for power
operations); a second claim is refused at once with
:class:`~hvstack.errors.ResourceBusy` saying what runs, never queued.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from hvstack.errors import ResourceBusy


class BlockWork:
    def __init__(self) -> None:
        self._busy: dict[str, str] = {}

    def busy(self, vm_id: str) -> str | None:
        """What runs on the VM's disks now ("a checkpoint merge", ...), or None."""
        return self._busy.get(vm_id)

    @contextlib.contextmanager
    def claim(self, vm_id: str, vm_name: str, what: str) -> Iterator[None]:
        """Hold the VM's disks for ``what``; ResourceBusy if something else holds them."""
        running = self._busy.get(vm_id)
        if running is not None:
            raise ResourceBusy(f"VM '{vm_name}' is busy with {running}; wait for it to end "
                               f"or cancel its job, then retry {what}", vm=vm_name)
        self._busy[vm_id] = what
        try:
            yield
        finally:
            del self._busy[vm_id]
