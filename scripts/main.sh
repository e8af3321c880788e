#!/usr/bin/env bash
# The main job: certpilot's whole lifecycle on the embedded defaults (SQLite inventory and a master key
# file in certpilot's home; a local Prefect server on SQLite), against a lab it starts on loopback:
# a private CA, TLS endpoints with a spread of expiry dates, an SSH host with nginx and haproxy;
# discovery, renewal of what is due, deployment, verification on the wire, a report.
# The Prefect server is left running so its UI keeps showing the runs; the address is printed at the end.
# So is `certpilot serve`, started after the lifecycle: it serves every deployment (their schedules fire)
# and certpilot's HTTP listener.
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
for blocks in issuers tls_scan ssh aws azure targets notifications policy; do
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
echo "== the policy: the inventory checked against it (exit 1: violations not waived, as the sample estate has)"
status=0
$certpilot policy check || status=$?
if [ "$status" -gt 1 ]; then exit "$status"; fi
echo
$certpilot report forecast --until 2029-12-31
echo
$certpilot audit verify
echo
# certpilot serve: every deployment served (schedules fire, runs started from the UI execute) and the HTTP
# listener (/metrics, /healthz, the private CAs' CRLs and OCSP), left running like the Prefect server. It
# listens where the lab CA's certificates say its CRL and OCSP are.
serve_listen=${CERTPILOT_SERVE_LISTEN:-127.0.0.1:8888}
serve_log="$(dirname "$log")/serve.log"
serve_pid_file="$(dirname "$log")/serve.pid"
serve_pid=$(cat "$serve_pid_file" 2>/dev/null || true)
if [ -n "$serve_pid" ] && ps -p "$serve_pid" -o args= 2>/dev/null | grep -q "certpilot serve"; then
  echo "== certpilot serve is already running (PID $serve_pid; log: $serve_log)"
else
  echo "== starting certpilot serve on $serve_listen (log: $serve_log)"
  nohup .venv/bin/certpilot serve --listen "$serve_listen" >"$serve_log" 2>&1 &
  serve_pid=$!  # nohup execs certpilot: this is the PID of the process itself
  echo "$serve_pid" >"$serve_pid_file"
  for _ in $(seq 120); do
    grep -q "deployments from the Prefect API" "$serve_log" && curl -fsS -m 2 "http://$serve_listen/healthz" >/dev/null 2>&1 && break
    kill -0 "$serve_pid" 2>/dev/null || break
    sleep 1
  done
  if ! grep -q "deployments from the Prefect API" "$serve_log" || ! kill -0 "$serve_pid" 2>/dev/null; then
    echo "certpilot serve did not start: see $serve_log" >&2
    tail -n 20 "$serve_log" >&2
    exit 1
  fi
fi
grep -m1 "deployments from the Prefect API" "$serve_log"
.venv/bin/prefect deployment ls
echo
echo "Prefect UI: http://127.0.0.1:$port  (deployments: each with its schedule and next run, and a run form; flow runs:"
echo "discover, renew-due, deploy-certificate, monitor, revoke-and-replace, reports; each certificate's history: filter the runs by the tag"
echo "certificate:www.lab.test). certpilot's listener: http://$serve_listen/metrics, /healthz, and the lab CA's"
echo "CRL and OCSP (http://$serve_listen/lab-ca/issuing.crl, /lab-ca/ocsp). Both keep running; stop them with:"
echo "  kill $serve_pid    # certpilot serve (SIGTERM: a clean stop)"
echo "  pkill -f 'prefect server start --host 127.0.0.1 --port $port'"
