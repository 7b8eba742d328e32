"""mvpd: the mvp-agent daemon and library."""
