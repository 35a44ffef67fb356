#!/usr/bin/env bash
# The two commands of README.md:
#   scripts/dev.sh up     install what is missing, start the local multi-region cluster
#   scripts/dev.sh test   install what is missing, run the whole test suite
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
export PATH="$ROOT/.venv/bin:$PATH"
cmd="${1:-}"
shift || true
case "$cmd" in
  up)
    exec boxoffice up "$@"
    ;;
  test)
    ruff check .
    exec python -m pytest "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh up|test [args...]" >&2
    exit 2
    ;;
esac
