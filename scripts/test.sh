#!/usr/bin/env bash
# The whole test suite, after setting up everything it needs (.venv, PostgreSQL on 127.0.0.1:5432).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --servers
exec .venv/bin/python -m pytest "$@"
