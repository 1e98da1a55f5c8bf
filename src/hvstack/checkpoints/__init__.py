"""Checkpoints: a tree per VM of disk states (qcow2 differencing disks) and, for
standard checkpoints, memory and device states; see :mod:`hvstack.checkpoints.model`."""
