"""Hypervisor layer: accelerator choice and the QEMU driver (argv, process, QMP)."""
