"""Read-your-writes tokens: the commit position of a client's last write, per shard,
with the shard epoch it was written under.

The token travels as a cookie (browsers carry it to every region of the same
domain) and as a response header API clients may echo. It is authenticated:
a gateway waits for a replica, or reads a primary across regions, only for a
position some gateway of this platform handed out. Format (no characters that
need quoting in a cookie):

    v2:<mac>:<positions>     positions = `shard-1=0/3000060@4.shard-2=0/1A2B3C@1`

Each entry is `<shard>=<LSN>@<epoch>`: the WAL position of the write and the shard
epoch the gateway routed it by (the database refuses a write under any epoch but its
own, so the write is in the history of that epoch's primary). An LSN alone names no
history: after a failover the old primary's WAL runs on past the fork with commits
the new primary never had, and its positions compare as "ahead" of positions the new
primary hands out. So a copy serves a token's entry only when its database's epoch row
is at least the entry's epoch (shard_service/roles.py `epoch_refusal`): a copy on an
older epoch's history never satisfies a token.

`mac` is HMAC-SHA256 over `v2:<positions>` with the secret every gateway shares
(`BOXOFFICE_TOKEN_SECRET`; `boxoffice up` generates one), base64url, 128 bits.
A token that is malformed, too long, not ASCII, or whose MAC does not verify is
ignored as a whole: the read is served as for a client without a token (never an
error, never a wait), so a forged token costs no more than no token.

`v1:<mac>:<positions>` (entries `<shard>=<LSN>`, MAC over `v1:<positions>`), the
format before epochs, is still accepted, with epoch 0 for each entry (it asks for a
position only; the copy's role still has to be primary or replica, which an old
primary never is), and a gateway hands back v2.
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
VERSION = "v2"
V1 = "v1"
MAX_SHARDS_IN_TOKEN = 64
MAX_TOKEN_LENGTH = 4096  # 64 shards of 64-character names fit; longer is not ours
MAX_EPOCH = 2**63 - 1
MAC_BYTES = 16
_LSN = r"([0-9A-F]{1,8})/([0-9A-F]{1,8})"
_ENTRIES = {
    VERSION: re.compile(rf"^([A-Za-z0-9_-]{{1,64}})={_LSN}@(0|[1-9][0-9]{{0,18}})$"),
    V1: re.compile(rf"^([A-Za-z0-9_-]{{1,64}})={_LSN}$"),
}


def _mac(secret: bytes, positions: str, version: str = VERSION) -> str:
    digest = hmac.new(secret, f"{version}:{positions}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:MAC_BYTES]).decode().rstrip("=")


@dataclass
class ConsistencyToken:
    positions: dict[str, int] = field(default_factory=dict)  # shard -> LSN
    epochs: dict[str, int] = field(default_factory=dict)  # shard -> epoch (absent: 0)

    @classmethod
    def parse(cls, raw: str | None, secret: bytes) -> ConsistencyToken:
        """The token's entries if `raw` is a token signed with `secret`; else empty."""
        token = cls()
        if not raw or len(raw) > MAX_TOKEN_LENGTH or not raw.isascii():
            return token
        version, _, rest = raw.partition(":")
        mac, _, positions = rest.partition(":")
        entry = _ENTRIES.get(version)
        if entry is None or not positions:
            return token
        if not hmac.compare_digest(mac.encode(), _mac(secret, positions, version).encode()):
            return token
        parts = positions.split(".")
        if len(parts) > MAX_SHARDS_IN_TOKEN:
            return token
        for part in parts:
            match = entry.match(part)
            if match is None:  # we never sign such a thing: the whole token is suspect
                return cls()
            shard, high, low, *epoch = match.groups()
            value = int(epoch[0]) if epoch else 0
            if value > MAX_EPOCH:
                return cls()
            token.advance(shard, lsn_to_int(f"{high}/{low}"), value)
        return token

    def merge(self, other: ConsistencyToken) -> ConsistencyToken:
        merged = ConsistencyToken(dict(self.positions), dict(self.epochs))
        for shard, pos in other.positions.items():
            merged.advance(shard, pos, other.epoch(shard))
        return merged

    def advance(self, shard: str, position: int, epoch: int = 0) -> None:
        """Keep the later of the entry held and (`epoch`, `position`): a later epoch wins
        whatever its LSN (a write confirmed under an earlier epoch is in the history of
        every later one), within one epoch the higher LSN."""
        held = self.positions.get(shard)
        if held is None or (epoch, position) > (self.epoch(shard), held):
            self.positions[shard] = position
            self.epochs[shard] = epoch

    def position(self, shard: str) -> str | None:
        pos = self.positions.get(shard)
        return int_to_lsn(pos) if pos is not None else None

    def epoch(self, shard: str) -> int:
        return self.epochs.get(shard, 0)

    def serialize(self, secret: bytes) -> str:
        positions = ".".join(f"{s}={int_to_lsn(p)}@{self.epoch(s)}"
                             for s, p in sorted(self.positions.items()))
        return f"{VERSION}:{_mac(secret, positions)}:{positions}"

    def __bool__(self) -> bool:
        return bool(self.positions)
