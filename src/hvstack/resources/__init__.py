"""Processor resource controls: Hyper-V's reserve, limit and weight on Linux cgroups.

:mod:`hvstack.resources.cpu` maps the settings onto the cgroup CPU controller and decides
admission of reserves (pure functions, no I/O); :mod:`hvstack.resources.cgroups` is the
small cgroup interface with its v1 and v2 implementations, chosen by probing the mounts.
The host (:mod:`hvstack.host.processor_controls`) applies them to each VM's QEMU.
"""
