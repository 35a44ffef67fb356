"""Helpers shared by the integration tests: making events, checking invariants."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg

from shard_service.inventory import audit_inventory
from tests.conftest import ADMIN_TOKEN

if TYPE_CHECKING:
    from deploy.cluster import Cluster
    from deploy.postgres import PostgresServer


@dataclass(frozen=True)
class FreshEvent:
    id: str
    tier_ids: list[str]

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> FreshEvent:
        """From an event as the operator API answered it."""
        return cls(doc["id"], [t["id"] for t in doc["tiers"]])


async def create_event_doc(
    session: aiohttp.ClientSession,
    base_url: str,
    tiers: Sequence[int | tuple[str, int]],
    *,
    shard: str | None = None,
    venue: str = "Test Hall",
    starts_at: str = "2027-09-01T20:00:00Z",
    price_cents: int = 1000,
    token: str = ADMIN_TOKEN,
) -> dict[str, Any]:
    """Create a fresh event through the operator API (a booking service's or a
    gateway's, which also places it); one tier per capacity or (name, capacity).
    Returns the created event as the API answered it."""
    named = [t if isinstance(t, tuple) else (f"Tier {n}", t) for n, t in enumerate(tiers)]
    body: dict[str, Any] = {
        "name": f"Test concert {uuid.uuid4().hex[:8]}",
        "venue": venue,
        "startsAt": starts_at,
        "currency": "USD",
        "tiers": [{"name": name, "priceCents": price_cents, "capacity": cap} for name, cap in named],
    }
    if shard is not None:
        body["shard"] = shard
    async with session.post(
        f"{base_url}/admin/events", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        doc = await resp.json()
        assert resp.status == 201, doc
    return dict(doc)


async def create_event(
    session: aiohttp.ClientSession,
    base_url: str,
    capacities: list[int],
    *,
    price_cents: int = 1000,
    token: str = ADMIN_TOKEN,
) -> FreshEvent:
    """Create a fresh event, one tier per capacity; its id and its tiers' ids."""
    doc = await create_event_doc(session, base_url, capacities, price_cents=price_cents, token=token)
    return FreshEvent.from_doc(doc)


def signed(method: str, url: str, body: bytes = b"", *, kind: str = "operator",
           cluster: Cluster | None = None) -> dict[str, str]:
    """The header that signs one internal request (common/internal_auth.py): as the
    operator (the test token), or as another kind of `cluster`'s processes."""
    from common.internal_auth import Signer, derive_key

    if kind == "operator":
        return Signer.operator(ADMIN_TOKEN, "tests").sign(method, url, body)
    assert cluster is not None, "a kind other than the operator's needs its cluster's key"
    return Signer(kind, derive_key(bytes.fromhex(cluster.internal_key), kind), "tests").sign(
        method, url, body)


def gateway_url(cluster: Cluster, region: str) -> str:
    assert cluster.plan is not None
    return cluster.plan.gateway_url(region)


async def check_invariants(dsn: str, event_id: str) -> dict[str, dict[str, Any]]:
    """Assert sold + remaining = capacity, no negatives, one booking per reference.

    Returns {tier_id: {"capacity", "remaining", "sold", ...}} for further checks.
    """
    conn = await asyncpg.connect(dsn)
    try:
        audit = await audit_inventory(conn, event_id=event_id)
    finally:
        await conn.close()
    assert audit.tiers, f"event {event_id} has no tiers in {dsn}"
    assert audit.violations == [], f"inventory invariant broken: {audit.violations}"
    assert audit.duplicate_references == [], (
        f"a client reference names more than one booking: {audit.duplicate_references}")
    return {t.tier_id: asdict(t) for t in audit.tiers}


# The booking statements as the service sends them (shard_service/queries.py): one
# booking per CALL, or a batch of them. Matched by name and its opening parenthesis,
# so that one never counts as the other.
BOOKING_STATEMENTS = {
    "single": "CALL boxoffice_book_committed(",
    "batch": "CALL boxoffice_book_committed_batch(",
}


async def booking_lock_waiters(dsn: str, kinds: Sequence[str] = ("single", "batch")) -> int:
    """How many booking statements of `kinds` ("single": one booking per CALL,
    "batch": a batch of bookings; default both) wait for a lock on this database now.
    A batch statement counts once, however many bookings it carries."""
    needles = [BOOKING_STATEMENTS[kind] for kind in kinds]
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND pid <> pg_backend_pid() "
            "AND EXISTS (SELECT 1 FROM unnest($1::text[]) n WHERE strpos(query, n) > 0)",
            needles))
    finally:
        await conn.close()


