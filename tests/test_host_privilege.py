"""Least privilege on the host (issue 21, items 1, 2 and 9): what another local user can do
to a running cluster, tried as `nobody` (the tests drop to it: as root directly, as a user
with password-less sudo through `sudo -n`; without either they are skipped).

- no Postgres server lets a local user in without a password, so nobody reaches
  `COPY ... FROM PROGRAM` (which runs a shell command as the server's OS user);
- every postmaster runs with the `postgres` user's own groups, never group root;
- cluster.json, the node agents' configs (the operator token, the database passwords),
  the passfile and every log are unreadable to another user, and nobody can write where
  root reads configs from (the state directory);
- every secret file is created private from its first byte (the writer's mode does not
  depend on the umask, and it never follows a planted link);
- when the launcher is root, gateways, controllers, the delay proxy and the booking
  services run as unprivileged users, node agents as `postgres`;
- a state directory another user made (or may write) is refused, and root's default
  state directory is not a predictable path under /tmp.
"""

from __future__ import annotations

import functools
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.cluster import Cluster
from deploy.postgres import pg_tool
from tests.conftest import own_cluster

ROOT = os.geteuid() == 0


@functools.cache
def can_sudo() -> bool:
    """A password-less sudo (README's "a user with sudo"): never prompts (-n)."""
    try:
        return subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=10,
                              check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not ROOT and not can_sudo(),
                                reason="drops to `nobody`: needs root or a password-less sudo")
root_only = pytest.mark.skipif(not ROOT, reason="what a launcher that is root does")

TOPOLOGY: dict[str, Any] = {
    "name": "test-host-privilege",
    "regions": {"east": {"location": "East"}},
    "shards": {"shard-p": {"home": "east"}},  # sync zone: a primary and a standby in east/b
    "postgres": {"durable": False},
}


@pytest.fixture(scope="module")
def hcluster(workdir: Path) -> Iterator[Cluster]:
    with own_cluster(workdir, "host-privilege", TOPOLOGY) as c:
        yield c


def as_nobody(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    if ROOT:
        return subprocess.run(argv, user="nobody", group="nogroup", extra_groups=[], cwd="/",
                              capture_output=True, text=True, timeout=30, check=False, env=env)
    # sudo resets the environment and, with -g, gives nobody that group and its own only.
    return subprocess.run(["sudo", "-n", "-u", "nobody", "-g", "nogroup", "--", "env", "-i",
                           *(f"{k}={v}" for k, v in env.items()), *argv], cwd="/",
                          capture_output=True, text=True, timeout=30, check=False)


def proc_status(pid: int) -> dict[str, list[int]]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(v) for v in value.split()]
    return fields


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


# --- item 1: Postgres lets no local user in -----------------------------------------------------

def test_no_local_user_connects_without_a_password(hcluster: Cluster) -> None:
    """As nobody, with no password (-w: never prompt), every server of the cluster refuses
    every role, so `COPY FROM PROGRAM` (a shell as the server's user) is out of reach."""
    assert hcluster.databases
    for db in hcluster.databases.values():
        for user in ("postgres", "replicator", "boxoffice_app", "nobody"):
            got = as_nobody([pg_tool("psql"), "-w", "-X", "-h", db.host, "-p", str(db.port), "-U", user,
                             "-d", "postgres", "-c",
                             "CREATE TEMP TABLE t (x text); COPY t FROM PROGRAM 'id'; SELECT * FROM t"])
            assert got.returncode != 0, f"{user}@{db.name} let nobody in: {got.stdout}"
            assert "uid=" not in got.stdout
            assert "password authentication failed" in got.stderr or "no pg_hba.conf entry" in got.stderr \
                or "no password supplied" in got.stderr, got.stderr


def test_the_booking_services_role_is_no_superuser(hcluster: Cluster) -> None:
    """The booking services connect as a role that cannot run programs on the server,
    owns nothing, and cannot write its own fence."""
    import asyncio

    from tests.support import fetchval

    db = next(iter(hcluster.databases.values()))
    app = db.credentials.app_dsn(db.host, db.port)
    assert "boxoffice_app" in app
    assert asyncio.run(fetchval(db, "SELECT rolsuper FROM pg_roles WHERE rolname = 'boxoffice_app'")) is False
    assert asyncio.run(fetchval(db, "SELECT pg_has_role('boxoffice_app', 'pg_execute_server_program',"
                                    " 'MEMBER')")) is False
    # It reads and writes bookings, reads the epoch row (its fence) and cannot move it.
    for table, privilege, allowed in (("bookings", "INSERT", True), ("boxoffice_epoch", "SELECT", True),
                                      ("boxoffice_epoch", "UPDATE", False), ("events", "TRUNCATE", False)):
        got = asyncio.run(fetchval(db, "SELECT has_table_privilege($1, $2, $3)", "boxoffice_app", table,
                                   privilege))
        assert got is allowed, (table, privilege)
    assert asyncio.run(fetchval(db, "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner"
                                    " WHERE r.rolname = 'boxoffice_app'")) == 0


