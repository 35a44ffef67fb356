"""The API fuzzed (issue 12, acceptance 2): schemathesis against a real gateway of a cluster
of its own, from the document that gateway serves (/api/openapi.json).

One run of the schemathesis CLI (its documented interface) with a fixed budget:
- every phase: the coverage phase (boundary and invalid values of each field), fuzzing
  with positive and negative data (`--mode all`), and the stateful phase, which follows
  the document's links: a created booking (POST /api/bookings, 201) is read and
  cancelled by its id (GetBooking, CancelBooking), a tier list books its first tier;
- every check but `positive_data_acceptance`: no 5xx, status codes, content types,
  headers and bodies as documented, schema-violating data refused, 405 with `Allow`,
  authentication not ignored, ... `positive_data_acceptance` is off because the
  document cannot say every rule the API applies (an integer written `1.0` is valid
  JSON Schema but refused, as is a non-printable name, a tier named twice, a cursor this
  API did not issue, a tier of another event): refusing those is the API's job;
- the operator routes with the operator token, but not promote, switchover and the
  failover drill: they change which copy is a shard's primary (a drill kills hosts),
  which would fail the cluster over under the fuzzer's other requests. Their request
  types are in the document; failover is tested in test_promote.py, test_switchover.py
  and test_drill.py.

From the run's HAR log the test also checks that every error answer was an RFC 9457
problem document (`application/problem+json` with type, title and status) and that
created bookings were read and cancelled through the links. The budget (`MAX_EXAMPLES` per
operation, `MAX_STEPS` per stateful scenario) makes about 1,300 cases in a minute or
two; the seed is fixed (a failure replays: `BOXOFFICE_FUZZ_SEED` picks another).
Bookings aim at a fixture event with a large tier half of the time (a schemathesis
dictionary), so that positive requests book instead of answering 404.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy.cluster import Cluster
from gateway.openapi import OPENAPI_PATH
from tests.conftest import ADMIN_TOKEN, own_cluster
from tests.support import create_event_doc, gateway_url

MAX_EXAMPLES = 40  # per operation and phase
MAX_STEPS = 20  # per stateful scenario
MIN_CASES = 1000
SEED = os.environ.get("BOXOFFICE_FUZZ_SEED", "20261126")
RUN_TIMEOUT = 280  # seconds; the test's own timeout is 300
# Operations that change which copy is a shard's primary (see the module docstring).
NOT_FUZZED = ("promoteShard", "switchoverShard", "drillFailover")
PROBLEM_FIELDS = {"type", "title", "status"}

# One region, one shard, no synchronous standby: the smallest real cluster (Consul,
# Postgres, a node agent, a booking service, a gateway). No rate limit and no load
# shedding: the fuzzer is one client sending as fast as it can.
TOPOLOGY = {
    "name": "test-fuzz",
    "regions": {"east": {"location": "East"}},
    "shards": {"shard-a": {"home": "east", "sync": "off"}},
    "postgres": {"durable": False},
    "gateway": {"booking_rate_per_second": 0, "max_in_flight_reads": 0,
                "max_in_flight_bookings": 0, "read_lag_ms": 0, "booking_lag_ms": 0},
}


@pytest.fixture(scope="module")
def fuzz_cluster(workdir: Path) -> Iterator[Cluster]:
    with own_cluster(workdir, "fuzz", TOPOLOGY) as c:
        yield c


def config_file(path: Path, event: dict[str, Any]) -> Path:
    """The run's schemathesis.toml: stateful scenario length and links, and the fixture event's ids
    as dictionaries for half of the booking requests' eventId and ticketTierId."""
    path.write_text(f"""
[phases.stateful]
max-steps = {MAX_STEPS}

# Only the document's own links: a link inferred from a booking's `Location` cannot carry
# its Booking-Secret, so it only ever meets the 404 of a read without the secret
# (tests/test_booking_ownership.py shows that 404), spending the scenarios' steps.
[phases.stateful.inference]
algorithms = []

[dictionaries.fuzz-event]
values = ["{event['id']}"]

[dictionaries.fuzz-tier]
values = ["{event['tiers'][0]['id']}"]

[[operations]]
include-operation-id = "createBooking"
parameters = {{ "body.eventId" = {{ dictionary = "fuzz-event", probability = 0.5 }}, \
"body.items[*].ticketTierId" = {{ dictionary = "fuzz-tier", probability = 0.5 }} }}
""")
    return path


