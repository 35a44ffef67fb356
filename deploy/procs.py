"""Starting, watching and stopping real child processes.

Every process we start gets:
- its own session (so a Ctrl-C aimed at the test runner does not kill a
  server halfway through our orderly teardown),
- a parent-death signal (so if the runner itself is killed hard, the kernel
  still stops the server: no process is left behind),
- a log file, private to its owner from the first byte, opened by the launcher in a
  directory only the launcher's user may write (never in another user's directory:
  root appending through a link planted there would write wherever the link points),
- least privilege when the launcher is root (issue 21): PostgreSQL, its tools and the
  node agents (which run pg_ctl's work, as Patroni does) run as `postgres`; every other
  Python process (gateways, controllers, the delay proxy, ...) as the unprivileged
  system user `boxoffice` (`APP_USER`, created by scripts/install.sh, or here when
  missing). A process run as another user gets that user's own groups only
  (`user_kwargs`: no inherited group root). Not root: everything runs as ourselves.

Secret files (configs with tokens, passfiles) are written by `write_private`: created
with their final mode (0600, or 0640 to a group that must read them) whatever the umask,
never through a link or an existing file planted in their place.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import grp
import os
import pwd
import random
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(sig: int) -> Callable[[], None]:
    def preexec() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


DB_USER = "postgres"  # database servers, their tools, the node agents (when root)
APP_USER = "boxoffice"  # every other process of ours (when root)


def service_user() -> str | None:
    """The OS user for database servers: `postgres` when we are root, else ourselves."""
    return DB_USER if os.geteuid() == 0 else None


def app_user() -> str | None:
    """The OS user for gateways, controllers, the delay proxy and other Python processes
    of ours: `boxoffice` when we are root (created if missing), else ourselves."""
    if os.geteuid() != 0:
        return None
    ensure_system_user(APP_USER)
    return APP_USER


def ensure_system_user(name: str) -> None:
    """Create a system user (no home, no login shell) if it does not exist; root only."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", name])


def user_kwargs(user: str | None) -> dict[str, Any]:
    """`subprocess` arguments that run a child as `user` with that user's own groups
    (its primary group and the groups it is a member of), never ours: with `user=`
    alone, a child of root keeps gid 0 and root's supplementary groups."""
    if user is None:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(user, pw.pw_gid)}


def chown_for_service(path: Path) -> None:
    """Give a directory to the service user (a no-op when not root)."""
    user = service_user()
    if user is None:
        return
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def private_dir(path: Path, owner: str | None = None, mode: int = 0o700) -> Path:
    """Create (or narrow) a directory owned by `owner` (None: ourselves) with `mode`,
    created with that mode from the start. An existing one must be a real directory."""
    try:
        path.mkdir(mode=mode, parents=False)
    except FileExistsError:
        if path.is_symlink() or not path.is_dir():
            raise RuntimeError(f"{path} exists and is not a directory") from None
    if owner is not None:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    os.chmod(path, mode, follow_symlinks=False)
    return path


def write_private(path: Path, text: str | bytes, *, mode: int = 0o600, owner: str | None = None,
                  group: str | None = None) -> None:
    """Write a secret file private from its first byte: whatever is at `path` (a file, a
    planted link) is removed first, then the file is created exclusively (O_EXCL: never
    through a link) with `mode` (fchmod'ed at once: the umask cannot widen or narrow it)
    and handed to `owner`/`group` before a byte is written. The directory must be one
    only we can write (else another user could race the create)."""
    data = text.encode() if isinstance(text, str) else text
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o600)
    try:
        uid = pwd.getpwnam(owner).pw_uid if owner else -1
        gid = grp.getgrnam(group).gr_gid if group else -1
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


@functools.cache
def python_user(user: str | None) -> str | None:
    """The user to run our Python processes as: `user` when it can run this project's
    interpreter and import it (see python_command), else ourselves, said once on stderr.
    A checkout in a private home (e.g. under /root) cannot be read by `postgres` or
    `boxoffice`; refusing to start there would make the platform unusable from such a
    checkout, so the launcher runs its Python processes as itself and says so (the
    database servers still run as `postgres`). tests/test_host_privilege.py fails then,
    naming the users the processes run as."""
    if user is None:
        return None
    try:
        python_command(user)
    except RuntimeError as exc:
        print(f"warning: {exc}; running boxoffice's Python processes as "
              f"{pwd.getpwuid(os.geteuid()).pw_name} instead", file=sys.stderr, flush=True)
        return None
    return user


