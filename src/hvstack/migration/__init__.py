"""Live migration between host services: decisions as pure functions.

:mod:`hvstack.migration.convergence` decides, from one sample of a running migration,
what to change next (downtime limit steps, auto-converge, post-copy);
:mod:`hvstack.migration.compatibility` decides from the source VM's needs and the
destination host's facts whether a move can work, with every reason it cannot. Nothing
here does I/O; the host's migration operations (a later change) read QEMU and the peer,
call these and act.
"""