def run_schemathesis(base: str, config: Path, reports: Path) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(config),
        "run", base + OPENAPI_PATH,
        "--phases", "examples,coverage,fuzzing,stateful", "--mode", "all",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-examples", str(MAX_EXAMPLES), "--seed", SEED, "--workers", "1",
        "--generation-database", "none", "--request-timeout", "20",
        "--header", f"Authorization: Bearer {ADMIN_TOKEN}",
        *[arg for op in NOT_FUZZED for arg in ("--exclude-operation-id", op)],
        "--report", "json,har", "--report-dir", str(reports),
    ]
    # In its own directory: schemathesis keeps caches in the working directory.
    return subprocess.run(command, cwd=reports, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False)


def report(reports: Path, kind: str) -> Any:
    (found,) = reports.glob(f"{kind}-*.json")
    return json.loads(found.read_text())


def problem_violations(entries: list[dict[str, Any]]) -> list[str]:
    """Error answers that are not problem documents with type, title and their status."""
    bad = []
    for entry in entries:
        request, response = entry["request"], entry["response"]
        status = response["status"]
        if status < 400:
            continue
        what = f"{request['method']} {request['url'][:120]} -> {status}"
        if not response["content"].get("mimeType", "").startswith("application/problem+json"):
            bad.append(f"{what}: {response['content'].get('mimeType')}")
            continue
        try:
            doc = json.loads(response["content"].get("text") or "")
        except ValueError:
            bad.append(f"{what}: not JSON")
            continue
        if not isinstance(doc, dict) or not PROBLEM_FIELDS <= set(doc) or doc["status"] != status:
            bad.append(f"{what}: {str(doc)[:200]}")
    return bad


def bookings_followed(entries: list[dict[str, Any]]) -> Counter[str]:
    """Calls on bookings this run created, by kind: 'read' and 'cancel' (200 answers)."""
    created: set[str] = set()
    followed: Counter[str] = Counter()
    for entry in entries:
        request, response = entry["request"], entry["response"]
        path = re.sub(r"^[a-z]+://[^/]+", "", request["url"].split("?")[0])
        if request["method"] == "POST" and path == "/api/bookings" and response["status"] == 201:
            created.add(json.loads(response["content"]["text"])["id"])
        found = re.fullmatch(r"/api/bookings/([0-9a-f-]{36})(/cancel)?", path)
        if found and found[1] in created and response["status"] == 200:
            followed["cancel" if found[2] else "read"] += 1
    return followed


@pytest.mark.timeout(600)  # the cluster's start, then the run's RUN_TIMEOUT
async def test_the_api_survives_fuzzing(fuzz_cluster: Cluster, tmp_path: Path,
                                        figure: Callable[[str], None]) -> None:
    base = gateway_url(fuzz_cluster, "east")
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, base, [1_000_000], token=fuzz_cluster.admin_token)
    reports = tmp_path / "reports"
    reports.mkdir()
    config = config_file(tmp_path / "schemathesis.toml", event)
    result = await asyncio.to_thread(run_schemathesis, base, config, reports)
    summary = report(reports, "json")
    entries = report(reports, "har")["log"]["entries"]
    statuses = Counter(e["response"]["status"] for e in entries)
    followed = bookings_followed(entries)
    figure(
        f"schemathesis (seed {SEED}): {summary['test_cases']['generated']} generated cases, "
        f"{len(entries)} requests in {summary['running_time']:.0f} s; answers by status: "
        f"{dict(sorted(statuses.items()))}; created bookings then read {followed['read']} and "
        f"cancelled {followed['cancel']} times")
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert summary["failures"] == [] and summary["errors"] == [], summary
    assert summary["test_cases"]["generated"] >= MIN_CASES
    assert [s for s in statuses if s >= 500] == []
    assert problem_violations(entries) == []
    assert followed["read"] > 0 and followed["cancel"] > 0, "links from a created booking not followed"
