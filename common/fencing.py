"""The shard epoch that travels with a write, gateway -> booking service (fencing layer 3).

A gateway sends, with every write, the epoch of the shard record it routed by
(`X-Boxoffice-Epoch`). The booking service refuses an epoch lower than its own
map's (503 `stale-epoch`: the gateway's map is behind, it retries once its map
moves on) and passes the higher of the two to the database, whose epoch row has
the last word (503 `fenced`). See docs/failover.md.
"""

from __future__ import annotations

import re

EPOCH_HEADER = "X-Boxoffice-Epoch"
MAX_EPOCH = 2**63 - 1  # the epoch row is a bigint
_DIGITS = re.compile(r"^[0-9]{1,19}$")


def parse_epoch(raw: str | None) -> int | None:
    """The epoch a header carries; None when absent. ValueError when it is not a
    non-negative integer that fits the epoch row."""
    if raw is None:
        return None
    if not _DIGITS.match(raw) or int(raw) > MAX_EPOCH:
        raise ValueError(f"{EPOCH_HEADER} is not an epoch")
    return int(raw)
