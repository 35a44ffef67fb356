#!/usr/bin/env bash
# The two commands of README.md:
#   scripts/dev.sh up     install what is missing, start the local multi-region cluster
#   scripts/dev.sh test   install what is missing, run the whole test suite
# and for maintainers:
#   scripts/dev.sh lock [--upgrade | --upgrade-package NAME]
#                         regenerate requirements.lock from pyproject.toml (scripts/lock.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${1:-}" = "lock" ]; then
  shift
  exec bash scripts/lock.sh "$@"
fi
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
    mypy  # the packages and rules in pyproject.toml's [tool.mypy]
    exec python -m pytest "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh up|test|lock [args...]" >&2
    exit 2
    ;;
esac
