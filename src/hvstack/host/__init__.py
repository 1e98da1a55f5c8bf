"""The host service: composition root, store and its typed records, jobs, events, the
VM registry and provisioning, disk, guest and console operations, access (tokens, TLS,
file permissions) and the clean-up after a crash."""
