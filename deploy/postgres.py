"""Real PostgreSQL 15 servers, and the primitives that change a copy's role at run time.

Servers listen on 127.0.0.1 only (no Unix socket) and authenticate every connection
with scram-sha-256 (issue 21: with trust, any local user was superuser, and
`COPY ... FROM PROGRAM` ran a shell as `postgres`). Each cluster of servers has three
login roles, with passwords generated per cluster (`Credentials`):

- `postgres`, the superuser: the node agents' work (promote, ALTER SYSTEM, pg_rewind,
  the epoch row), the launcher's schema installation, operators' tools and tests;
- `replicator` (REPLICATION only): streaming replicas (`primary_conninfo`) and
  pg_basebackup;
- `boxoffice_app`, the booking services' role (`APP_ROLE`): no superuser, no
  membership of pg_execute_server_program or any other predefined role; it uses the
  tables, sequences and functions of the `boxoffice` database that the superuser
  creates (default privileges), and owns nothing.

No password ever appears on a command line (argv is public in /proc): libpq tools get it
in their environment (`libpq_env`), the booking services from a passfile
(`Credentials.passfile`, PGPASSFILE), the servers' `primary_conninfo` lives in
postgresql.auto.conf (0600, the data directory is 0700). Static settings go on the
postmaster command line.
Settings that must change while the server runs live in postgresql.auto.conf
and are changed with `ALTER SYSTEM` + `pg_reload_conf()` (a `-c` flag would
override `ALTER SYSTEM` for good):

- `primary_conninfo`: a standby is re-pointed at a new primary without a
  restart (PostgreSQL 13+ restarts its WAL receiver on reload);
- `synchronous_standby_names` and `synchronous_commit`: the synchronous set.

Rewind is always possible: `wal_log_hints=on` and `full_page_writes=on` even
in the non-durable test mode (pg_rewind needs both; `fsync=off` is fine).
The recipes (crash recovery in single-user mode before pg_rewind, a
checkpoint on the source first, the timeline checks) follow Patroni's
patroni/postgresql/rewind.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg

from common.lsn import optional_lsn_to_int
from deploy.procs import (
    ManagedProcess,
    chown_for_service,
    port_open,
    run,
    service_user,
    user_kwargs,
    wait_until,
)

PG_BIN = Path(os.environ.get("BOXOFFICE_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"
REPLICATION_ROLE = "replicator"
APP_ROLE = "boxoffice_app"
DATABASE = "boxoffice"
PROMOTE_POLL = 0.005  # seconds between checks that a promotion has finished
CONNECT_TIMEOUT = 3.0

# Settings owned by ALTER SYSTEM (postgresql.auto.conf), never by a `-c` flag: a flag would
# silently win over every later ALTER SYSTEM. Given in `PostgresServer.settings`, they only
# seed postgresql.auto.conf when the cluster is created.
RUNTIME_SETTINGS = frozenset({"synchronous_commit", "synchronous_standby_names", "primary_conninfo"})

SyncMode = Literal["zone", "region", "off"]

# pg_controldata's "Database cluster state" values after which pg_rewind may run at once.
CLEAN_STATES = ("shut down", "shut down in recovery")
# ... and those of a primary that was not shut down cleanly (a crash, a kill -9).
CRASHED_PRIMARY_STATES = ("in production", "shutting down", "in crash recovery")


def pg_tool(name: str) -> str:
    path = PG_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in {PG_BIN} or PATH: run scripts/install.sh")
    return found


@dataclass(frozen=True)
class Credentials:
    """The passwords of a cluster of servers' login roles (every copy of every shard of
    one cluster shares them: a replica is a copy of its primary's catalog)."""

    superuser: str
    replication: str
    app: str

    def __repr__(self) -> str:  # never a password in a log line or a test report
        return "Credentials(...)"

    @classmethod
    def generate(cls) -> Credentials:
        return cls(*(secrets.token_urlsafe(24) for _ in range(3)))

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Credentials:
        return cls(str(doc["superuser"]), str(doc["replication"]), str(doc["app"]))

    def password(self, role: str) -> str:
        return {SUPERUSER: self.superuser, REPLICATION_ROLE: self.replication, APP_ROLE: self.app}[role]

    def superuser_dsn(self, host: str, port: int, database: str = "postgres") -> str:
        """For in-process clients (asyncpg) only: never put it on a command line."""
        return f"postgresql://{SUPERUSER}:{self.superuser}@{host}:{port}/{database}"

    @staticmethod
    def app_dsn(host: str, port: int) -> str:
        """The booking services' DSN: no password in it (it comes from the passfile)."""
        return f"postgresql://{APP_ROLE}@{host}:{port}/{DATABASE}"

    def passfile(self, roles: tuple[str, ...] = (APP_ROLE,)) -> str:
        """A libpq passfile (PGPASSFILE; asyncpg reads it too) giving `roles` their
        passwords on any of the cluster's servers."""
        return "".join(f"*:*:*:{role}:{self.password(role)}\n" for role in roles)


