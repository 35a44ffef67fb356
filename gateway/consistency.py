"""Read-your-writes tokens: the commit position of a client's last write, per shard.

The token travels as a cookie (browsers carry it to every region of the same
domain) and as a response header API clients may echo. Format:
`shard-1=0/3000060.shard-2=0/1A2B3C` (no characters that need quoting).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

COOKIE_NAME = "boxoffice_ct"
HEADER_NAME = "X-Consistency-Token"
_ENTRY = re.compile(r"^([A-Za-z0-9_-]{1,64})=([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
MAX_SHARDS_IN_TOKEN = 64


def lsn_to_int(lsn: str) -> int:
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


@dataclass
class ConsistencyToken:
    positions: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: str | None) -> ConsistencyToken:
        """Parse leniently: a malformed entry is ignored (a stale cookie must not break reads)."""
        token = cls()
        if not raw:
            return token
        for part in raw.split(".")[:MAX_SHARDS_IN_TOKEN]:
            match = _ENTRY.match(part.strip())
            if match:
                shard, high, low = match.groups()
                token.advance(shard, (int(high, 16) << 32) | int(low, 16))
        return token

    def merge(self, other: ConsistencyToken) -> ConsistencyToken:
        merged = ConsistencyToken(dict(self.positions))
        for shard, pos in other.positions.items():
            merged.advance(shard, pos)
        return merged

    def advance(self, shard: str, position: int) -> None:
        if position > self.positions.get(shard, -1):
            self.positions[shard] = position

    def position(self, shard: str) -> str | None:
        pos = self.positions.get(shard)
        return int_to_lsn(pos) if pos is not None else None

    def serialize(self) -> str:
        return ".".join(f"{s}={int_to_lsn(p)}" for s, p in sorted(self.positions.items()))

    def __bool__(self) -> bool:
        return bool(self.positions)
