#!/usr/bin/env bash
# One installer for the run command, the test command and CI.
# Idempotent: every step checks first and returns at once when already done.
#   - a virtual environment (.venv): requirements.lock installed by pip in hash-checking
#     mode (every package pinned, every file's sha256 checked; the lock holds the runtime
#     dependencies, the test extra and the build backend) from a wheelhouse of the lock's
#     files (.cache/wheels), then the project itself,
#     editable, built with no other download (`bash scripts/dev.sh lock` regenerates the
#     lock; see scripts/lock.sh)
#   - PostgreSQL 15 server binaries (apt), if missing
#   - chromium (apt), if no chromium or chrome is on PATH: the browser tests
#   - Consul: a `consul` already on PATH wins; otherwise the `consul` .deb of
#     Debian's previous stable suite, fetched with `apt-get download` through a
#     private sources list that reuses the mirror URI this machine already uses,
#     unpacked into .cache/consul and linked into .venv/bin.
#   - Prometheus and promtool (apt `prometheus`), if missing
#   - as root: the `postgres` and `boxoffice` system users, if missing (the servers and
#     node agents run as postgres, every other process of `up` as boxoffice)
# The terminal gets one line per step; what pip and apt print goes to .cache/install.log,
# whose tail is shown when a step fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
VENV="$ROOT/.venv"
LOCK="$ROOT/requirements.lock"
LOG="$CACHE/install.log"
WHEELS="$CACHE/wheels"
PG_BIN="/usr/lib/postgresql/15/bin"
CONSUL_SUITE="${BOXOFFICE_CONSUL_SUITE:-bullseye}"

mkdir -p "$CACHE"
printf '== scripts/install.sh %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$LOG"

step() { printf '[install] %s\n' "$*" >&2; }

fail() {  # fail MESSAGE: the message, the log's tail and its path; the installer stops
  echo "[install] FAILED: $1; the last lines of $LOG:" >&2
  tail -n 25 "$LOG" | sed 's/^/    /' >&2
  echo "[install] full log: $LOG" >&2
  exit 1
}

logged() {  # logged DESCRIPTION CMD...: runs CMD with its output in the log only
  local what="$1"; shift
  printf '\n== %s\n$ %s\n' "$what" "$*" >> "$LOG"
  "$@" >> "$LOG" 2>&1
}

run() {  # run DESCRIPTION CMD...: one line on the terminal, output in the log, fatal on failure
  step "$1"
  logged "$@" || fail "$1"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@";
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@";
  else echo "need root (or sudo) for: $*"; return 1; fi
}

apt_updated=0
# apt_install [--optional] PACKAGE...: with --optional, a failure returns 1 instead of stopping
apt_install() {
  local optional=0
  if [ "$1" = "--optional" ]; then optional=1; shift; fi
  if [ "$apt_updated" -eq 0 ]; then
    run "apt-get update" as_root apt-get update
    apt_updated=1
  fi
  step "apt-get install $*"
  # Do not let package scripts start system-wide services (the project starts its own).
  logged "apt-get install $*" as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
    apt-get install -y --no-install-recommends "$@" && return 0
  [ "$optional" -eq 1 ] && return 1
  fail "apt-get install $*"
}

