"""CRC32c (Castagnoli), the SCTP packet checksum (RFC 9260 appendix B).

Uses ``google_crc32c``'s C implementation (installed with aiortc); falls back to a small
table-driven pure-Python version if that import fails.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["crc32c", "crc32c_extend"]


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c_extend_python(crc: int, data: bytes) -> int:
    """CRC32c of the bytes hashed into ``crc`` followed by ``data``, in pure Python."""
    crc ^= 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c_python(data: bytes) -> int:
    """CRC32c of ``data`` in pure Python (slow; the fallback)."""
    return crc32c_extend_python(0, data)


def _load() -> tuple[Callable[[bytes], int], Callable[[int, bytes], int]]:
    try:
        import google_crc32c
    except ImportError:  # pragma: no cover - depends on the environment
        return crc32c_python, crc32c_extend_python
    value: Callable[[bytes], int] = google_crc32c.value
    extend: Callable[[int, bytes], int] = google_crc32c.extend
    return value, extend


#: ``crc32c(data)``: the checksum of ``data`` (bytes).
#: ``crc32c_extend(crc, data)``: the checksum of what ``crc`` covered followed by ``data``.
crc32c, crc32c_extend = _load()
