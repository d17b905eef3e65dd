"""``python -m sandboxctl.cli``: the command line, as the ``sandboxctl`` script runs it."""

from sandboxctl.cli.fast import main

main()
