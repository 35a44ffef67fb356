"""The signing and verification rules of common/internal_auth.py, in process."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from common import internal_auth
from common.api import read_json_object
from common.internal_auth import (
    SIGNATURE_HEADER,
    NonceCache,
    Signer,
    Verifier,
    derive_key,
    operator_key,
    parse_verify_keys,
    process_env,
)
from common.problems import Problem, problem_middleware
from deploy.procs import free_port

TOKEN = "an-operator-token-0123456789-abcdefghij"


def test_each_kind_gets_its_own_key_and_only_its_callers_keys() -> None:
    master = secrets.token_bytes(32)
    keys = {kind: derive_key(master, kind) for kind in internal_auth.KINDS}
    assert len(set(keys.values())) == len(keys)
    agent = process_env("agent", master, TOKEN)
    assert agent[internal_auth.KEY_ENV] == keys["agent"].hex()
    assert parse_verify_keys(agent[internal_auth.VERIFY_ENV]) == {
        "controller": keys["controller"], "operator": operator_key(TOKEN)}
    service = parse_verify_keys(process_env("service", master, TOKEN)[internal_auth.VERIFY_ENV])
    assert set(service) == {"gateway", "controller", "operator"}
    assert internal_auth.VERIFY_ENV not in process_env("gateway", master, TOKEN)
    for env in (agent, process_env("controller", master, TOKEN)):
        assert TOKEN not in "".join(env.values()) and master.hex() not in "".join(env.values())
    with pytest.raises(ValueError):
        parse_verify_keys("root=00")


def test_the_nonce_cache_refuses_a_repeat_forgets_after_the_window_and_refuses_when_full() -> None:
    cache = NonceCache(window=60, capacity=2)
    assert cache.add("a", ts=1000, now=1000)
    assert not cache.add("a", ts=1000, now=1030)
    assert cache.add("b", ts=1000, now=1030)
    with pytest.raises(Problem) as full:
        cache.add("c", ts=1030, now=1030)
    assert full.value.status == 503
    assert cache.add("a", ts=1100, now=1100)  # 'a' and 'b' are out of the window: forgotten


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, Verifier]]:
    """A server whose every route takes the operator and controllers."""
    verifier = Verifier({"operator": operator_key(TOKEN), "controller": b"k" * 32})

    async def handler(request: web.Request) -> web.Response:
        caller = internal_auth.request_caller(request)
        return web.json_response({"kind": caller.kind if caller else None,
                                  "body": (await request.read()).decode()})

    # A small application limit, as a booking service's: a route may take more (an import
    # page), and the signature check must read what the route will.
    policy = internal_auth.middleware(
        verifier, lambda _, path: None if path == "/open" else frozenset({"operator"}))
    app = web.Application(client_max_size=16 * 1024, middlewares=[problem_middleware, policy])
    async def streaming(request: web.Request) -> web.Response:  # reads request.content
        return web.json_response(await read_json_object(request, max_bytes=2 * 1024 * 1024))

    app.router.add_post("/stream", streaming)
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", verifier
    await server.close()


async def test_a_signature_covers_method_path_query_and_body(echo: tuple[str, Verifier]) -> None:
    base, _ = echo
    operator = Signer.operator(TOKEN, "op")
    url = f"{base}/x/y%20z?b=2&a=1"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b'{"n": 1}', headers=operator.sign("POST", url, b'{"n": 1}')) as resp:
            assert resp.status == 200
            assert await resp.json() == {"kind": "operator", "body": '{"n": 1}'}
        for method, target, body in (("PUT", url, b'{"n": 1}'), ("POST", f"{base}/x/y%20z?b=2", b'{"n": 1}'),
                                     ("POST", url, b'{"n": 2}')):
            async with s.post(url, data=b'{"n": 1}', headers=operator.sign(method, target, body)) as resp:
                assert resp.status == 401, (method, target, body)
        controller = Signer("controller", b"k" * 32, "c")
        async with s.get(f"{base}/x", headers=controller.sign("GET", f"{base}/x")) as resp:
            assert resp.status == 403  # a valid caller, not of a kind this route takes
        async with s.get(f"{base}/x", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200 and (await resp.json())["kind"] == "operator"
        async with s.get(f"{base}/x", headers={"Authorization": f"Bearer {TOKEN}x"}) as resp:
            assert resp.status == 403  # a wrong operator token, as common/auth.py answers it
        async with s.get(f"{base}/open") as resp:
            assert resp.status == 200 and (await resp.json())["kind"] is None
        async with s.get(f"{base}/open", headers={SIGNATURE_HEADER: "v1;operator"}) as resp:
            assert resp.status == 401  # a signature sent to an open route is checked all the same


async def test_the_clock_window_is_the_receivers(echo: tuple[str, Verifier]) -> None:
    base, verifier = echo
    verifier.clock = lambda: 10_000.0
    operator = Signer.operator(TOKEN)
    async with aiohttp.ClientSession() as s:
        for ts, status in ((10_000 - 59, 200), (10_000 + 59, 200), (10_000 - 61, 401), (10_000 + 61, 401)):
            url = f"{base}/t"
            async with s.get(url, headers=operator.sign("GET", url, now=ts)) as resp:
                assert resp.status == status, ts


def test_the_launcher_gives_each_kind_only_its_keys_and_the_token_to_gateways_alone(
        tmp_path: Path) -> None:
    from deploy.cluster import Cluster
    from deploy.topology import parse_topology
    from tests.conftest import SMALL_TOPOLOGY

    cluster = Cluster(parse_topology(SMALL_TOPOLOGY), tmp_path / "c", admin_token=TOKEN)
    master = bytes.fromhex(cluster.internal_key)
    for kind in ("agent", "service", "gateway", "controller"):
        env = cluster.component_env(kind)
        assert env[internal_auth.KIND_ENV] == kind
        assert env[internal_auth.KEY_ENV] == derive_key(master, kind).hex()
        verify = parse_verify_keys(env.get(internal_auth.VERIFY_ENV, ""))
        assert set(verify) == set(internal_auth.CALLERS_OF[kind]), kind
        assert (env["BOXOFFICE_ADMIN_TOKEN"] == TOKEN) == (kind == "gateway"), kind
        assert cluster.internal_key not in "".join(env.values()), kind


async def test_a_verified_body_reaches_a_streaming_handler_and_is_bounded(echo: tuple[str, Verifier]) -> None:
    """The body is read to be verified, then given back whole to a handler that streams
    it (common/api.py); one over the limit is a 413 before any MAC is computed."""
    base, _ = echo
    operator = Signer.operator(TOKEN)
    url = f"{base}/stream"
    big = b'{"pad": "' + b"x" * 300_000 + b'"}'  # above a stream's default buffer
    async with aiohttp.ClientSession() as s:
        for body in (b'{"n": 1}', big):
            async with s.post(url, data=body, headers={**operator.sign("POST", url, body),
                                                       "Content-Type": "application/json"}) as resp:
                assert resp.status == 200, await resp.text()
                assert len(await resp.read()) >= len(body) - 2
        huge = b"x" * (internal_auth.DEFAULT_MAX_BODY + 1)
        async with s.post(url, data=huge, headers=operator.sign("POST", url, huge)) as resp:
            assert resp.status == 413


def test_a_booking_service_without_keys_refuses_to_run_unless_told_it_may() -> None:
    """Fail closed: no verification keys is a refusal to start, not a service that takes
    any local caller's writes; `BOXOFFICE_INTERNAL_AUTH=off` is the explicit way to run
    without (tests' stand-alone services), said in the log."""
    keys = process_env("service", b"m" * 32, TOKEN)
    assert isinstance(internal_auth.verifier_or_refuse("svc", keys), Verifier)
    with pytest.raises(internal_auth.NoKeys, match="BOXOFFICE_INTERNAL_VERIFY"):
        internal_auth.verifier_or_refuse("svc", {})
    for almost in ("", "no", "0", "false"):  # only "off" says so
        with pytest.raises(internal_auth.NoKeys):
            internal_auth.verifier_or_refuse("svc", {internal_auth.INSECURE_ENV: almost})
    assert internal_auth.verifier_or_refuse("svc", {internal_auth.INSECURE_ENV: "off"}) is None
    # The process itself: a clear message and exit status 2, before it serves anything.
    env = {k: v for k, v in os.environ.items()
           if k not in (internal_auth.VERIFY_ENV, internal_auth.INSECURE_ENV)}
    got = subprocess.run([sys.executable, "-m", "shard_service", "--port", str(free_port()),
                          "--consul", "127.0.0.1:1", "--shard",
                          "name=shard-x,dsn=postgresql://nobody@127.0.0.1:1/x,member=here"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert got.returncode == 2, (got.returncode, got.stderr[-2000:])
    assert "refusing to run without authenticating its callers" in got.stderr
