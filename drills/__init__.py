"""Drills: faults caused on purpose, under booking load, and what they left behind.

- `drills.places`: where the cluster's processes are (its state directory and /proc).
- `drills.faults`: the nemesis's fault kinds, each one an inject and a heal.
- `drills.checks`: what must hold once every fault is healed.
- `drills.chaos`: `boxoffice drill chaos`, random operations and faults in seeded rounds.

The failover drill (one fault, measured) is failover/drill.py for now.
"""