async def wait_for_booking_lock_waiters(
    dsn: str, wanted: Callable[[int], bool], timeout: float = 15.0,
    kinds: Sequence[str] = ("single", "batch"),
) -> int:
    """Poll until the number of booking statements of `kinds` (see
    `booking_lock_waiters`) waiting on a lock satisfies `wanted`."""
    deadline = time.monotonic() + timeout
    while True:
        n = await booking_lock_waiters(dsn, kinds)
        if wanted(n):
            return n
        assert time.monotonic() < deadline, f"{n} booking statements still wait on a lock"
        await asyncio.sleep(0.02)  # poll interval


class RequestsInFlight:
    """Counts the requests a client session has sent (headers and body written) and
    not yet had answered (or failed): pass `trace()` to the session's trace_configs."""

    def __init__(self) -> None:
        self.count = 0

    def trace(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()

        async def sent(_: aiohttp.ClientSession, ctx: Any, __: Any) -> None:
            if not getattr(ctx, "sent", False):  # a body may go in several chunks
                ctx.sent = True
                self.count += 1

        async def ended(_: aiohttp.ClientSession, ctx: Any, __: Any) -> None:
            if getattr(ctx, "sent", False):
                ctx.sent = False
                self.count -= 1

        config.on_request_chunk_sent.append(sent)
        config.on_request_end.append(ended)
        config.on_request_exception.append(ended)
        return config


async def poll(check: Callable[[], Awaitable[object]], what: str, timeout: float = 60.0) -> object:
    """Await `check()` until it returns something truthy (its value), at most `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        await asyncio.sleep(0.05)  # poll interval


async def fetchval(db: str | PostgresServer, sql: str, *args: object) -> object:
    """One value from a database (its DSN, or the server), which tests observe directly."""
    conn = await asyncpg.connect(db if isinstance(db, str) else db.dsn, timeout=3)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def listed_event_ids(session: aiohttp.ClientSession, gateway: str, page_size: int = 50) -> list[str]:
    """Every event id a gateway's `GET /api/events` lists, following `nextCursor` page by
    page (duplicates kept, so a caller can assert there are none)."""
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": str(page_size)} | ({"cursor": cursor} if cursor else {})
        async with session.get(f"{gateway}/api/events", params=params) as resp:
            assert resp.status == 200
            page = await resp.json()
        seen += [e["id"] for e in page["events"]]
        cursor = page["nextCursor"]
        if cursor is None:
            return seen


async def event_rows_on_primaries(cluster: Cluster, event_id: str,
                                  homes: Mapping[str, str]) -> dict[str, int]:
    """How many rows of the event (and of its tiers) each shard's primary holds
    (`homes`: shard -> the copy key of its primary)."""
    found = {}
    for shard, home in homes.items():
        conn = await asyncpg.connect(cluster.databases[(shard, home)].dsn)
        try:
            found[shard] = int(await conn.fetchval(
                "SELECT (SELECT count(*) FROM events WHERE id = $1)"
                " + (SELECT count(*) FROM ticket_tiers WHERE event_id = $1)", uuid.UUID(event_id)))
        finally:
            await conn.close()
    return found


@contextlib.contextmanager
def extra_gateway(cluster: Cluster, region: str, name: str,
                  flags: Mapping[str, str] | None = None) -> Iterator[str]:
    """One more gateway of `region` on a running cluster, as the cluster starts its own
    (the topology's settings), on free ports, with `flags` (`python -m gateway` flags,
    e.g. `{"--map-prefix": ...}`) replacing or added to its arguments; its URL. Stopped
    afterwards whatever happens; its log is `gateway-<name>.log` in the state directory."""
    from deploy.procs import free_port
    from deploy.services import python_process, wait_healthy

    assert cluster.plan is not None
    port = free_port()
    args = cluster.gateway_args(cluster.plan, region)
    for flag, value in {"--port": str(port), "--metrics-port": str(free_port()), **(flags or {})}.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    env = cluster.component_env("gateway")
    if args[args.index("--map-prefix") + 1] != cluster.map_prefix:
        # A copy of the map under another prefix, which a gateway's Consul token may not
        # read (deploy/consul_acl.py): this test gateway reads it as the operator.
        from region_map import CONSUL_TOKEN_ENV

        env[CONSUL_TOKEN_ENV] = cluster.consul_token
    proc = python_process(f"gateway[{name}]", "gateway", args, cluster.state_dir / f"gateway-{name}.log",
                          env=env)
    proc.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, f"gateway {name}")
        yield url
    finally:
        proc.stop()
