"""Changing a shard's primary safely: the node-agent client, the per-shard lease, and the
emergency promotion primitive (`failover.promote.promote`) that `boxoffice shard
promote`, the gateways' `POST /admin/shards/{shard}/promote` and the failover controller
share. See docs/failover.md.
"""

from failover.agents import (
    AgentError,
    AgentFailed,
    AgentRefused,
    Agents,
    AgentUnreachable,
    CopyStatus,
    NodeAgents,
)
from failover.promote import (
    PromoteError,
    PromoteFailed,
    PromoteRefused,
    PromoteReport,
    StepEvent,
    next_sync_set,
    promote,
)

__all__ = [
    "AgentError",
    "AgentFailed",
    "AgentRefused",
    "AgentUnreachable",
    "Agents",
    "CopyStatus",
    "NodeAgents",
    "PromoteError",
    "PromoteFailed",
    "PromoteRefused",
    "PromoteReport",
    "StepEvent",
    "next_sync_set",
    "promote",
]
