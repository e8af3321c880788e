#!/usr/bin/env bash
# The main job, on the embedded defaults (SQLite inventory and a master key file in certpilot's home):
# generate a fresh sample estate, import it, show the expiry report, verify the audit chain.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
certpilot=.venv/bin/certpilot

estate=$(mktemp -d "${TMPDIR:-/tmp}/certpilot-sample-estate.XXXXXX")
$certpilot sample-estate "$estate"
echo
echo "== importing the sample estate (one file in it is broken on purpose)"
status=0
$certpilot inventory import "$estate" --import-keys --owner platform-team --tag env=sample --quiet || status=$?
if [ "$status" -gt 1 ]; then exit "$status"; fi
echo
$certpilot report expiry
echo
$certpilot inventory list --expiring-within 30d
echo
$certpilot audit verify
