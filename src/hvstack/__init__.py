"""hvstack: the Hyper-V virtualization stack rebuilt for Linux hosts on KVM/QEMU."""

__version__ = "0.1.0"
