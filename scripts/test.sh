#!/usr/bin/env bash
# The whole test suite, after setting up everything it needs (.venv, PostgreSQL on 127.0.0.1:5432):
# first the static checks (the layer contracts with import-linter, the types with mypy), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --servers
echo "== layer contracts (import-linter)"
.venv/bin/lint-imports --no-cache
echo "== types (mypy)"
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
