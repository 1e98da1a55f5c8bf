"""The host service: composition root, store, jobs, events and the VM registry."""
