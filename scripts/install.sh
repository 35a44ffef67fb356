#!/usr/bin/env bash
# One installer for the run command, the test command and CI.
# Idempotent: every step checks first and returns at once when already done.
#   - a virtual environment (.venv) with the project and its test extras
#   - PostgreSQL 15 server binaries (apt), if missing
#   - chromium (apt), if no chromium or chrome is on PATH: the booking page test
#   - Consul: a `consul` already on PATH wins; otherwise the `consul` .deb of
#     Debian's previous stable suite, fetched with `apt-get download` through a
#     private sources list that reuses the mirror URI this machine already uses,
#     unpacked into .cache/consul and linked into .venv/bin.
#   - Prometheus and promtool (apt `prometheus`), if missing
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
VENV="$ROOT/.venv"
PG_BIN="/usr/lib/postgresql/15/bin"
CONSUL_SUITE="${BOXOFFICE_CONSUL_SUITE:-bullseye}"

step() { printf '[install] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@";
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@";
  else echo "[install] need root (or sudo) for: $*" >&2; return 1; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    step "apt-get update"
    as_root apt-get update -qq
    apt_updated=1
  fi
  step "apt-get install $*"
  # Do not let package scripts start system-wide services (the project starts its own).
  as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
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
  step "creating virtual environment in .venv"
  rm -rf "$VENV"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    apt_install python3-venv
    "$PY" -m venv "$VENV"
  fi
fi
stamp="$VENV/.boxoffice-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  step "installing the project and its test extras into .venv"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]"
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

# --- nginx and wrk (only the gateway benchmark uses them) ---------------------
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  apt_install nginx-light || step "nginx unavailable: the gateway benchmark's baseline will be skipped"
fi
if ! command -v wrk >/dev/null 2>&1; then
  apt_install wrk || step "wrk unavailable: the gateway benchmark will be skipped"
fi

# --- Prometheus and promtool (`boxoffice up` starts one; the rule tests run promtool) --
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  apt_install prometheus
fi

# --- a headless browser (the booking page's test drives it over CDP) ----------
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
  step "fetching consul from Debian's $CONSUL_SUITE suite"
  uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri="$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$f")"
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ]; then
    uri="$(awk '$1=="deb" && $0 !~ /security/ {for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
           /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1)"
  fi
  [ -n "$uri" ] || { echo "[install] no Debian mirror URI found in the apt sources" >&2; exit 1; }
  work="$CACHE/consul-apt"
  rm -rf "$work"; mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
  printf 'deb %s %s main\n' "$uri" "$CONSUL_SUITE" > "$work/sources.list"
  aptopts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
           -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
           -o "APT::Sandbox::User=$(id -un)" -o "Debug::NoLocking=1")
  apt-get "${aptopts[@]}" update -qq
  (cd "$work/deb" && apt-get "${aptopts[@]}" download consul >/dev/null)
  rm -rf "$CACHE/consul"; mkdir -p "$CACHE/consul"
  dpkg-deb -x "$work/deb"/consul_*.deb "$CACHE/consul"
  rm -rf "$work"
fi
if [ -x "$CACHE/consul/usr/bin/consul" ] && [ -z "$consul_on_path" -o "$consul_on_path" = "$VENV/bin/consul" ]; then
  ln -sf "$CACHE/consul/usr/bin/consul" "$VENV/bin/consul"
fi
chmod o+rx "$ROOT" 2>/dev/null || true
step "ready: $("$VENV/bin/python" --version), postgres $("$PG_BIN/postgres" --version | awk '{print $3}'), $("$VENV/bin/consul" version 2>/dev/null | head -n1 || consul version | head -n1)"
