"""Hold-downs: a host a drill lost stays lost until the drill restores it.

A drill that kills a host by signal (SIGKILL of its node agent: the agent's Postgres
servers and booking service die with it) must keep whatever supervises the host's
processes from starting it again behind the drill's back; otherwise the old primary
may be back, still named primary by the map, before any controller confirmed the
failure, and whether the drill sees a failover depends on that race. The contract:

- Before the fault the drill writes a marker, `hold-down/<host slug>.json` in the
  supervisor's state directory (for the local cluster, the state directory of
  `boxoffice up`, beside its cluster.json). The marker comes first, so there is no
  moment when the supervisor sees the host dead and no marker.
- The supervisor does not start a held host's processes again (`boxoffice up`'s
  restart loop: `deploy.cluster.Cluster.restart_dead`).
- The drill removes the marker when it restores the host (and on every way out of the
  drill, a failed one included); the supervisor's next round starts the host again.
- A marker names its holder's process id. A marker whose holder is gone (the drill was
  killed before it could restore) is stale: `held` ignores and removes it, so a host is
  never left down by a drill that no longer runs. The holder and the supervisor run on
  one machine (the local cluster); the check is `/proc/<pid>` of that machine.

The gateway's drill (`POST /admin/drills/failover`) needs no marker: it crashes a host
through its node agent's drill primitive (`/agent/drill/crash`), the agent itself stays
up and keeps the host's servers down until `/agent/drill/recover`, so no supervisor
sees anything exit. Shown by tests/test_drill.py
`test_kill_primary_drill_with_the_controller` (the up loop running beside the drill).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

DIRECTORY = "hold-down"


def _slug(host: str) -> str:
    return host.replace("/", "-")


def marker(state_dir: Path, host: str) -> Path:
    return state_dir / DIRECTORY / f"{_slug(host)}.json"


def hold(state_dir: Path, host: str, holder: int | None = None, why: str = "drill") -> Path:
    """Hold `host` down for the process `holder` (default: this one); the marker's path."""
    path = marker(state_dir, host)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"host": host, "holder": holder or os.getpid(), "why": why, "since": time.time()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)  # whole or absent: a supervisor never reads half a marker
    return path


def release(state_dir: Path, host: str) -> bool:
    """Remove `host`'s marker; False when there was none. Idempotent."""
    try:
        marker(state_dir, host).unlink()
    except FileNotFoundError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def held(state_dir: Path) -> dict[str, dict[str, object]]:
    """The hosts held down now, with their markers; stale markers (holder gone, or
    unreadable) are removed and not returned."""
    found: dict[str, dict[str, object]] = {}
    directory = state_dir / DIRECTORY
    if not directory.is_dir():
        return found
    for path in directory.glob("*.json"):
        try:
            doc = json.loads(path.read_text())
            host, holder = str(doc["host"]), int(doc["holder"])
        except FileNotFoundError:
            continue  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            host, holder = "", 0
        if host and _alive(holder):
            found[host] = doc
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return found
