"""Operator work on events: create one on a shard, list them, move one to another shard.

The admin HTTP API (gateway/events_api.py) and the CLI (`boxoffice event ...`) both
run these functions: the same code, whichever surface the operator uses. They reach
booking services through `ShardAdmin` (shard_service holds every line of booking SQL)
and the region map through `region_map.MapStore`.
"""
