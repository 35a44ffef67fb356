"""PostgreSQL WAL positions (LSNs, `X/Y`: two 32-bit halves in hexadecimal) as integers,
to compare them."""

from __future__ import annotations

import re

_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def lsn_to_int(lsn: str) -> int:
    """`'16/B374D848'` as an integer; ValueError when it is not an LSN (signs, spaces and
    halves wider than 32 bits included)."""
    match = _LSN.fullmatch(lsn)
    if match is None:
        raise ValueError(f"not an LSN: {lsn[:40]!r}")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def optional_lsn_to_int(lsn: str | None) -> int | None:
    """An LSN a server may not report (a standby's flush position, say): None stays None."""
    return lsn_to_int(lsn) if lsn else None
