"""mvpctl: the command-line client of mvpd (``app``: the commands; ``client``: the control
socket client). It imports only :mod:`mvpd.proto` from the daemon, so that it starts fast."""
