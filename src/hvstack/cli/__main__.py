"""``python -m hvstack.cli``: the same as ``hv``."""

from hvstack.cli.main import run

run()
