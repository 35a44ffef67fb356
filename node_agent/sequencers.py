"""The node agent's lease fence: the newest sequencer it has seen per lease.

A promotion or switchover runs under the shard's lease (failover/lease.py) and sends
its sequencer with every primitive that changes a server (promote, repoint, sync set,
epoch row, rewind, stop, start): `X-Boxoffice-Sequencer: <lock>:<n>`
(common/sequencer.py). The agent keeps the newest number per lock and refuses a
primitive that carries an older one (409 `stale-sequencer`, nothing done): its runner
lost the lease (paused past it), and another runner has taken the lock since and
stepped here. A primitive without the header (the agent's own supervision, an
operator's call by hand) is not fenced this way.

Rules:
- The newest numbers are kept in a small JSON file of the agent's own (in its log
  directory: a standby's database is read-only, so it cannot hold them), written
  (fsync, then an atomic rename) before the primitive runs, so an agent restarted
  after answering still refuses the older runner.
- The check is made as the primitive starts: a primitive of the older runner already
  running when the newer one's first step arrives is not stopped by it.
- An unreadable file is treated as empty and logged: the fence then starts again from
  the next sequencer seen (the database's epoch fence still holds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from common.problems import Problem
from common.sequencer import SEQUENCER_HEADER, parse_fence

log = logging.getLogger("boxoffice.node_agent")


class SequencerFence:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._newest: dict[str, int] | None = None
        self._lock = asyncio.Lock()

    def _load(self) -> dict[str, int]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("sequencer file unreadable: starting empty",
                        extra={"path": str(self.path), "error": str(exc)})
            return {}
        if not isinstance(doc, dict):
            return {}
        return {str(k): int(v) for k, v in doc.items() if isinstance(v, int)}

    def _store(self, newest: dict[str, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(newest, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    async def check(self, header: str | None) -> None:
        """Let a primitive carrying `header` (the raw header value) go on, or raise the
        problem that refuses it."""
        try:
            fence = parse_fence(header)
        except ValueError:
            raise Problem(400, "invalid-sequencer",
                          f"{SEQUENCER_HEADER} is not <lock>:<sequencer>.") from None
        if fence is None:
            return
        lock, sequencer = fence
        async with self._lock:
            if self._newest is None:
                self._newest = await asyncio.to_thread(self._load)
            newest = self._newest.get(lock, 0)
            if sequencer < newest:
                raise Problem(409, "stale-sequencer",
                              f"The lease {lock} has been taken since this runner took it "
                              f"(sequencer {sequencer}, newest {newest}): nothing was done.",
                              sequencer=sequencer, newest=newest)
            if sequencer > newest:
                updated = {**self._newest, lock: sequencer}
                await asyncio.to_thread(self._store, updated)
                self._newest = updated
