"""The chaos drill's schedule: every choice and timing from one seeded source.

`plan_rounds(seed, settings, shards)` yields the rounds in order, each drawn from one
`random.Random(seed)`: its operation (kind, when, which shard, which standby or event,
which other shard) and its faults (kind, when, how long, aimed at which shard's
primary or which standby). The same seed and the same shard names give the same
schedule, whether the drill runs for N rounds or M minutes; the choices are abstract
(an index into the candidates of that moment), resolved against the map when they
strike. Timings:

- an operation starts 0-2 s into its round;
- a fault on the runner strikes 0.3-2 s after the runner started (while it works);
  any other fault within the first 60 % of the round (`pause-walreceiver` always at a
  standby: a primary has none);
- `pause-runner` lasts 2 x the lease TTL + 5-15 s (past its lease, long enough for the
  controller to find the operation abandoned and act on it), `kill-runner` has
  no duration, every other fault lasts 2-8 s before its own heal.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from drills.faults import FAULTS, RUNNER_FAULTS, FaultPlan
from failover.lease import LEASE_TTL

OPERATIONS = ("switchover", "move", "create", "kill-controller")


class ChaosError(Exception):
    """The drill could not start (the cluster is not at full strength, a bad setting)."""


@dataclass(frozen=True)
class ChaosSettings:
    seed: int
    rounds: int | None = None  # stop after this many rounds ...
    minutes: float | None = None  # ... or start none after this long (one of the two)
    faults: tuple[str, ...] = FAULTS
    operations: tuple[str, ...] = OPERATIONS
    round_seconds: float = 15.0
    max_faults: int = 2
    heal_bound: float = 90.0  # seconds after a heal for every shard to take a booking
    op_timeout: float = 150.0  # seconds after the round's heal a runner may still take
    movable_per_shard: int = 1
    clients_per_gateway: int = 1  # per event
    rate_per_client: float = 2.0  # bookings per second

    def check(self) -> None:
        unknown = set(self.faults) - set(FAULTS) | set(self.operations) - set(OPERATIONS)
        if unknown:
            raise ChaosError(f"unknown fault or operation: {', '.join(sorted(unknown))} "
                             f"(faults: {', '.join(FAULTS)}; operations: {', '.join(OPERATIONS)})")
        if not self.operations and not self.faults:
            raise ChaosError("nothing to do: no operation and no fault")


@dataclass(frozen=True)
class OpPlan:
    kind: str
    at: float  # seconds after the round starts
    shard: str  # switchover: the shard; create: where to place it
    pick: int  # switchover: which synchronous standby; move: which movable event
    pick2: int  # move: which other shard


@dataclass(frozen=True)
class RoundPlan:
    n: int
    op: OpPlan | None
    faults: tuple[FaultPlan, ...]


def plan_rounds(seed: int, s: ChaosSettings, shards: list[str]) -> Iterator[RoundPlan]:
    """The schedule: every round drawn from one seeded source, in order (module docstring)."""
    rng = random.Random(seed)
    n = 0
    while True:
        n += 1
        op = None
        if s.operations:
            kind = rng.choice(s.operations)
            op = OpPlan(kind, round(rng.uniform(0, 2), 2), rng.choice(shards), rng.randrange(1000),
                        rng.randrange(1000))
        runner = op is not None and op.kind != "kill-controller"
        menu = [f for f in s.faults if runner or f not in RUNNER_FAULTS]
        faults = []
        for _ in range(rng.randint(1, s.max_faults) if menu else 0):
            kind = rng.choice(menu)
            if kind in RUNNER_FAULTS:
                at = rng.uniform(0.3, 2.0)  # after the runner started: while it works
            else:
                at = rng.uniform(0, s.round_seconds * 0.6)
            duration = (2 * LEASE_TTL + rng.uniform(5, 15) if kind == "pause-runner" else
                        0.0 if kind == "kill-runner" else rng.uniform(2, 8))
            shard, role, pick = rng.choice(shards), rng.choice(("primary", "standby")), rng.randrange(1000)
            if kind == "pause-walreceiver":
                role = "standby"  # a primary has no WAL receiver
            faults.append(FaultPlan(kind, round(at, 2), round(duration, 2), shard, role, pick))
        yield RoundPlan(n, op, tuple(faults))
