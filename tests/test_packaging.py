"""A non-editable `pip install .` into a clean virtual environment is a working booking
service: the wheel carries every package and every data file (the SQL above all, seed.sql
included), and the runtime dependencies pyproject.toml declares are enough to start it.

Honest by construction: the clean venv sees neither the repository nor the project's
editable install. It is a plain venv (no system site-packages), installed from a copy of
the source tree, and every command runs in an empty directory outside the repository with
no PYTHONPATH; the test asserts that `shard_service` is imported from the venv and that no
entry of its sys.path lies in the repository. Fast and offline: the dependencies come from
the wheelhouse scripts/install.sh fills from requirements.lock (`--no-index`), pinned to
the lock's versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from common.internal_auth import INSECURE_ENV
from deploy.consul_agent import ConsulAgent
from deploy.postgres import PostgresServer
from deploy.procs import ManagedProcess, free_port
from region_map import CONSUL_TOKEN_ENV, ConsulMapStore, Region, Shard, ShardMember
from tests.conftest import CONSUL_TOKEN
from tests.support import poll

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
WHEELS = REPO / ".cache" / "wheels"
SAMPLE_EVENT = "a2d94b7c-5e3f-4a81-b6c2-7e8f9a0b1c02"  # "The Midnight Ramblers", seed.sql
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "build", "run", "*.egg-info", "__pycache__", ".*_cache")
SHARD, MEMBER = "shard-p", "pkg-region"


@dataclass(frozen=True)
class CleanInstall:
    venv: Path
    cwd: Path  # empty, outside the repository
    env: dict[str, str]

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def run(self, *argv: str, timeout: float = 120) -> str:
        done = subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def python_json(self, code: str) -> object:
        return json.loads(self.run(self.python, "-c", code))


def lock_constraints(lock_text: str) -> str:
    """The lock's pins (with their markers) as a constraints file: pip refuses hashes and
    extras in constraints."""
    pin = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*==[^\s\\;]+)(\s*;[^\\]*)?")
    return "".join(f"{m[1]}{(m[2] or '').rstrip()}\n" for line in lock_text.splitlines()
                   if (m := pin.match(line)))


def clean_env(venv: Path) -> dict[str, str]:
    """This process's environment without anything that points Python or pip elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "BOXOFFICE_")) and k != "VIRTUAL_ENV"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip configuration plays no part
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> CleanInstall:
    lock_sha = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    stamp = WHEELS / ".lock-sha256"
    if not stamp.is_file() or stamp.read_text().strip() != lock_sha:
        pytest.fail(f"{WHEELS} does not hold requirements.lock's files: run `bash scripts/install.sh`")
    base = tmp_path_factory.mktemp("packaging")
    source, venv, cwd = base / "source", base / "venv", base / "elsewhere"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    cwd.mkdir()
    constraints = base / "constraints.txt"
    constraints.write_text(lock_constraints(LOCK.read_text()))
    env = clean_env(venv)
    # From the base interpreter (a venv made by a venv's python is clean too; this says so).
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)],
                   check=True, cwd=cwd, env=env, timeout=120)
    clean = CleanInstall(venv, cwd, env)
    clean.run(clean.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              "--no-index", "--find-links", str(WHEELS), "-c", str(constraints), str(source),
              timeout=600)
    return clean


def test_the_wheel_holds_every_package_and_data_file(installed: CleanInstall) -> None:
    found = installed.python_json(
        "import json, sys, sysconfig, shard_service; print(json.dumps({"
        "'module': shard_service.__file__, 'path': sys.path, 'site': sysconfig.get_path('purelib')}))")
    assert isinstance(found, dict)
    site = Path(found["site"]).resolve()
    assert site.is_relative_to(installed.venv.resolve()), site
    assert Path(found["module"]).resolve() == site / "shard_service" / "__init__.py", found["module"]
    assert not [p for p in found["path"] if p and Path(p).resolve().is_relative_to(REPO)], found["path"]

    packages = sorted(p.parent.relative_to(REPO) for p in REPO.glob("*/__init__.py")
                      if p.parent.name != "tests")
    missing = [str(p) for p in packages if not (site / p / "__init__.py").is_file()]
    assert not missing, f"packages missing from the wheel (pyproject.toml's packages.find): {missing}"
    data = [p.relative_to(REPO) for pattern in ("*/sql/*.sql", "gateway/static/*", "deploy/*.yaml",
                                                "deploy/prometheus/*.yml")
            for p in REPO.glob(pattern)]
    assert any(p.name == "seed.sql" for p in data)
    missing = [str(p) for p in data if not (site / p).is_file()]
    assert not missing, f"data files missing from the wheel (pyproject.toml's package-data): {missing}"
    installed.run(str(installed.venv / "bin" / "boxoffice"), "--help")  # the console script


