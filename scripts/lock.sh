#!/usr/bin/env bash
# Regenerates requirements.lock, the lock file scripts/install.sh installs from.
#
#   bash scripts/dev.sh lock                              keep every pin that still fits pyproject.toml
#   bash scripts/dev.sh lock --upgrade-package ruff       move one package to its newest release
#   bash scripts/dev.sh lock --upgrade                    move everything to the newest releases
#
# The lock covers the runtime dependencies, the `test` extra and the build backend
# (pyproject's [build-system] requires), every one pinned exactly with the sha256 of
# each of its files, so the installer runs pip in hash-checking mode and builds the
# project itself with no other download.
#
# Why uv (`uv pip compile`) rather than pip-tools: it resolves for Linux on every CPU
# (`--universal`, markers kept) instead of only for the machine it runs on, it reads
# no pip configuration (a machine's local indexes and find-links cannot leak into the
# lock or its hashes), and it needs no venv of the project's to run in. uv is only the
# resolver here: installs stay plain pip, so a machine needs nothing but Python.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UV_VERSION="0.13.8"
TOOLS="$ROOT/.cache/lock-tools"
cd "$ROOT"

PY="$(command -v python3.11 || command -v python3)"
if ! "$TOOLS/bin/uv" --version 2>/dev/null | grep -qF "uv $UV_VERSION "; then
  echo "[lock] installing uv $UV_VERSION into .cache/lock-tools" >&2
  rm -rf "$TOOLS"
  "$PY" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" >/dev/null 2>&1 \
    || { echo "[lock] could not install uv $UV_VERSION" >&2; exit 1; }
fi

build_requires="$(mktemp "${TMPDIR:-/tmp}/build-requires.XXXXXX.in")"
trap 'rm -f "$build_requires"' EXIT
"$PY" -c 'import sys, tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' > "$build_requires"

echo "[lock] resolving pyproject.toml (runtime, test extra, build backend) into requirements.lock" >&2
"$TOOLS/bin/uv" pip compile --quiet \
  pyproject.toml "$build_requires" --extra test \
  --universal --python-version 3.11 \
  --generate-hashes \
  --custom-compile-command "bash scripts/dev.sh lock" \
  --output-file requirements.lock "$@"
sed -i "s#$build_requires#pyproject.toml's build-system.requires#" requirements.lock
echo "[lock] requirements.lock: $(grep -c '^[A-Za-z0-9]' requirements.lock) packages pinned" >&2
