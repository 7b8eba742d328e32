"""Serial number arithmetic for TSNs (32 bits) and stream sequence numbers (16 bits).

RFC 9260 section 1.6 / RFC 1982: ``a`` is "less than" ``b`` when ``b`` is ahead of ``a`` by
less than half the number space.  Plain ints, no wrapper objects: these run per chunk.
"""

from __future__ import annotations

TSN_MOD = 1 << 32
TSN_MASK = TSN_MOD - 1
_TSN_HALF = 1 << 31
SSN_MOD = 1 << 16
SSN_MASK = SSN_MOD - 1
_SSN_HALF = 1 << 15


def tsn_add(a: int, n: int) -> int:
    """``a + n`` modulo 2**32."""
    return (a + n) & TSN_MASK


def tsn_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` in serial arithmetic (in [-2**31, 2**31))."""
    d = (a - b) & TSN_MASK
    return d - TSN_MOD if d >= _TSN_HALF else d


def tsn_lt(a: int, b: int) -> bool:
    """``a`` comes before ``b``."""
    return a != b and ((b - a) & TSN_MASK) < _TSN_HALF


def tsn_le(a: int, b: int) -> bool:
    """``a`` comes before ``b`` or is ``b``."""
    return ((b - a) & TSN_MASK) < _TSN_HALF


def tsn_gt(a: int, b: int) -> bool:
    """``a`` comes after ``b``."""
    return tsn_lt(b, a)


def tsn_ge(a: int, b: int) -> bool:
    """``a`` comes after ``b`` or is ``b``."""
    return tsn_le(b, a)


def ssn_add(a: int, n: int) -> int:
    """``a + n`` modulo 2**16."""
    return (a + n) & SSN_MASK


def ssn_lt(a: int, b: int) -> bool:
    """Stream sequence number ``a`` comes before ``b``."""
    return a != b and ((b - a) & SSN_MASK) < _SSN_HALF


def ssn_le(a: int, b: int) -> bool:
    """Stream sequence number ``a`` comes before ``b`` or is ``b``."""
    return ((b - a) & SSN_MASK) < _SSN_HALF
