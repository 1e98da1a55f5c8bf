"""hvstack benchmarks: ``python -m bench`` runs them all and rewrites docs/benchmarks.md.

Benchmarks are not tests. Each one measures hvstack against a baseline measured in the
same run on the same machine (so the ratio, not the absolute number, is what carries
over between machines), states its goal, finishes in bounded time and cleans up all it
started: host services, QEMU processes, temporary and runtime directories.

Modules:

* :mod:`bench.vm_start` - control-plane overhead of starting a VM, against running the
  same QEMU command line by hand.
* :mod:`bench.api_list` - ``GET /api/v1/vms`` latency with 1,000 VMs defined, and the
  rate of defining VMs with a new disk, against bare ``qemu-img create``.
* :mod:`bench.support` - the shared parts: a host service subprocess, a minimal QMP
  client, statistics and the machine description.
* :mod:`bench.report` - result tables and the Markdown file.
"""
