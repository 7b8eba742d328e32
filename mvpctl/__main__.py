"""``python -m mvpctl``: the same as the ``mvpctl`` command."""

from mvpctl.app import main

main()
