"""The read-only booking service on a streaming replica."""

from __future__ import annotations

import aiohttp

from tests.conftest import ADMIN_TOKEN, RunningService
from tests.support import check_invariants, create_event


async def test_replica_serves_reads_after_catching_up_and_refuses_writes(
        booking_service: RunningService, replica_booking_service: RunningService) -> None:
    async with aiohttp.ClientSession() as s:
        ev = await create_event(s, booking_service.url, [7])
        async with s.post(f"{booking_service.url}/api/bookings", json={
                "eventId": ev.id, "items": [{"ticketTierId": ev.tier_ids[0], "quantity": 2}]}) as resp:
            assert resp.status == 201
            lsn = resp.headers["X-Boxoffice-Lsn"]
        # The replica waits server-side until it has replayed the write's position.
        async with s.get(f"{replica_booking_service.url}/api/events/{ev.id}/ticket-tiers",
                         headers={"X-Boxoffice-Min-Lsn": lsn}) as resp:
            assert resp.status == 200
            assert (await resp.json())["ticketTiers"][0]["remaining"] == 5

        async with s.post(f"{replica_booking_service.url}/api/bookings", json={
                "eventId": ev.id, "items": [{"ticketTierId": ev.tier_ids[0], "quantity": 1}]}) as resp:
            doc = await resp.json(content_type=None)
            assert resp.status == 503 and doc["type"].endswith("/not-primary")
        async with s.get(f"{replica_booking_service.url}/api/health") as resp:
            assert (await resp.json())["role"] == "replica"
        # Readiness, once the replica has replayed a transaction (its lag is a number).
        async with s.get(f"{replica_booking_service.url}/api/ready") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}  # public: no detail
        async with s.get(f"{replica_booking_service.url}/api/ready",
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            ready = await resp.json()
            assert resp.status == 200 and ready["status"] == "ok", ready
            assert ready["database"]["inRecovery"] is True
            assert isinstance(ready["database"]["replayLagSeconds"], float)
    tiers = await check_invariants(booking_service.database.dsn, ev.id)
    assert tiers[ev.tier_ids[0]]["sold"] == 2


async def test_position_the_replica_has_not_reached_is_503_replica_behind(
        replica_booking_service: RunningService) -> None:
    async with aiohttp.ClientSession() as s, s.get(
            f"{replica_booking_service.url}/api/events",
            headers={"X-Boxoffice-Min-Lsn": "FFFFFFFF/0"}) as resp:
        doc = await resp.json(content_type=None)
    assert resp.status == 503 and doc["type"].endswith("/replica-behind")


async def test_malformed_position_is_400(replica_booking_service: RunningService) -> None:
    async with aiohttp.ClientSession() as s, s.get(
            f"{replica_booking_service.url}/api/events", headers={"X-Boxoffice-Min-Lsn": "soon"}) as resp:
        assert resp.status == 400


async def test_database_down_is_a_retryable_503_not_a_500(workdir, consul_agent) -> None:  # type: ignore[no-untyped-def]
    """Stop a shard's database under its booking service: reads and writes answer 503."""
    import uuid

    from deploy.postgres import PostgresServer
    from deploy.procs import free_port
    from deploy.services import ShardSpec, start_booking_service
    from shard_service import schema

    db = PostgresServer("down-test", workdir / "pg-down" / "data", free_port(), durable=False)
    db.init_primary()
    await schema.install(db.dsn, with_sample_data=True)
    port = free_port()
    svc = start_booking_service("r", port, [ShardSpec("s", db.dsn, "r")], workdir / "svc-down.log",
                                consul=consul_agent.address,  # an empty map: the role is unknown
                                map_prefix=f"test-down-{uuid.uuid4().hex[:8]}/")
    try:
        db.stop()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/api/events") as resp:
                doc = await resp.json(content_type=None)
                assert resp.status == 503 and doc["type"].endswith("/database-unavailable"), doc
                assert resp.headers["Retry-After"] == "1"
            async with s.post(f"http://127.0.0.1:{port}/api/bookings", json={
                    "eventId": "6f1c2a4e-8b1d-4c3e-9a57-0d1e2f3a4b01",
                    "items": [{"ticketTierId": "0a1b2c3d-0001-4000-8000-000000000101", "quantity": 1}]},
                    ) as resp:
                assert resp.status == 503
    finally:
        svc.stop()
        db.remove()