def libpq_env(dsn: str) -> tuple[str, dict[str, str]]:
    """A URL DSN without its password, and the environment that gives a libpq tool the
    password (PGPASSWORD: only the tool's own user and root can read a process's
    environment, while its argv is every local user's)."""
    parts = urllib.parse.urlsplit(dsn)
    env = {**os.environ, "PGPASSFILE": os.devnull}
    if parts.password is None:
        return dsn, env
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = urllib.parse.unquote(parts.username or "")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=f"{urllib.parse.quote(user)}@{netloc}"))
    env["PGPASSWORD"] = urllib.parse.unquote(parts.password)
    return bare, env


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host, int(port)


def sync_standby_names(names: list[str], mode: SyncMode) -> str:
    """The `synchronous_standby_names` value for a synchronous set.

    zone:   `FIRST 1 (a, b)`: the first connected of the listed standbys, in order of
            priority (the home region's standby in the other zone);
    region: `ANY 1 (b, c)`: a quorum of one among the other regions' replicas;
    off:    '' (asynchronous).
    Names are application names (`PostgresServer.name`), double-quoted.
    """
    if mode == "off" or not names:
        if mode != "off":
            raise ValueError(f"sync mode {mode} needs at least one standby name")
        return ""
    listed = ", ".join(quote_ident(n) for n in names)
    if mode == "zone":
        return f"FIRST 1 ({listed})"
    if mode == "region":
        return f"ANY 1 ({listed})"
    raise ValueError(f"unknown sync mode {mode!r}")


@dataclass(frozen=True)
class Positions:
    """Where a copy is in its WAL. On a primary `current_lsn`/`flush_lsn` are set; on a
    standby `receive_lsn` (flushed by its WAL receiver), `replay_lsn`, and `streaming`."""

    in_recovery: bool
    timeline: int | None
    current_lsn: str | None = None
    flush_lsn: str | None = None
    receive_lsn: str | None = None
    replay_lsn: str | None = None
    streaming: bool = False
    sender: str | None = None  # "host:port" the WAL receiver streams from

    @property
    def role(self) -> str:
        return "standby" if self.in_recovery else "primary"

    @property
    def position(self) -> int | None:
        """The furthest WAL this copy holds durably (flush on a primary, receive or
        replay on a standby), as an integer for comparisons."""
        if not self.in_recovery:
            return optional_lsn_to_int(self.flush_lsn)
        held = (optional_lsn_to_int(self.receive_lsn), optional_lsn_to_int(self.replay_lsn))
        return max((v for v in held if v is not None), default=None)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "role": self.role}


@dataclass(frozen=True)
class RewindResult:
    rewound: bool  # False when pg_rewind found nothing to do
    crash_recovery: bool  # single-user crash recovery ran first
    output: str


class RewindError(RuntimeError):
    """pg_rewind (or the crash recovery before it) failed; the data directory may need a
    fresh base backup."""


