"""Drills: faults caused on purpose, under booking load, and what they left behind.

- `drills.places`: where the cluster's processes are (its state directory and /proc).
- `drills.faults`: the nemesis's fault kinds, each one an inject and a heal.
- `drills.schedule`: the chaos drill's seeded schedule of operations and faults.
- `drills.runner`: an operation runner, a `boxoffice` subprocess a fault can kill or pause.
- `drills.checks`: what must hold once every fault is healed.
- `drills.chaos`: `boxoffice drill chaos`, the rounds, the heal, the checks, the verdict.

The failover drill (one fault, measured) is failover/drill.py for now.
"""
