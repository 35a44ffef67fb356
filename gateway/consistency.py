"""Read-your-writes tokens: the commit position of a client's last write, per shard.

The token travels as a cookie (browsers carry it to every region of the same
domain) and as a response header API clients may echo. It is authenticated:
a gateway waits for a replica, or reads a primary across regions, only for a
position some gateway of this platform handed out. Format (no characters that
need quoting in a cookie):

    v1:<mac>:<positions>     positions = `shard-1=0/3000060.shard-2=0/1A2B3C`

`mac` is HMAC-SHA256 over `v1:<positions>` with the secret every gateway shares
(`BOXOFFICE_TOKEN_SECRET`; `boxoffice up` generates one), base64url, 128 bits.
A token that is malformed, too long, or whose MAC does not verify is ignored as
a whole: the read is served as for a client without a token (never an error,
never a wait), so a forged token costs no more than no token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field

from common.lsn import int_to_lsn, lsn_to_int

COOKIE_NAME = "boxoffice_ct"
HEADER_NAME = "X-Consistency-Token"
VERSION = "v1"
MAX_SHARDS_IN_TOKEN = 64
MAX_TOKEN_LENGTH = 4096  # 64 shards of 64-character names fit; longer is not ours
MAC_BYTES = 16
_ENTRY = re.compile(r"^([A-Za-z0-9_-]{1,64})=([0-9A-F]{1,8})/([0-9A-F]{1,8})$")


def _mac(secret: bytes, positions: str) -> str:
    digest = hmac.new(secret, f"{VERSION}:{positions}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:MAC_BYTES]).decode().rstrip("=")


@dataclass
class ConsistencyToken:
    positions: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: str | None, secret: bytes) -> ConsistencyToken:
        """The token's positions if `raw` is a token signed with `secret`; else empty."""
        token = cls()
        if not raw or len(raw) > MAX_TOKEN_LENGTH:
            return token
        version, _, rest = raw.partition(":")
        mac, _, positions = rest.partition(":")
        if version != VERSION or not positions:
            return token
        if not hmac.compare_digest(mac.encode(), _mac(secret, positions).encode()):
            return token
        parts = positions.split(".")
        if len(parts) > MAX_SHARDS_IN_TOKEN:
            return token
        for part in parts:
            match = _ENTRY.match(part)
            if match is None:  # we never sign such a thing: the whole token is suspect
                return cls()
            shard, high, low = match.groups()
            token.advance(shard, lsn_to_int(f"{high}/{low}"))
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

    def serialize(self, secret: bytes) -> str:
        positions = ".".join(f"{s}={int_to_lsn(p)}" for s, p in sorted(self.positions.items()))
        return f"{VERSION}:{_mac(secret, positions)}:{positions}"

    def __bool__(self) -> bool:
        return bool(self.positions)
