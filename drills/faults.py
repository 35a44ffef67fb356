"""The nemesis's faults: each kind an inject and its heal (after Jepsen's nemesis).

A fault is planned ahead (`FaultPlan`: kind, when, how long, which shard's copy it aims
at) from the drill's seeded random source, and resolved against the map only when it
strikes: `role` "primary" is the shard's primary of that moment, "standby" the `pick`-th
of its other copies (sorted by key). So a seed replays the same faults at the same
moments, aimed the same way; which host that is depends on the map then, and is
printed.

Kinds (`FAULTS`):
- `kill-runner`: SIGKILL the round's operation runner (a `boxoffice` subprocess);
- `pause-runner`: SIGSTOP it past its lease (`duration` > twice the 5 s lease TTL),
  then SIGCONT: a frozen VM waking up; it must be able to change nothing;
- `kill-agent`: SIGKILL a host's node agent (its Postgres servers and booking service
  die with it); the heal starts it again (the launcher's `restart`; `boxoffice up`
  restarts it within a second by itself);
- `kill-postgres`: SIGKILL a copy's postmaster; its node agent starts it again;
- `kill-service`: SIGKILL a host's booking service; its node agent starts it again;
- `kill-controller`: SIGKILL the controller holding the lock (one of them if none
  says so); the heal starts it again (as for agents);
- `pause-walreceiver`: SIGSTOP a standby copy's WAL receiver, then SIGCONT: a standby
  of the synchronous set stops confirming;
- `restart-consul`: stop Consul and start it again after `duration` where the drill
  owns it (a test's cluster); under `boxoffice up`, which would not start it again,
  SIGSTOP it for `duration` then SIGCONT (said in the round's line);
- `cut-host`: cut every delay-proxy link of a host (drills/places.py), then heal them.

The nemesis remembers everything it stopped, cut or killed, so that `heal_all` undoes
every fault whatever happened to the round (SIGCONT, `heal` of the links, Consul
started or continued, the launcher's dead processes started again). A fault whose
target is absent (no runner, no WAL receiver, the agent down already) is skipped and
says why; a skip is not a failure.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from drills.places import PlaceError, Places, signal_pid
from region_map import Shard

FAULTS = ("kill-runner", "pause-runner", "kill-agent", "kill-postgres", "kill-service",
          "kill-controller", "pause-walreceiver", "restart-consul", "cut-host")
RUNNER_FAULTS = ("kill-runner", "pause-runner")


class Skipped(Exception):
    """The fault had nothing to strike (its reason)."""


@dataclass(frozen=True)
class FaultPlan:
    kind: str
    at: float  # seconds after the round starts (runner faults: after the runner started)
    duration: float  # seconds until its own heal
    shard: str
    role: str  # "primary" or "standby"
    pick: int  # which standby (index into the other copies, sorted)

    def describe(self) -> str:
        aim = "runner" if self.kind in RUNNER_FAULTS else f"{self.shard} {self.role}" + (
            f"#{self.pick}" if self.role == "standby" else "")
        return f"{self.kind} ({aim}) at +{self.at:.1f}s for {self.duration:.1f}s"


class Runner(Protocol):
    """The round's operation runner, as a fault sees it."""

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...


class ConsulControl(Protocol):
    def stop(self) -> None: ...

    def start(self) -> None: ...


Heal = Callable[[], Awaitable[str]]