# The timeline of a primary from its current WAL file name (pg_control_checkpoint() lags
# behind a promotion until the next checkpoint); of a standby from its WAL receiver, or its
# last restartpoint when it is not receiving.
POSITIONS_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       CASE WHEN pg_is_in_recovery() THEN
            coalesce((SELECT received_tli FROM pg_stat_wal_receiver),
                     (SELECT timeline_id FROM pg_control_checkpoint()))
       ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END AS timeline,
       CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn()::text END AS current_lsn,
       CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_flush_lsn()::text END AS flush_lsn,
       pg_last_wal_receive_lsn()::text AS receive_lsn,
       pg_last_wal_replay_lsn()::text AS replay_lsn,
       coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false) AS streaming,
       (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver) AS sender
"""


# What the booking services' role may do in the application database: read and write
# the public schema's tables, use its sequences and functions, which the superuser
# creates there (now and later: default privileges), nothing else (no TRUNCATE, no DDL).
# It owns nothing, so it can neither change the schema nor the epoch row's trigger
# (shard_service/sql/booking.sql); once the schema is installed, `APP_READ_ONLY_SQL`
# leaves it only reading the epoch row, which the node agents (superuser) write.
APP_GRANTS_SQL = f"""
REVOKE ALL ON DATABASE {DATABASE} FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE {DATABASE} TO {APP_ROLE};
GRANT USAGE ON SCHEMA public TO {APP_ROLE};
ALTER DEFAULT PRIVILEGES FOR ROLE {SUPERUSER} IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {APP_ROLE};
ALTER DEFAULT PRIVILEGES FOR ROLE {SUPERUSER} IN SCHEMA public
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {APP_ROLE};
ALTER DEFAULT PRIVILEGES FOR ROLE {SUPERUSER} IN SCHEMA public
    GRANT EXECUTE ON FUNCTIONS TO {APP_ROLE};
"""


APP_READ_ONLY_SQL = f"""
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON boxoffice_epoch FROM {APP_ROLE};
"""


async def restrict_app_role(dsn: str) -> None:
    """After the schema is installed on a primary (superuser `dsn` of its application
    database): the booking services' role reads the epoch row and cannot write it (a
    booking service cannot move its own fence). Replicas follow by replication."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        await conn.execute(APP_READ_ONLY_SQL)
    finally:
        await conn.close()


PRIMARY_TIMELINE_SQL = """
SELECT CASE WHEN NOT pg_is_in_recovery()
            THEN ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END
"""


def address_dsn(address: str, credentials: Credentials, database: str = "postgres") -> str:
    """The superuser DSN of the server at "host:port" (in-process clients only)."""
    host, port = parse_address(address)
    return credentials.superuser_dsn(host, port, database)