@pytest.fixture(scope="module")
def database(workdir: Path) -> Iterator[PostgresServer]:
    """A Postgres of this module's own (under the harness's workdir, which the `postgres`
    OS user can reach), with an empty application database."""
    server = PostgresServer("packaging", workdir / "packaging-pg" / "data", free_port(), durable=False)
    try:
        server.init_primary()
        yield server
    finally:
        server.stop()


async def test_a_booking_service_from_the_clean_venv_serves_the_sample_data(
        installed: CleanInstall, database: PostgresServer, consul_agent: ConsulAgent,
        tmp_path: Path) -> None:
    # The schema and sample data, installed by the clean venv's own code and SQL files.
    installed.run(installed.python, "-c",
                  "import asyncio, sys; from shard_service import schema; "
                  "asyncio.run(schema.install(sys.argv[1], with_sample_data=True))", database.dsn)

    port, prefix = free_port(), f"test-packaging-{uuid.uuid4().hex[:8]}/"
    store = ConsulMapStore(port=consul_agent.http_port, prefix=prefix)
    try:
        await store.put_region(Region(MEMBER, "http://127.0.0.1:9", "Packaging"), 0)
        await store.put_shard(Shard(SHARD, 1, MEMBER, {MEMBER: ShardMember(
            MEMBER, f"http://127.0.0.1:{port}/shards/{SHARD}", database.address)}), 0)
    finally:
        await store.close()

    service = ManagedProcess(
        "shard_service[packaging]",
        [installed.python, "-m", "shard_service", "--region", MEMBER, "--port", str(port),
         "--consul", consul_agent.address, "--map-prefix", prefix,
         "--shard", f"name={SHARD},dsn={database.dsn},member={MEMBER}"],
        tmp_path / "service.log", cwd=installed.cwd,
        # Consul refuses a caller without a token (deploy/consul_acl.py): the session's.
        env={**installed.env, CONSUL_TOKEN_ENV: CONSUL_TOKEN, INSECURE_ENV: "off"})
    service.start()
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:

            async def primary() -> bool:
                assert service.running(), service.log_tail()
                try:
                    async with s.get(f"{url}/api/health") as resp:
                        return resp.status == 200 and (await resp.json()).get("role") == "primary"
                except aiohttp.ClientError:
                    return False

            await poll(primary, "the clean venv's booking service in role primary", timeout=30)
            async with s.get(f"{url}/api/events/{SAMPLE_EVENT}") as resp:
                event = await resp.json()
                assert resp.status == 200, event
            assert event["name"] == "The Midnight Ramblers"
            async with s.get(f"{url}/api/events/{SAMPLE_EVENT}/ticket-tiers") as resp:
                doc = await resp.json()
                assert resp.status == 200, doc
            tier = next(t for t in doc["ticketTiers"] if t["remaining"] > 0)
            reference = f"packaging-{uuid.uuid4().hex[:8]}"
            async with s.post(f"{url}/api/bookings", json={
                    "eventId": SAMPLE_EVENT, "clientReference": reference,
                    "items": [{"ticketTierId": tier["id"], "quantity": 1}]}) as resp:
                booking = await resp.json()
                assert resp.status == 201, booking  # booking.sql's functions, from the wheel
            assert booking["status"] == "confirmed" and booking["clientReference"] == reference
    finally:
        service.stop()