find_python() {
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

# --- Python 3.11 and the virtual environment --------------------------------
PY="$(find_python || true)"
if [ -z "$PY" ]; then
  apt_install python3 python3-venv python3-dev
  PY="$(find_python)"
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  rm -rf "$VENV"
  step "creating the virtual environment .venv"
  if ! logged "python -m venv" "$PY" -m venv "$VENV"; then
    apt_install python3-venv
    run "creating the virtual environment .venv" "$PY" -m venv "$VENV"
  fi
fi
# The stamp names what was installed: a new lock or a new pyproject.toml installs again.
stamp="$VENV/.boxoffice-installed"
want="$(cat "$LOCK" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
  # The lock's files go to a wheelhouse first (pip download skips those already there),
  # then are installed from it alone; tests/test_packaging.py installs from it too.
  rm -f "$WHEELS/.lock-sha256"
  run "downloading requirements.lock's packages into .cache/wheels (hash-checked)" \
    "${pip[@]}" download --require-hashes --no-deps -r "$LOCK" -d "$WHEELS"
  sha256sum "$LOCK" | cut -d' ' -f1 > "$WHEELS/.lock-sha256"
  run "installing them into .venv (hash-checked, no index)" \
    "${pip[@]}" install --require-hashes --no-index --find-links "$WHEELS" -r "$LOCK"
  # --no-index: what the project needs must already be there from the lock, so a
  # pyproject.toml that asks for more than the lock holds fails here, not in a test.
  step "installing the project into .venv (editable, no download)"
  logged "the project" "${pip[@]}" install --no-index --no-build-isolation -e "$ROOT[test]" \
    || fail "installing the project (if pyproject.toml's dependencies changed, run: bash scripts/dev.sh lock)"
  echo "$want" > "$stamp"
fi

# --- PostgreSQL 15 ------------------------------------------------------------
if [ ! -x "$PG_BIN/postgres" ] || [ ! -x "$PG_BIN/pg_basebackup" ] || [ ! -x "$PG_BIN/pgbench" ]; then
  apt_install postgresql-15 postgresql-client-15
fi
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  step "creating the postgres OS user"
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi
# When `up` runs as root, gateways, controllers and the delay proxy run as this
# unprivileged system user (node agents, their servers and booking services as postgres):
# deploy/procs.py `APP_USER`. No home, no login shell. `up` creates it too when missing.
if [ "$(id -u)" -eq 0 ] && ! id boxoffice >/dev/null 2>&1; then
  step "creating the boxoffice OS user (unprivileged: the services run as it under root)"
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin boxoffice
fi

# --- nginx and wrk (only the gateway benchmark uses them) ---------------------
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  apt_install --optional nginx-light || step "nginx unavailable: the gateway benchmark's baseline will be skipped"
fi
if ! command -v wrk >/dev/null 2>&1; then
  apt_install --optional wrk || step "wrk unavailable: the gateway benchmark will be skipped"
fi

# --- Prometheus and promtool (`boxoffice up` starts one; the rule tests run promtool) --
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  apt_install prometheus
fi

# --- a headless browser (the browser tests drive Debian's chromium through Playwright) --
have_chromium() {
  local c
  for c in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$c" >/dev/null 2>&1 && return 0
  done
  return 1
}
if ! have_chromium; then
  apt_install chromium
fi

# --- Consul -------------------------------------------------------------------
consul_on_path="$(PATH="${PATH//$VENV\/bin:/}" command -v consul || true)"
if [ -n "$consul_on_path" ] && [ "$consul_on_path" != "$VENV/bin/consul" ]; then
  :  # a consul already on PATH wins
elif [ ! -x "$CACHE/consul/usr/bin/consul" ]; then
  uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri="$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$f")"
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ]; then
    uri="$(awk '$1=="deb" && $0 !~ /security/ {for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
           /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | sed -n 1p || true)"
  fi
  [ -n "$uri" ] || { echo "[install] FAILED: no Debian mirror URI found in the apt sources" >&2; exit 1; }
  work="$CACHE/consul-apt"
  rm -rf "$work"; mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
  printf 'deb %s %s main\n' "$uri" "$CONSUL_SUITE" > "$work/sources.list"
  aptopts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
           -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
           -o "APT::Sandbox::User=$(id -un)" -o "Debug::NoLocking=1")
  run "consul: apt-get update of Debian's $CONSUL_SUITE suite (private lists)" apt-get "${aptopts[@]}" update
  run "consul: apt-get download" bash -c 'cd "$1" && shift && apt-get "$@" download consul' _ "$work/deb" "${aptopts[@]}"
  rm -rf "$CACHE/consul"; mkdir -p "$CACHE/consul"
  run "consul: unpacking into .cache/consul" bash -c 'dpkg-deb -x "$1"/consul_*.deb "$2"' _ "$work/deb" "$CACHE/consul"
  rm -rf "$work"
fi
if [ -x "$CACHE/consul/usr/bin/consul" ] && [ -z "$consul_on_path" -o "$consul_on_path" = "$VENV/bin/consul" ]; then
  ln -sf "$CACHE/consul/usr/bin/consul" "$VENV/bin/consul"
fi
chmod o+rx "$ROOT" 2>/dev/null || true
consul_bin="$VENV/bin/consul"; [ -x "$consul_bin" ] || consul_bin="consul"
# sed, not head: head would leave consul writing to a closed pipe (pipefail)
step "ready: $("$VENV/bin/python" --version), postgres $("$PG_BIN/postgres" --version | awk '{print $3}'), $("$consul_bin" version | sed -n 1p)"
