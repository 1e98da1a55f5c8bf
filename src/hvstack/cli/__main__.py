"""``python -m hvstack.cli``: the same as ``hv``."""

from hvstack.cli.entry import run

run()
