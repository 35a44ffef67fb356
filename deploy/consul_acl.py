"""Each kind of process gets a Consul ACL token with just the rights its code uses.

Consul runs with `default_policy = "deny"` (deploy/consul_agent.py): without a token
nothing is read or written. `up` makes, with the management token (which only the
launcher and the operator tools hold, in cluster.json, 0600), one policy and one token
per kind, and hands each process its token in `$BOXOFFICE_CONSUL_TOKEN`
(`region_map.CONSUL_TOKEN_ENV`, through `Cluster.component_env`). The rights, with P the
map prefix and O its operations prefix (journals and locks):

- **agent** (node agents) and **service** (booking services): read the map (`list` on
  P: a recursive read needs it). Nothing else: they follow the map, they never write it,
  hold no lock and register nothing (the launcher registers every instance, with the
  management token). So no process of a host can register a service, let alone
  another host's.
- **gateway**: read the map, the registry (service and node read: health, node agents'
  URLs for the console and drills) and O. It writes only what its operator routes
  (behind the operator token) write: shard records (emergency promotion and switchover,
  failover/promote.py, failover/switchover.py), placements (creating and moving events),
  the journals of those operations, of drills and of signed-out console sessions (the
  logout revocation list), and the locks those operations take (`shard-op-*`,
  `event-move-*`), with sessions for them. Not the region records (where each region's
  gateway is), not the failover controllers' lock, no other journal or lock.
- **controller** (failover controllers): read the map and the registry, write shard
  records and placements (promotion; settling abandoned moves), everything under O
  (its journals, its leader lock and the shard leases), sessions. Not the region records.
- **prometheus** (its discovery adapter): read the registry only.

Every grant is a prefix rule in Consul's ACL language (1.8: `key_prefix`, `service_prefix`,
`node_prefix`, `session_prefix`). The management token alone writes region records,
registers services and manages ACLs. Rotating: `bootstrap` again makes new tokens
(`Cluster.component_env` hands them out at the next start of each process); delete the
old ones by accessor (`DELETE /v1/acl/token/<accessor>`).

The calls are made with urllib, as deploy/consul_agent.py's readiness checks are: this
is part of deploying Consul, run by the launcher only, not a client of the map.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from event_ops.move import JOURNAL_KIND as MOVE_JOURNAL
from event_ops.move import LEASE_KIND as MOVE_LEASE
from failover.drill import REPORT_KIND as DRILL_REPORT
from failover.leadership import CONTROLLER_LOCK
from failover.promote import JOURNAL_KIND as PROMOTE_JOURNAL
from failover.switchover import JOURNAL_KIND as SWITCHOVER_JOURNAL
from gateway.console import REVOKED_KIND
from region_map import ops_prefix_for

KINDS = ("agent", "service", "gateway", "controller", "prometheus")
SHARD_LEASE = "shard-op-"  # failover/lease.py shard_lock(name)
# The journal kinds a gateway writes (its operator routes, drills, console logout).
GATEWAY_JOURNALS = (PROMOTE_JOURNAL, SWITCHOVER_JOURNAL, MOVE_JOURNAL, DRILL_REPORT, REVOKED_KIND)
GATEWAY_LOCKS = (SHARD_LEASE, MOVE_LEASE)
assert CONTROLLER_LOCK not in GATEWAY_LOCKS and not CONTROLLER_LOCK.startswith(GATEWAY_LOCKS)


def _rule(resource: str, segment: str, policy: str) -> str:
    return f'{resource} {json.dumps(segment)} {{ policy = "{policy}" }}'


def rules(kind: str, prefix: str) -> str:
    """The ACL rules (HCL) of one kind of process, for a map under `prefix`."""
    ops = ops_prefix_for(prefix)
    registry = [_rule("service_prefix", "", "read"), _rule("node_prefix", "", "read")]
    read_map = [_rule("key_prefix", prefix, "list")]
    if kind in ("agent", "service"):
        lines = read_map
    elif kind == "gateway":
        lines = [*read_map, _rule("key_prefix", prefix + "shards/", "write"),
                 _rule("key_prefix", prefix + "placement/", "write"),
                 _rule("key_prefix", ops, "list"),
                 *(_rule("key_prefix", f"{ops}journals/{k}", "write") for k in GATEWAY_JOURNALS),
                 *(_rule("key_prefix", f"{ops}locks/{k}", "write") for k in GATEWAY_LOCKS),
                 _rule("session_prefix", "", "write"), *registry]
    elif kind == "controller":
        lines = [*read_map, _rule("key_prefix", prefix + "shards/", "write"),
                 _rule("key_prefix", prefix + "placement/", "write"),
                 _rule("key_prefix", ops, "write"),
                 _rule("session_prefix", "", "write"), *registry]
    elif kind == "prometheus":
        lines = registry
    else:
        raise ValueError(f"no Consul ACL policy for {kind!r}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ComponentToken:
    kind: str
    accessor: str  # names the token (to delete it); not a credential
    secret: str  # the credential the process sends


def _call(url: str, token: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                 headers={"X-Consul-Token": token})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def _policies_when_ready(url: str, token: str, timeout: float = 30.0) -> Any:
    """The ACL policies, once Consul's ACL system answers: right after an agent starts
    (or under load, before its leader has set ACLs up) it answers 5xx for a moment, as
    seen in the suite. Polled (a bounded wait, every 0.2 s); anything else raises."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _call(url, token, "GET", "/v1/acl/policies")
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or time.monotonic() > deadline:
                raise
        time.sleep(0.2)  # poll interval of a bounded wait


def bootstrap(consul_url: str, management_token: str, prefix: str) -> dict[str, ComponentToken]:
    """One policy and one token per kind (KINDS), for the map under `prefix`; the tokens
    by kind. Policy names carry the prefix, so two clusters' maps in one Consul keep
    theirs apart; running it again for the same prefix replaces the policies' rules and
    makes new tokens."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", prefix.strip("/")) or "root"
    existing = {p["Name"]: p["ID"] for p in _policies_when_ready(consul_url, management_token)}
    tokens = {}
    for kind in KINDS:
        name = f"boxoffice-{slug}-{kind}"
        policy = {"Name": name, "Description": f"boxoffice {kind}s of the map {prefix}",
                  "Rules": rules(kind, prefix)}
        if name in existing:
            _call(consul_url, management_token, "PUT", f"/v1/acl/policy/{existing[name]}", policy)
        else:
            _call(consul_url, management_token, "PUT", "/v1/acl/policy", policy)
        made = _call(consul_url, management_token, "PUT", "/v1/acl/token", {
            "Description": f"boxoffice {kind} ({prefix})", "Policies": [{"Name": name}]})
        tokens[kind] = ComponentToken(kind, str(made["AccessorID"]), str(made["SecretID"]))
    return tokens
