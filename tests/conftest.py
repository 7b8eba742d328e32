"""Settings for the whole test suite."""

from __future__ import annotations

import mvpd.peer

# A peer session event that its state table refuses is a bug: make it raise in tests (in
# production it is logged and ignored).
mvpd.peer.strict_transitions = True
