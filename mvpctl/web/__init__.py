"""``mvpctl web``: a local page showing the daemon (see :mod:`mvpctl.web.server`)."""
