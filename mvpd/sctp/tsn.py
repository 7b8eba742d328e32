"""Serial number arithmetic for TSNs (32 bits) and stream sequence numbers (16 bits).

RFC 9260 section 1.6 / RFC 1982: ``a`` is "less than" ``b`` when ``b`` is ahead of ``a`` by
less than half the number space.  Plain ints, no wrapper objects: these run per chunk (the
hottest paths inline the same arithmetic with :data:`TSN_MASK`).
"""

from __future__ import annotations

TSN_MASK = (1 << 32) - 1
_TSN_HALF = 1 << 31
SSN_MASK = (1 << 16) - 1
_SSN_HALF = 1 << 15


def tsn_lt(a: int, b: int) -> bool:
    """TSN ``a`` comes before ``b``."""
    return a != b and ((b - a) & TSN_MASK) < _TSN_HALF


def tsn_le(a: int, b: int) -> bool:
    """TSN ``a`` comes before ``b`` or is ``b``."""
    return ((b - a) & TSN_MASK) < _TSN_HALF


def ssn_lt(a: int, b: int) -> bool:
    """Stream sequence number ``a`` comes before ``b``."""
    return a != b and ((b - a) & SSN_MASK) < _SSN_HALF


def ssn_le(a: int, b: int) -> bool:
    """Stream sequence number ``a`` comes before ``b`` or is ``b``."""
    return ((b - a) & SSN_MASK) < _SSN_HALF
