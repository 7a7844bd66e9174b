"""``python -m drpipe``: the same as the ``drpipe`` command."""

from drpipe.cli import run

run()