@dataclass
class Nemesis:
    places: Places
    restart: Callable[[], list[str]]  # the launcher's dead processes started again; their names
    consul: ConsulControl | None  # None: Consul is paused, not restarted
    admin_token: str
    stopped: dict[int, str] = field(default_factory=dict)  # SIGSTOPped pid -> what
    cut: set[int] = field(default_factory=set)
    consul_down: bool = False

    def target(self, plan: FaultPlan, shard: Shard) -> str:
        if plan.role == "primary":
            return shard.primary_copy
        others = sorted(k for k in shard.members if k != shard.primary_copy)
        if not others:
            raise Skipped(f"{shard.name} has no standby")
        return others[plan.pick % len(others)]

    async def inject(self, plan: FaultPlan, shard: Shard, runner: Runner | None) -> tuple[str, Heal]:
        """Strike; what was done, and the heal to call `plan.duration` later."""
        kind = plan.kind
        if kind in RUNNER_FAULTS:
            if runner is None or runner.pid is None or not runner.running:
                raise Skipped("no operation runner is running")
            runner_pid = runner.pid
            if kind == "kill-runner":
                signal_pid(runner_pid, signal.SIGKILL)
                return f"SIGKILL operation runner pid {runner_pid}", _nothing("nothing to heal")
            return self._pause(runner_pid, f"operation runner pid {runner_pid}")
        if kind == "kill-controller":
            return await self.kill_controller()
        if kind == "restart-consul":
            return await self._consul()
        host = self.target(plan, shard)
        if kind == "kill-agent":
            pid = self.places.agent_pid(host)
            if pid is None:
                raise Skipped(f"the node agent of {host} is not running")
            signal_pid(pid, signal.SIGKILL)
            return f"SIGKILL node agent of {host} (pid {pid})", self._restart_heal()
        if kind == "kill-postgres":
            pid = self.places.postmaster_pid(shard.name, host)
            if pid is None:
                raise Skipped(f"the postmaster of {shard.name}@{host} is not running")
            signal_pid(pid, signal.SIGKILL)
            return (f"SIGKILL postmaster of {shard.name}@{host} (pid {pid})",
                    _nothing("its node agent starts it again"))
        if kind == "kill-service":
            pid = self.places.service_pid(host)
            if pid is None:
                raise Skipped(f"the booking service of {host} is not running")
            signal_pid(pid, signal.SIGKILL)
            return (f"SIGKILL booking service of {host} (pid {pid})",
                    _nothing("its node agent starts it again"))
        if kind == "pause-walreceiver":
            if host == shard.primary_copy:
                raise Skipped(f"{shard.name}@{host} is the primary")
            pid = self.places.walreceiver_pid(shard.name, host)
            if pid is None:
                raise Skipped(f"{shard.name}@{host} has no WAL receiver running")
            return self._pause(pid, f"WAL receiver of {shard.name}@{host} (pid {pid})")
        if kind == "cut-host":
            ports = await asyncio.to_thread(self.places.host_links, host)
            await asyncio.to_thread(self.places.proxy, "cut " + " ".join(map(str, ports)))
            self.cut |= set(ports)

            async def heal_links() -> str:
                await asyncio.to_thread(self.places.proxy, "heal " + " ".join(map(str, ports)))
                self.cut -= set(ports)
                return f"healed {host}'s links"
            return f"cut {host}'s {len(ports)} links", heal_links
        raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(FAULTS)})")

    def _pause(self, pid: int, what: str) -> tuple[str, Heal]:
        if not signal_pid(pid, signal.SIGSTOP):
            raise Skipped(f"{what} exited")
        self.stopped[pid] = what

        async def resume() -> str:
            self.stopped.pop(pid, None)
            return f"SIGCONT {what}" if signal_pid(pid, signal.SIGCONT) else f"{what} is gone"
        return f"SIGSTOP {what}", resume

    async def kill_controller(self) -> tuple[str, Heal]:
        pids = self.places.controller_pids()
        if not pids:
            raise Skipped("no controller is running")
        active = await self.active_controller()
        region = active if active in pids else sorted(pids)[0]
        signal_pid(pids[region], signal.SIGKILL)
        return (f"SIGKILL controller[{region}] (pid {pids[region]}"
                f"{', holding the lock' if region == active else ''})", self._restart_heal())

    async def active_controller(self) -> str | None:
        import aiohttp

        from common.internal_auth import Signer

        # /status answers a gateway's or the operator's signed request only.
        signer = Signer.operator(self.admin_token, "chaos-drill")
        async with aiohttp.ClientSession() as http:
            for region, url in (self.places.state.get("controllers") or {}).items():
                status_url = f"{url}/status"
                try:
                    async with http.get(status_url, headers=signer.sign("GET", status_url),
                                        timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        doc: Any = await resp.json(content_type=None)
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    continue
                if isinstance(doc, dict) and doc.get("active"):
                    return str(region)
        return None

    async def _consul(self) -> tuple[str, Heal]:
        if self.consul is None:
            pid = self.places.consul_pid()
            if pid is None:
                raise Skipped("Consul is not running")
            return self._pause(pid, f"Consul (pid {pid}; `up` would not restart it, so paused)")
        consul = self.consul
        await asyncio.to_thread(consul.stop)
        self.consul_down = True

        async def start() -> str:
            await asyncio.to_thread(consul.start)
            self.consul_down = False
            return "Consul started again"
        return "stopped Consul", start

    def _restart_heal(self) -> Heal:
        async def heal() -> str:
            names = await asyncio.to_thread(self.restart)
            return f"started {', '.join(names)} again" if names else "the launcher restarts it"
        return heal

    async def heal_all(self) -> list[str]:
        """Undo every fault still in force; what was done."""
        done = []
        for pid, what in list(self.stopped.items()):
            if signal_pid(pid, signal.SIGCONT):
                done.append(f"SIGCONT {what}")
        self.stopped.clear()
        try:
            await asyncio.to_thread(self.places.proxy, "heal all")
            if self.cut:
                done.append(f"healed {len(self.cut)} cut links")
            self.cut.clear()
        except (OSError, PlaceError) as exc:
            done.append(f"the delay proxy did not answer ({exc})")
        if self.consul_down and self.consul is not None:
            await asyncio.to_thread(self.consul.start)
            self.consul_down = False
            done.append("Consul started again")
        names = await asyncio.to_thread(self.restart)
        if names:
            done.append(f"started {', '.join(names)} again")
        return done


def _nothing(why: str) -> Heal:
    async def heal() -> str:
        return why
    return heal
