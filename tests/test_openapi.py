"""The API document (issue 12, acceptance 1): every gateway serves an OpenAPI 3.1 document
that validates and describes every route its router has, and an HTML reference that
renders in headless Chromium with no network but the gateway's.

The route check runs a gateway in this process (gateway.app.create_app, the function
`python -m gateway` serves, on the session cluster's Consul) and compares its aiohttp
router, route by route, with the document: a route added to the gateway without an
entry in gateway/openapi.py `ROUTES` fails here. Only the static files listed, with
their reason, in `STATIC_FILES` are left out (and HEAD, which aiohttp adds beside
every GET)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openapi_spec_validator import validate
from playwright.async_api import BrowserContext, Page, expect

from common import messages
from common.cursor import MAX_YEAR, MIN_YEAR
from deploy.cluster import Cluster
from failover.drill import KINDS
from gateway.app import GatewayConfig, create_app
from gateway.openapi import DOCS_PATH, OPENAPI_PATH, ROUTES, STATIC_FILES, build_document, openapi_path
from region_map import ConsulMapStore, MapWatcher
from tests.browser import only_origin
from tests.conftest import ADMIN_TOKEN
from tests.support import gateway_url


@pytest.fixture(scope="module")
async def running_gateway(cluster: Cluster) -> AsyncIterator[tuple[web.Application, str]]:
    """A gateway app as `python -m gateway` builds it, serving on a free port."""
    assert cluster.consul is not None
    store = ConsulMapStore(port=cluster.consul.http_port, prefix=cluster.map_prefix)
    app = create_app(GatewayConfig(region="east", admin_token=ADMIN_TOKEN), store, MapWatcher(store))
    server = TestServer(app)
    await server.start_server()
    try:
        yield app, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def fetch(url: str) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        return resp.status, resp.content_type, await resp.read()


def registered(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route of the app's router; HEAD beside GET left out."""
    routes = set()
    for route in app.router.routes():
        if route.method != "HEAD":
            info = route.resource.get_info() if route.resource is not None else {}
            routes.add((route.method, str(info.get("path") or info.get("formatter"))))
    return routes


def test_the_document_is_valid_openapi_3_1() -> None:
    """Valid, and every error it describes is a problem document but readiness's 503 (a
    not-ready gateway answers its readiness document: Consul's check reads the status)."""
    document = build_document()
    validate(document)  # openapi-spec-validator picks the 3.1 schema from "openapi"
    assert document["openapi"] == "3.1.0"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if (method, path) == ("get", "/api/ready"):
                assert operation["responses"]["503"]["content"]["application/json"]
                continue
            problems = [s for s, r in operation["responses"].items() if int(s) >= 400
                        and "application/problem+json" not in r.get("content", {})]
            assert problems == [], f"{method} {path}: errors that are not problem documents"


async def test_every_gateway_serves_the_document(cluster: Cluster,
                                                 running_gateway: tuple[web.Application, str]) -> None:
    _, local = running_gateway
    expected = json.loads(json.dumps(build_document()))
    for base in [gateway_url(cluster, r) for r in cluster.topology.region_names] + [local]:
        status, content_type, body = await fetch(base + OPENAPI_PATH)
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body) == expected


async def test_every_route_of_a_running_gateway_is_described(
        running_gateway: tuple[web.Application, str]) -> None:
    app, base = running_gateway
    status, _, _ = await fetch(base + "/api/health")
    assert status == 200  # it serves
    served = registered(app)
    described = {(r.method, r.path) for r in ROUTES}
    assert served - described - set(STATIC_FILES) == set(), "routes without an entry in ROUTES"
    assert described - served == set(), "entries in ROUTES that no route serves"
    assert set(STATIC_FILES) <= served, "STATIC_FILES lists what is not served any more"
    paths = build_document()["paths"]
    for route in ROUTES:
        assert route.method.lower() in paths[openapi_path(route.path)]


def test_operator_routes_need_the_bearer_token() -> None:
    document = build_document()
    scheme = document["components"]["securitySchemes"]["operatorToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for route in ROUTES:
        operation = document["paths"][openapi_path(route.path)][route.method.lower()]
        admin = route.path == "/admin" or route.path.startswith("/admin/")
        assert (operation.get("security") == [{"operatorToken": []}]) == admin, route.path
        if admin:
            assert {"401", "403"} <= set(operation["responses"]), route.path


def test_a_created_booking_links_to_reading_and_cancelling_it() -> None:
    """With the buyer's secret the answer carries (tests/test_booking_ownership.py)."""
    created = build_document()["paths"]["/api/bookings"]["post"]["responses"]["201"]["links"]
    mine = {"bookingId": "$response.body#/id",
            "header.Booking-Secret": "$response.header.Booking-Secret"}
    assert {name: (link["operationId"], link["parameters"]) for name, link in created.items()} == {
        "GetBooking": ("getBooking", mine), "CancelBooking": ("cancelBooking", mine)}


def test_the_schemas_carry_the_rules_the_services_apply() -> None:
    schemas = build_document()["components"]["schemas"]
    item = schemas["BookingRequestItem"]["properties"]
    assert (item["quantity"]["type"], item["quantity"]["minimum"], item["quantity"]["maximum"]) == (
        "integer", 1, messages.MAX_QUANTITY_PER_ITEM)
    assert schemas["BookingRequest"]["required"] == ["eventId", "items"]
    assert schemas["BookingRequest"]["properties"]["items"]["maxItems"] == messages.MAX_ITEMS
    assert schemas["NewEvent"]["properties"]["startsAt"]["description"].endswith(
        f"in the years {MIN_YEAR} to {MAX_YEAR} (UTC)")
    assert set(schemas["ProblemDocument"]["required"]) == {"type", "title", "status", "detail"}
    assert schemas["DrillRequest"]["properties"]["kind"]["enum"] == sorted(KINDS)  # the drill's
    assert schemas["PromoteRequest"]["additionalProperties"] is False


async def test_the_reference_page_renders_offline(
        running_gateway: tuple[web.Application, str], browser_context: BrowserContext,
        page: Page, page_errors: list[str]) -> None:
    """Headless Chromium, every request but the gateway's refused: the page is complete
    (each operation and each schema has its section) and asked for nothing else."""
    _, base = running_gateway
    refused = await only_origin(browser_context, base)
    response = await page.goto(base + DOCS_PATH)
    assert response is not None and response.status == 200
    await expect(page.locator("h1")).to_have_text("Boxoffice API")
    assert await page.locator("section.op").count() == len(ROUTES)
    schemas = build_document()["components"]["schemas"]
    assert await page.locator("section[id^=schema-]").count() == len(schemas)
    await expect(page.locator("#createBooking")).to_contain_text("POST /api/bookings")
    await expect(page.locator("#createBooking")).to_contain_text("GetBooking")
    await expect(page.locator("#schema-BookingRequestItem")).to_contain_text(
        f"an integer from 1 to {messages.MAX_QUANTITY_PER_ITEM}")
    assert await page.evaluate("document.scripts.length") == 0
    assert refused == [] and page_errors == []
