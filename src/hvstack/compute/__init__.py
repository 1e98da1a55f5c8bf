"""Compute: the VM model, its state machine, the settings a state allows to change,
pure power policy, the machine description built from a VM's settings, and its
lifecycle."""