@functools.cache
def python_command(user: str | None) -> tuple[tuple[str, ...], dict[str, str]]:
    """How to start our Python as `user`: the interpreter's argv prefix and the extra
    environment. Our own interpreter when `user` can run it and import the project;
    else (a virtual environment made from an interpreter in a private home, e.g. pyenv
    under /root) the system interpreter of the same version with this environment's
    site-packages and the project on PYTHONPATH. Raises when neither works: the project
    must be readable by the user the services run as."""
    if user is None:
        return (sys.executable,), {}
    project = str(Path(__file__).resolve().parent.parent)
    probe = "import deploy, gateway, node_agent, shard_service, failover, aiohttp, asyncpg"
    candidates: list[tuple[tuple[str, ...], dict[str, str]]] = [((sys.executable,), {})]
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin")
    if system:
        path = [project, *site.getsitepackages()]
        candidates.append(((system,), {"PYTHONPATH": os.pathsep.join(path)}))
    for argv, env in candidates:
        try:
            proc = subprocess.run([*argv, "-c", probe], env={**os.environ, **env}, cwd="/",
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                                  timeout=60, **user_kwargs(user))
        except OSError:  # not even executable for it
            continue
        if proc.returncode == 0:
            return argv, env
    raise RuntimeError(
        f"the user {user!r} cannot run {sys.executable} with this project ({project}): put the "
        f"project and its virtual environment where {user!r} can read them")


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _reservations_path() -> Path:
    """The ports book ("port pid" lines) shared by this user's processes, in a place no
    other user can take first: root's in /run, a user's in ~/.cache (a fixed name in /tmp
    could be made, or linked elsewhere, by anyone)."""
    if os.geteuid() == 0 and Path("/run").is_dir():
        return Path("/run/boxoffice-ports")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    if not cache.is_absolute():
        cache = Path.home() / ".cache"
    return cache / "boxoffice-ports"


RESERVATIONS = _reservations_path()


def _open_reservations() -> Any:
    """The ports book, opened for reading and appending: ours, never through a link."""
    RESERVATIONS.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(RESERVATIONS, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise PermissionError(f"{RESERVATIONS} is not ours")
    return os.fdopen(fd, "a+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A port nothing listens on, for a server we are about to start.

    Chosen below the kernel's ephemeral range, so that no outgoing connection
    can be given it as its local port between now and the server's bind (with
    many connections open, a port from bind(0) is taken that way now and then),
    never the same port twice from this process, and never a port another live
    process on this machine took from here: every port handed out is written, with
    the pid, to a shared reservations file under a file lock (two test sessions or
    `up`s at once would otherwise pick the same free port before either binds it).
    """
    low, _ = _ephemeral_range()
    first, last = (20000, low) if low - 20000 >= 2000 else (1024, low)
    with _open_reservations() as book:
        fcntl.flock(book, fcntl.LOCK_EX)  # released when the file closes
        book.seek(0)
        live: list[tuple[int, int]] = []
        for line in book.read().split("\n"):
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                port, pid = int(parts[0]), int(parts[1])
                if pid == os.getpid() or _alive(pid):
                    live.append((port, pid))
        taken = {port for port, _ in live} | _handed_out
        chosen = None
        for _ in range(500):
            port = random.randrange(first, last)
            if port in taken:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            chosen = port
            break
        if chosen is None:  # crowded: let the kernel pick
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                chosen = int(sock.getsockname()[1])
        _handed_out.add(chosen)
        live.append((chosen, os.getpid()))
        book.seek(0)
        book.truncate()  # rewritten without the dead processes' reservations
        book.write("".join(f"{port} {pid}\n" for port, pid in live))
        return chosen


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float = 30.0,
    interval: float = 0.05,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll `check` until it is true; fail fast if `alive` says the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: process exited before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(interval)


def run(
    argv: Sequence[str],
    *,
    user: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
    input: str | None = None,
) -> str:
    """Run a short command to completion (as `user`, with its own groups); raise with its
    output if it fails. Secrets go in `input` or `env`, never in `argv` (which every
    local user can read in /proc)."""
    proc = subprocess.run(
        list(argv),
        env=env,
        cwd=cwd,
        input=input,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
        **user_kwargs(user),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}")
    return str(proc.stdout)


def open_private_log(path: Path) -> BinaryIO:
    """Open a process log for appending, readable and writable by its owner only from
    the first byte (logs carry booking ids, which are enough to cancel a booking); an
    older log with wider rights is narrowed. Never through a link (O_NOFOLLOW), never a
    file of another user or with other names (a hard link planted in its place)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise PermissionError(f"{path}: a log must be ours and have one name")
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


class ManagedProcess:
    """A long-running child process with a log file and a guaranteed stop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        user: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
        death_signal: int = signal.SIGKILL,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.user = user
        self.env = env
        self.cwd = cwd
        self.stop_signal = stop_signal
        self.death_signal = death_signal
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self) -> None:
        if self.running():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open_private_log(self.log_path)
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                # Another user's process starts in / (our working directory may be
                # private to us), unless told otherwise.
                cwd=self.cwd if self.cwd is not None or self.user is None else Path("/"),
                start_new_session=True,
                preexec_fn=_die_with_parent(self.death_signal),
                **user_kwargs(self.user),
            )
        finally:
            log.close()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            assert self.popen is not None
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0, sig: int | None = None) -> None:
        """Stop politely, then by force; always reap."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.signal(sig if sig is not None else self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                # Kill the whole session: the process and anything it forked.
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(10)

    def kill(self) -> None:
        """Hard kill (a crash, for failure drills and tests)."""
        self.stop(timeout=5.0, sig=signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
