"""``python -m wsireg_cli``: the ``wsireg`` command."""

from wsireg_cli.main import main

main()