async def primary_timeline(address: str, credentials: Credentials) -> int | None:
    """The timeline of the primary at "host:port"; None when it is unreachable or in
    recovery (a rewind source must be a primary, as Patroni insists)."""
    try:
        conn = await asyncpg.connect(address_dsn(address, credentials), timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return None
    try:
        value = await conn.fetchval(PRIMARY_TIMELINE_SQL)
        return int(value) if value is not None else None
    except (OSError, asyncpg.PostgresError):
        return None
    finally:
        await conn.close()


@dataclass
class PostgresServer:
    """One PostgreSQL cluster (data directory + postmaster) on a TCP port."""

    name: str
    data_dir: Path
    port: int
    durable: bool = True
    settings: dict[str, str] = field(default_factory=dict)
    process: ManagedProcess | None = None
    host: str = "127.0.0.1"
    # The cluster's role passwords (a replica takes its primary's in `init_replica`).
    credentials: Credentials = field(default_factory=Credentials.generate)
    # Where the postmaster's log goes when this process starts it (default: beside the
    # data directory); a root launcher gives a directory of its own (procs.py).
    log_dir: Path | None = None

    @property
    def dsn(self) -> str:
        """The superuser's DSN of the application database, password included: for
        in-process clients (asyncpg), never a command line (see `libpq_env`)."""
        return self.credentials.superuser_dsn(self.host, self.port, DATABASE)

    @property
    def app_dsn(self) -> str:
        """The booking services' DSN (no password: the passfile gives it)."""
        return self.credentials.app_dsn(self.host, self.port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def admin_dsn(self, database: str = "postgres") -> str:
        return self.credentials.superuser_dsn(self.host, self.port, database)

    # -- creation --------------------------------------------------------
    def _prepare_parent(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir.parent, 0o700)
        chown_for_service(self.data_dir.parent)

    def init_primary(self) -> None:
        """initdb a new cluster (scram-sha-256, the superuser's password from a private
        file), start it, create the replication and application roles and the
        application database."""
        self._prepare_parent()
        with tempfile.TemporaryDirectory(prefix="boxoffice-initdb-") as scratch:
            pwfile = Path(scratch) / "pw"
            pwfile.write_text(self.credentials.superuser + "\n")  # in a 0700 directory
            chown_for_service(Path(scratch))
            chown_for_service(pwfile)
            run(
                [
                    pg_tool("initdb"),
                    "-D", str(self.data_dir),
                    "-U", SUPERUSER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                user=service_user(),
            )
        self._write_hba()
        self._seed_runtime_settings()
        self.start()
        self._psql(self.admin_dsn(), self._roles_sql())
        self._psql(self.admin_dsn(), f"CREATE DATABASE {DATABASE}")
        self._psql(self.admin_dsn(DATABASE), APP_GRANTS_SQL)

    def _roles_sql(self) -> str:
        c = self.credentials
        return (f"CREATE ROLE {REPLICATION_ROLE} WITH LOGIN REPLICATION"
                f" PASSWORD {quote_literal(c.replication)};\n"
                f"CREATE ROLE {APP_ROLE} WITH LOGIN PASSWORD {quote_literal(c.app)};\n")

    @staticmethod
    def _psql(dsn: str, sql: str) -> str:
        """Run SQL through psql, the password in its environment and the SQL on stdin."""
        bare, env = libpq_env(dsn)
        return run([pg_tool("psql"), "-q", "-X", "-w", "-v", "ON_ERROR_STOP=1", "-d", bare, "-f", "-"],
                   env=env, input=sql)

    def init_replica(self, primary: PostgresServer, via_port: int | None = None) -> None:
        """Clone `primary` with pg_basebackup and stream from it (through `via_port` if set)."""
        self.credentials = primary.credentials  # the same catalog, the same roles
        self._prepare_parent()
        self._base_backup(primary.host, primary.port)
        self._seed_runtime_settings()
        self.follow(primary, via_port)
        self.start()

    def _base_backup(self, host: str, port: int, timeout: float = 120.0) -> None:
        """pg_basebackup of the primary at host:port into the (absent) data directory."""
        run(
            [
                pg_tool("pg_basebackup"),
                "-h", host,
                "-p", str(port),
                "-U", REPLICATION_ROLE,
                "-w",
                "-D", str(self.data_dir),
                "-X", "stream",
                "-c", "fast",
                "--no-sync",
            ],
            user=service_user(),
            env={**os.environ, "PGPASSFILE": os.devnull, "PGPASSWORD": self.credentials.replication},
            timeout=timeout,
        )

    def rebuild_from(self, primary: str) -> None:
        """Re-create this stopped server's data directory from a fresh base backup of the
        primary at "host:port" (Patroni's reinitialise, after a rewind that cannot
        succeed). The old directory is moved aside to `<data_dir>.before-rebuild` (one
        kept, for a post-mortem; an earlier one is removed) before the backup is taken.
        Afterwards it still has to be configured as a standby and started."""
        if self.running():
            raise RuntimeError(f"{self.name} is running: stop it first")
        self.wait_stopped()
        aside = self.data_dir.with_name(self.data_dir.name + ".before-rebuild")
        shutil.rmtree(aside, ignore_errors=True)
        if self.data_dir.exists():
            self.data_dir.rename(aside)
        host, port = parse_address(primary)
        self._prepare_parent()
        self._base_backup(host, port, timeout=3600.0)

    def has_data(self) -> bool:
        """Whether the data directory holds a cluster (an interrupted rebuild leaves none)."""
        return (self.data_dir / "PG_VERSION").exists() and (self.data_dir / "global" / "pg_control").exists()

    def _seed_runtime_settings(self) -> None:
        seeded: dict[str, str | None] = {k: v for k, v in self.settings.items() if k in RUNTIME_SETTINGS}
        if seeded:
            self._set_auto_conf(seeded)

    def primary_conninfo(self, host: str, port: int) -> str:
        return (
            f"host={host} port={port} user={REPLICATION_ROLE} "
            f"password={self.credentials.replication} "
            f"application_name={self.name} connect_timeout=2"
        )

    def follow(self, primary: PostgresServer, via_port: int | None = None) -> None:
        """Configure this (stopped) server as a standby of `primary`."""
        self.follow_address(primary.host, via_port or primary.port)

    def follow_address(self, host: str | None, port: int | None) -> None:
        """Configure this (stopped) server as a standby of host:port (of nothing if None:
        it replays what it has and waits to be pointed somewhere)."""
        conninfo = self.primary_conninfo(host, port) if host is not None and port is not None else None
        self._set_auto_conf({"primary_conninfo": conninfo, "primary_slot_name": None})
        self._write(self.data_dir / "standby.signal", "")

    def _set_auto_conf(self, values: dict[str, str | None]) -> None:
        """Edit postgresql.auto.conf of a stopped server (None removes a setting); the
        file ALTER SYSTEM writes, so a running server's later ALTER SYSTEM still wins."""
        auto = self.data_dir / "postgresql.auto.conf"
        kept = [
            line for line in self._read(auto).splitlines()
            if line.split("=", 1)[0].strip() not in values
        ]
        kept += [f"{key} = {quote_literal(value)}" for key, value in values.items() if value is not None]
        self._write(auto, "\n".join(kept) + "\n")

    def _write_hba(self) -> None:
        self._write(
            self.data_dir / "pg_hba.conf",
            f"host replication {REPLICATION_ROLE} 127.0.0.1/32 scram-sha-256\n"
            f"host all {SUPERUSER},{APP_ROLE} 127.0.0.1/32 scram-sha-256\n",
        )

    def _read(self, path: Path) -> str:
        try:
            return path.read_text()
        except FileNotFoundError:
            return ""

    def _write(self, path: Path, text: str) -> None:
        """Write a file of the data directory (0600) as the data directory's owner: root
        never writes into a directory `postgres` owns (a link planted there would send
        root's write anywhere)."""
        user = service_user()
        if user is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text)
            return
        run(["sh", "-c", 'umask 077 && cat > "$1"', "sh", str(path)], user=user, input=text, cwd=Path("/"))

    # -- lifecycle ---------------------------------------------------------
    def parameters(self) -> dict[str, str]:
        """The postmaster's `-c` settings (never one of RUNTIME_SETTINGS)."""
        params = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "wal_keep_size": "512MB",
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            "wal_receiver_status_interval": "1s",
            # How soon a standby retries its source after a failure, re-reads a new
            # primary_conninfo, or follows its source onto a new timeline: the 5 s
            # default stalls a promotion's followers, and the first commit of a new
            # primary waits for a synchronous standby to have followed it.
            "wal_retrieve_retry_interval": "50ms",
            # pg_rewind needs hint-bit changes WAL-logged and full page images.
            "wal_log_hints": "on",
            "full_page_writes": "on",
            "logging_collector": "off",
            "log_line_prefix": f"%m [{self.name}] %p ",
            "log_min_messages": "warning",
            "cluster_name": self.name,
        }
        if not self.durable:
            params["fsync"] = "off"
        params.update({k: v for k, v in self.settings.items() if k not in RUNTIME_SETTINGS})
        return params

    def command_line(self) -> list[str]:
        argv = [pg_tool("postgres"), "-D", str(self.data_dir)]
        for key, value in self.parameters().items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def start(self, timeout: float = 60.0, wait: bool = True) -> None:
        """Start the postmaster in whatever role its data directory says (standby.signal
        or not); with `wait`, until it accepts connections."""
        self.wait_stopped()  # a previous postmaster's orphans would make this one refuse
        self.process = ManagedProcess(
            f"postgres[{self.name}]",
            self.command_line(),
            (self.log_dir or self.data_dir.parent) / f"{self.name}.log",
            user=service_user(),
            stop_signal=signal.SIGINT,  # fast shutdown
            death_signal=signal.SIGQUIT,  # immediate shutdown if we die
        )
        self.process.start()
        if not wait:
            return
        try:
            wait_until(
                self.accepting_connections,
                f"postgres {self.name} on port {self.port}",
                timeout=timeout,
                alive=self.process.running,
            )
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}\n--- {self.process.log_path} ---\n{self.process.log_tail(15)}") from None

    def start_as_standby(self, primary: str | None, timeout: float = 60.0, wait: bool = True) -> None:
        """(Re)start as a standby of `primary` ("host:port"), or of nothing (None).

        A primary that was not shut down cleanly is first taken through crash recovery in
        single-user mode (as Patroni does): started as a standby straight away, it could
        not reach a consistent state without its new source. Never after a rewind: the
        rewound directory ("in archive recovery", with a backup label) must replay from
        its source, and a crash recovery would replay its own diverged WAL instead.
        It is not rewound here: see `rewind_needed` and `rewind`.
        """
        self.prepare_standby(primary)
        self.start(timeout, wait)

    def prepare_standby(self, primary: str | None) -> None:
        """Everything `start_as_standby` does before the postmaster starts (slow: crash
        recovery may run), so a supervisor can do it off its event loop and start the
        postmaster itself."""
        if self.running():
            raise RuntimeError(f"{self.name} is running: stop it first")
        self.wait_stopped()
        # A base backup (`rebuild_from`) has a backup_label and its primary's "in
        # production" state: it must recover from its label, as a standby of its source; a
        # crash recovery would end recovery and write WAL of its own on the same timeline.
        if (self.controldata().get("Database cluster state") in CRASHED_PRIMARY_STATES
                and not (self.data_dir / "backup_label").exists()):
            self.crash_recovery()
        host, port = parse_address(primary) if primary else (None, None)
        self.follow_address(host, port)

    def start_as_primary(self, timeout: float = 60.0, wait: bool = True) -> None:
        """(Re)start a data directory that was last run as a primary, as the primary.

        A directory that was a standby is refused: starting it without standby.signal
        would make it a primary on its old timeline (no timeline switch, so its history
        could not be told apart from the old primary's). Start it as a standby and
        `promote()` it instead."""
        if self.running():
            raise RuntimeError(f"{self.name} is running: stop it first")
        if self.was_standby():
            raise RuntimeError(f"{self.name} was a standby: start it as one and promote it")
        self.start(timeout, wait)

    def was_standby(self) -> bool:
        """Whether the data directory was last started as a standby (a promotion removes
        standby.signal)."""
        return (self.data_dir / "standby.signal").exists()

    def accepting_connections(self) -> bool:
        if not port_open(self.host, self.port):
            return False
        proc = subprocess.run(
            [pg_tool("pg_isready"), "-q", "-h", self.host, "-p", str(self.port), "-U", SUPERUSER],
            check=False,
        )
        return proc.returncode == 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30.0)

    def crash(self) -> None:
        """Kill the postmaster with SIGKILL, as a host failure would."""
        if self.process is not None:
            self.process.kill()

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def stop_stray_postmaster(self) -> bool:
        """Stop (fast shutdown) a postmaster on this data directory that we did not start
        (postmaster.pid names a live process): a supervisor takes over only servers it
        started itself. True if there was one."""
        if self.running():
            return False
        status = subprocess.run([pg_tool("pg_ctl"), "status", "-D", str(self.data_dir)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                                **user_kwargs(service_user()))
        if status.returncode != 0:  # 3: not running; 4: no data directory
            return False
        run([pg_tool("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60"],
            user=service_user())
        return True

    def leftover_pids(self) -> list[int]:
        """Processes still working in the data directory: after a SIGKILL of the postmaster
        its backends linger until they notice, and a new postmaster refuses to start
        while they hold the old shared memory."""
        target = str(self.data_dir.resolve())
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "cwd") == target:
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def wait_stopped(self, timeout: float = 10.0) -> None:
        """Wait until no process of this server is left (see `leftover_pids`)."""
        wait_until(lambda: not self.running() and not self.leftover_pids(),
                   f"postgres {self.name} fully stopped", timeout=timeout)

    # -- state read from the data directory (server stopped or not) --------------
    def controldata(self) -> dict[str, str]:
        out = run([pg_tool("pg_controldata"), "-D", str(self.data_dir)], user=service_user(),
                  env={**os.environ, "LANG": "C", "LC_ALL": "C"})
        data: dict[str, str] = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                data[key.strip()] = value.strip()
        return data

    def local_timeline(self) -> int:
        """The timeline of the data directory's last state (a stopped server), as
        Patroni's rewind reads it: the minimum recovery point's for a standby that has
        one, else the latest checkpoint's."""
        data = self.controldata()
        if data.get("Database cluster state") in ("shut down in recovery", "in archive recovery"):
            tli = int(data.get("Min recovery ending loc's timeline", "0") or 0)
            if tli:
                return tli
        return int(data["Latest checkpoint's TimeLineID"])

    def rewind_needed(self, source_timeline: int) -> bool:
        """Whether this stopped server must go through `rewind` before it can follow a
        primary on `source_timeline`: when its own timeline differs, its history may
        have forked from the primary's (pg_rewind then decides, and says "no rewind
        required" when it had not). On the same timeline it cannot have diverged."""
        return self.local_timeline() != source_timeline

    # -- primitives on a running server (SQL) ------------------------------------
    async def _connect(self, database: str = DATABASE) -> asyncpg.Connection:
        return await asyncpg.connect(self.admin_dsn(database), timeout=CONNECT_TIMEOUT)

    async def positions(self) -> Positions:
        conn = await self._connect("postgres")
        try:
            row = await conn.fetchrow(POSITIONS_SQL)
        finally:
            await conn.close()
        assert row is not None
        return Positions(**dict(row))

    async def timeline(self) -> int:
        """The timeline the running server is on (see POSITIONS_SQL)."""
        return int((await self.positions()).timeline or 0)

    async def promote(self, timeout: int = 60) -> bool:
        """Promote this standby. Idempotent: False if it already was a primary.

        `pg_promote(wait => false)` signals the startup process at once, then this polls
        `pg_is_in_recovery()` every 5 ms on the same connection: `pg_promote(wait => true)`
        (and `pg_ctl promote`) poll every 100 ms, which is most of a promotion's time.
        """
        conn = await self._connect("postgres")
        try:
            if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                return False
            try:
                await conn.fetchval("SELECT pg_promote(wait => false)")
            except asyncpg.ObjectNotInPrerequisiteStateError:  # promoted meanwhile
                return False
            deadline = time.monotonic() + timeout
            while await conn.fetchval("SELECT pg_is_in_recovery()"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: promotion not finished after {timeout}s")
                await asyncio.sleep(PROMOTE_POLL)  # poll interval of a bounded wait
            return True
        finally:
            await conn.close()

    async def alter_system(self, values: dict[str, str | None]) -> None:
        """ALTER SYSTEM SET (RESET for None) each setting, then pg_reload_conf()."""
        conn = await self._connect("postgres")
        try:
            for key, value in values.items():
                if not re.fullmatch(r"[a-z_]+", key):
                    raise ValueError(f"not a setting name: {key!r}")
                if value is None:
                    await conn.execute(f"ALTER SYSTEM RESET {key}")
                else:
                    await conn.execute(f"ALTER SYSTEM SET {key} = {quote_literal(value)}")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

    async def repoint(self, primary_host: str, primary_port: int) -> bool:
        """Point this running standby at a new primary, without a restart (PostgreSQL 13+
        restarts the WAL receiver on reload). False if it already pointed there."""
        conninfo = self.primary_conninfo(primary_host, primary_port)
        conn = await self._connect("postgres")
        try:
            if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                raise RuntimeError(f"{self.name} is a primary: only a standby can be repointed")
            if await conn.fetchval("SELECT current_setting('primary_conninfo')") == conninfo:
                return False
        finally:
            await conn.close()
        await self.alter_system({"primary_conninfo": conninfo})
        return True

    async def set_sync_standbys(self, names: list[str], mode: SyncMode,
                                commit: str = "on") -> str:
        """Set the synchronous standby set at run time; returns the value set.

        `synchronous_commit = on` (not `remote_apply`): a commit returns once the
        synchronous standby has flushed its WAL, which is what no-loss failover needs
        (a promotion replays everything flushed before it opens). `remote_apply` would
        add the standby's replay to every commit's latency, and a replay paused by a
        query conflict on the standby would stall the primary's commits; reads on
        standbys are made consistent by the consistency tokens instead.
        """
        value = sync_standby_names(names, mode)
        await self.alter_system({"synchronous_standby_names": value, "synchronous_commit": commit})
        return value

    # -- pg tools (server stopped) --------------------------------------------------
    def crash_recovery(self) -> None:
        """Bring a data directory that was not shut down cleanly to a clean shutdown, by
        crash recovery in single-user mode (Patroni's `ensure_clean_shutdown`).
        standby.signal must go first: single-user mode refuses standby mode."""
        if self.running():
            raise RuntimeError(f"{self.name} is running: stop it first")
        self.wait_stopped()
        for signal_file in ("standby.signal", "recovery.signal"):
            (self.data_dir / signal_file).unlink(missing_ok=True)
        params = {k: v for k, v in self.parameters().items()
                  if k not in ("listen_addresses", "port", "unix_socket_directories")}
        argv = [pg_tool("postgres"), "--single", "-D", str(self.data_dir)]
        for key, value in params.items():
            argv += ["-c", f"{key}={value}"]
        argv.append("template1")
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300, check=False,
                              **user_kwargs(service_user()))
        if proc.returncode != 0:
            raise RewindError(f"{self.name}: crash recovery failed ({proc.returncode}):\n{proc.stdout}")

    def rewind(self, source_dsn: str) -> RewindResult:
        """Rewind this stopped server to the history of `source_dsn` (the primary).

        First, if it was not shut down cleanly, crash recovery in single-user mode; then
        a CHECKPOINT on the source, so that its pg_control holds the timeline it was
        promoted to (pg_rewind reads it from there); then pg_rewind as the service user.
        Afterwards the server still has to be configured as a standby and started
        (`start_as_standby`); pg_rewind has copied the source's postgresql.auto.conf.
        """
        if self.running():
            raise RuntimeError(f"{self.name} is running: stop it first")
        self.wait_stopped()
        state = self.controldata().get("Database cluster state")
        recovered = state not in CLEAN_STATES
        if recovered:
            self.crash_recovery()
        self._psql(source_dsn, "CHECKPOINT")
        bare, env = libpq_env(source_dsn)
        proc = subprocess.run(
            [pg_tool("pg_rewind"), "-D", str(self.data_dir), "--source-server", bare],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=600, check=False,
            env={**env, "LANG": "C", "LC_ALL": "C", "PGOPTIONS": "-c statement_timeout=0"},
            **user_kwargs(service_user()),
        )
        if proc.returncode != 0:
            raise RewindError(f"{self.name}: pg_rewind failed ({proc.returncode}):\n{proc.stdout}")
        return RewindResult("no rewind required" not in proc.stdout, recovered, proc.stdout)
