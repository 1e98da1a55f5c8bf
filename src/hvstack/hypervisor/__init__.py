"""Hypervisor layer: the machine description (``spec``), the driver and machine
interfaces (``driver``, ``capabilities``), QMP events with their data (``events``),
accelerator choice, and the QEMU implementation (qemu/: argv, process, QMP, agent)."""
