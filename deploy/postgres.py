"""Real PostgreSQL 15 servers: a primary, or a streaming replica of one.

Servers listen on 127.0.0.1 only, with trust authentication (local
development and tests). Static settings go on the postmaster command line;
`primary_conninfo` lives in postgresql.auto.conf so a replica can be
re-pointed at a new primary after a switchover.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from deploy.procs import ManagedProcess, chown_for_service, port_open, run, service_user, wait_until

PG_BIN = Path(os.environ.get("BOXOFFICE_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"
DATABASE = "boxoffice"


def pg_tool(name: str) -> str:
    path = PG_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in {PG_BIN} or PATH: run scripts/install.sh")
    return found


@dataclass
class PostgresServer:
    """One PostgreSQL cluster (data directory + postmaster) on a TCP port."""

    name: str
    data_dir: Path
    port: int
    durable: bool = True
    settings: dict[str, str] = field(default_factory=dict)
    process: ManagedProcess | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    def admin_dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    # -- creation --------------------------------------------------------
    def _prepare_parent(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir.parent, 0o755)
        chown_for_service(self.data_dir.parent)

    def init_primary(self) -> None:
        """initdb a new cluster, start it and create the application database."""
        self._prepare_parent()
        run(
            [
                pg_tool("initdb"),
                "-D", str(self.data_dir),
                "-U", SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            user=service_user(),
        )
        self._write_hba()
        self.start()
        run([pg_tool("psql"), "-q", "-X", "-d", self.admin_dsn(), "-c", f"CREATE DATABASE {DATABASE}"])

    def init_replica(self, primary: PostgresServer, via_port: int | None = None) -> None:
        """Clone `primary` with pg_basebackup and stream from it (through `via_port` if set)."""
        self._prepare_parent()
        run(
            [
                pg_tool("pg_basebackup"),
                "-h", "127.0.0.1",
                "-p", str(primary.port),
                "-U", SUPERUSER,
                "-D", str(self.data_dir),
                "-X", "stream",
                "-c", "fast",
                "--no-sync",
            ],
            user=service_user(),
        )
        self.follow(primary, via_port)
        self.start()

    def follow(self, primary: PostgresServer, via_port: int | None = None) -> None:
        """Configure this (stopped) server as a standby of `primary`."""
        conninfo = (
            f"host=127.0.0.1 port={via_port or primary.port} user={SUPERUSER} "
            f"application_name={self.name} connect_timeout=2"
        )
        auto = self.data_dir / "postgresql.auto.conf"
        kept = [
            line
            for line in self._read(auto).splitlines()
            if not line.startswith(("primary_conninfo", "primary_slot_name"))
        ]
        kept.append(f"primary_conninfo = '{conninfo}'")
        self._write(auto, "\n".join(kept) + "\n")
        self._write(self.data_dir / "standby.signal", "")

    def _write_hba(self) -> None:
        self._write(
            self.data_dir / "pg_hba.conf",
            "host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n",
        )

    def _read(self, path: Path) -> str:
        try:
            return path.read_text()
        except FileNotFoundError:
            return ""

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        user = service_user()
        if user is not None:
            shutil.chown(path, user, user)
        os.chmod(path, 0o600)

    # -- lifecycle ---------------------------------------------------------
    def command_line(self) -> list[str]:
        params = {
            "listen_addresses": "127.0.0.1",
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
            "wal_retrieve_retry_interval": "500ms",
            "logging_collector": "off",
            "log_line_prefix": f"%m [{self.name}] %p ",
            "log_min_messages": "warning",
            "cluster_name": self.name,
        }
        if not self.durable:
            params.update({"fsync": "off", "full_page_writes": "off"})
        params.update(self.settings)
        argv = [pg_tool("postgres"), "-D", str(self.data_dir)]
        for key, value in params.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def start(self, timeout: float = 60.0) -> None:
        self.process = ManagedProcess(
            f"postgres[{self.name}]",
            self.command_line(),
            self.data_dir.parent / f"{self.name}.log",
            user=service_user(),
            stop_signal=signal.SIGINT,  # fast shutdown
            death_signal=signal.SIGQUIT,  # immediate shutdown if we die
        )
        self.process.start()
        try:
            wait_until(
                self.accepting_connections,
                f"postgres {self.name} on port {self.port}",
                timeout=timeout,
                alive=self.process.running,
            )
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}\n--- {self.process.log_path} ---\n{self.process.log_tail(15)}") from None

    def accepting_connections(self) -> bool:
        if not port_open("127.0.0.1", self.port):
            return False
        proc = subprocess.run(
            [pg_tool("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER],
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

    def promote(self) -> None:
        run([pg_tool("pg_ctl"), "promote", "-w", "-D", str(self.data_dir)], user=service_user())

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