def test_postmasters_have_no_root_group(hcluster: Cluster) -> None:
    """A server started by root (the launcher's first start, then its node agent's) keeps
    the postgres user's own groups only: no gid 0 among its real, effective or
    supplementary groups."""
    for db in hcluster.databases.values():
        status = proc_status(postmaster_pid(db.data_dir))
        assert 0 not in status["Uid"], db.name
        assert 0 not in status["Gid"] and 0 not in status["Groups"], (db.name, status)


# --- item 2: secrets and logs are the operator's --------------------------------------------

def secret_files(c: Cluster) -> list[Path]:
    files = [c.state_dir / "cluster.json", *c.state_dir.glob("node-agent-*.json"),
             *c.state_dir.glob("*pgpass*")]
    assert len(files) >= 3 and all(f.exists() for f in files), files
    return files


def test_nobody_reads_no_secret_and_no_log(hcluster: Cluster) -> None:
    logs = sorted(hcluster.state_dir.rglob("*.log"))
    assert len(logs) >= 5
    for path in [*secret_files(hcluster), *logs]:
        got = as_nobody(["cat", str(path)])
        assert got.returncode != 0 and got.stdout == "", f"nobody read {path}"


def test_secret_files_are_private_and_root_reads_configs_nobody_can_write(hcluster: Cluster) -> None:
    state = hcluster.state_dir.stat()
    assert state.st_uid == os.geteuid() and not state.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    for path in secret_files(hcluster):
        st = path.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1, path
        assert stat.S_IMODE(st.st_mode) in (0o600, 0o640), (path, oct(st.st_mode))
        if stat.S_IMODE(st.st_mode) == 0o640:  # group-readable by the agent's group only, ours
            assert st.st_uid == os.geteuid() and st.st_gid != 0, path
    for place in (hcluster.state_dir, hcluster.state_dir / "node-agent-east.json"):
        got = as_nobody(["sh", "-c", f"echo x >> {place}/planted 2>/dev/null || echo x >> {place}"])
        assert got.returncode != 0, f"nobody wrote into {place}"


def test_the_secret_writer_is_private_from_the_first_byte(tmp_path: Path) -> None:
    """`write_private` creates the file with its final mode whatever the umask (never a
    chmod after the fact), and never writes through a link planted in its place."""
    from deploy.procs import write_private

    old = os.umask(0)
    try:
        target = tmp_path / "secret.json"
        write_private(target, "s3cret")
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        victim = tmp_path / "victim"
        victim.write_text("untouched")
        link = tmp_path / "planted"
        link.symlink_to(victim)
        write_private(link, "s3cret", mode=0o640)
        assert victim.read_text() == "untouched"
        assert not link.is_symlink() and stat.S_IMODE(link.stat().st_mode) == 0o640
    finally:
        os.umask(old)


# --- item 9: nothing runs as root that need not; the state directory is ours -----------------

@root_only
def test_processes_started_as_root_run_unprivileged(hcluster: Cluster) -> None:
    import pwd

    from deploy.services import python_process

    assert hcluster.gateways and hcluster.agents
    launched = [p for p in hcluster.processes if p.name.startswith(("gateway", "delay-proxy"))]
    assert len(launched) == 2
    for proc in launched:
        assert proc.pid is not None
        uid = proc_status(proc.pid)["Uid"]
        assert 0 not in uid, proc.name
        assert pwd.getpwuid(uid[0]).pw_name != "postgres", proc.name  # not the database's user
        assert 0 not in proc_status(proc.pid)["Groups"], proc.name
    postgres = pwd.getpwnam("postgres").pw_uid
    for host, agent in hcluster.agents.items():
        assert agent.pid is not None and proc_status(agent.pid)["Uid"][0] == postgres, agent.name
        service = hcluster.service_pid(host)
        assert service is not None and 0 not in proc_status(service)["Uid"], host
    # Controllers start as gateways do (Cluster._start_controllers: python_process, whose
    # user is the unprivileged one when the launcher is root).
    controller = python_process("controller[x]", "failover", [], hcluster.state_dir / "x.log")
    assert controller.user not in (None, "root", "postgres")


def test_a_state_dir_another_user_made_is_refused(tmp_path: Path) -> None:
    from deploy.cli import default_state_dir
    from deploy.cluster import StateDirError, prepare_state_dir

    taken = tmp_path / "taken"
    taken.mkdir()
    if ROOT:  # pre-created by nobody
        os.chown(taken, 65534, 65534)
    else:
        subprocess.run(["sudo", "-n", "chown", "65534:65534", str(taken)], check=True, timeout=30)
    with pytest.raises(StateDirError, match="owned by"):
        prepare_state_dir(taken)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(StateDirError, match="writable"):
        prepare_state_dir(open_dir)
    fresh = tmp_path / "fresh"
    prepare_state_dir(fresh)
    assert fresh.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(fresh.stat().st_mode) == (0o711 if ROOT else 0o700)
    env = {k: v for k, v in os.environ.items() if k != "BOXOFFICE_STATE_DIR"}
    saved = os.environ.copy()
    try:
        os.environ.clear()
        os.environ.update(env)
        assert not str(default_state_dir()).startswith("/tmp")
    finally:
        os.environ.clear()
        os.environ.update(saved)
