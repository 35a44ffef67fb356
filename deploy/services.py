"""Starting our own Python services (booking services, gateways) as real processes.

When we are root they run as the unprivileged `boxoffice` user (deploy/procs.py
`app_user`) unless told otherwise (node agents run as `postgres`); a booking service's
database password reaches it in a passfile (PGPASSFILE) owned by that user, never on
its command line."""

from __future__ import annotations

import json
import os
import pwd
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common.internal_auth import INSECURE_ENV
from deploy.procs import ManagedProcess, app_user, python_command, python_user, wait_until

DEFAULT = object()  # python_process's user: the unprivileged one (app_user)


@dataclass(frozen=True)
class ShardSpec:
    """What a booking service needs to serve one copy of a shard: the shard, the
    copy's database, and the copy's key in the shard record's members (`us-east`,
    `us-east/b`). Its role comes from the region map at run time, not from here."""

    name: str
    dsn: str
    member: str
    pool_size: int = 20

    def argument(self) -> str:
        return f"name={self.name},dsn={self.dsn},member={self.member},pool={self.pool_size}"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=0.5) as resp:
            return resp.status == 200 and json.loads(resp.read()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def python_process(
    name: str, module: str, args: list[str], log_path: Path, env: dict[str, str] | None = None,
    user: str | object | None = DEFAULT,
) -> ManagedProcess:
    """`python -m module args` as `user` (default: `app_user()`, None: ourselves)."""
    wanted = app_user() if user is DEFAULT else user
    assert wanted is None or isinstance(wanted, str)
    run_as = python_user(wanted)
    interpreter, interpreter_env = python_command(run_as)
    full_env = dict(os.environ)
    if run_as is not None:  # its own home, not ours (libpq and asyncpg look there)
        full_env.update(HOME=pwd.getpwnam(run_as).pw_dir, USER=run_as, LOGNAME=run_as)
    full_env.update(interpreter_env)
    full_env.update(env or {})
    return ManagedProcess(name, [*interpreter, "-m", module, *args], log_path, env=full_env, user=run_as)


def start_booking_service(
    region: str,
    port: int,
    shards: list[ShardSpec],
    log_path: Path,
    *,
    consul: str,
    map_prefix: str,
    admin_token: str | None = None,
    metrics_port: int | None = None,
    timeout: float = 30.0,
    passfile: Path | None = None,
) -> ManagedProcess:
    """Start a booking service for `shards`, following the region map under
    `map_prefix` in the Consul agent at `consul` (host:port); wait until it answers
    /api/health (which it does in any role: readiness is /api/ready)."""
    args = ["--region", region, "--port", str(port), "--consul", consul, "--map-prefix", map_prefix]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    for shard in shards:
        args += ["--shard", shard.argument()]
    env = {"BOXOFFICE_ADMIN_TOKEN": admin_token} if admin_token else {}
    # A test's stand-alone service: its callers (the tests) do not sign. Without this it
    # refuses to start (common/internal_auth.py); a cluster's services get their keys.
    env[INSECURE_ENV] = "off"
    if passfile is not None:
        env["PGPASSFILE"] = str(passfile)
    proc = python_process(f"shard_service[{region}:{port}]", "shard_service", args, log_path, env)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _healthy(url), f"booking service {region}:{port}", timeout, alive=proc.running)
    return proc


def wait_healthy(url: str, proc: ManagedProcess, what: str, timeout: float = 30.0) -> None:
    wait_until(lambda: _healthy(url), what, timeout, alive=proc.running)
