"""The QEMU driver: a pure argv builder, process control and the QMP monitor."""
