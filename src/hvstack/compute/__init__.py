"""Compute: the VM model, its state machine and its lifecycle."""
