#!/usr/bin/env bash
# The main job: certpilot's whole lifecycle on the embedded defaults (SQLite inventory and a master key
# file in certpilot's home; a local Prefect server on SQLite), against a lab it starts on loopback:
# a private CA, TLS endpoints with a spread of expiry dates, an SSH host with nginx and haproxy;
# discovery, renewal of what is due, deployment, verification on the wire, a report.
# The Prefect server is left running so its UI keeps showing the runs; the address is printed at the end.
# Then, as before: a sample estate imported from files, the expiry report and the audit chain's check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --servers
export PATH="$PWD/.venv/bin:$PATH"
certpilot=.venv/bin/certpilot

port=${CERTPILOT_UI_PORT:-4200}
export PREFECT_API_URL="http://127.0.0.1:$port/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false  # no telemetry calls beyond loopback
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
log="${CERTPILOT_HOME:-$data_home/certpilot}/prefect-server.log"
mkdir -p "$(dirname "$log")"
if ! curl -fsS -m 2 "$PREFECT_API_URL/health" >/dev/null 2>&1; then
  echo "== starting the Prefect server on 127.0.0.1:$port (about 20 s the first time; log: $log)"
  nohup .venv/bin/prefect server start --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
  for _ in $(seq 120); do
    curl -fsS -m 2 "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -fsS -m 2 "$PREFECT_API_URL/health" >/dev/null || { echo "the Prefect server did not start: see $log" >&2; exit 1; }
fi
for blocks in issuers tls_scan ssh aws azure targets notifications; do
  .venv/bin/prefect block register -m "blocks.$blocks" >/dev/null
done

.venv/bin/python scripts/lifecycle.py

echo
echo "== the inventory from files: a sample estate (one file in it is broken on purpose)"
estate=$(mktemp -d "${TMPDIR:-/tmp}/certpilot-sample-estate.XXXXXX")
$certpilot sample-estate "$estate"
status=0
$certpilot inventory import "$estate" --import-keys --owner platform-team --tag env=sample --quiet || status=$?
if [ "$status" -gt 1 ]; then exit "$status"; fi
echo
$certpilot report expiry
echo
$certpilot audit verify
echo
echo "Prefect UI: http://127.0.0.1:$port  (flow runs: discover, renew-due, deploy-certificate; each certificate's"
echo "history: filter the runs by the tag certificate:www.lab.test). The server keeps running; stop it with:"
echo "  pkill -f 'prefect server start --host 127.0.0.1 --port $port'"
