"""Dynamic memory: what each VM should be given, decided by pure functions.

:mod:`hvstack.memory.model` holds the data a balancing round works on, and
:mod:`hvstack.memory.policy` the decisions (targets by demand, buffer and weight; the
memory status; admission of a starting VM). Nothing here does I/O: the host's balancer
(:mod:`hvstack.host.memory_balancer`) reads the guests, calls the policy and applies it.
"""
