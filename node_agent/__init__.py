"""The node agent: one process per region (per host in production) that owns the
region's Postgres servers and its booking-service process.

It keeps every copy running in the role the region map gives it (restart, rewind,
demotion of a primary the map no longer names) and offers the failover controller's
primitives over an operator-authenticated HTTP API. See docs/node-agent.md.
"""
