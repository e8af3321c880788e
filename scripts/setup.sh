#!/usr/bin/env bash
# Everything certpilot needs on a fresh Debian 12 machine with Python 3.11+, idempotent and quick when
# nothing changed: a virtual environment in .venv with certpilot and its test tools installed.
# With --servers it also installs the Debian packages of the real servers the tests
# and the main job's lab run (pebble, sshd, nginx, haproxy, openssl, curl) and makes sure the local
# PostgreSQL server (127.0.0.1:5432) is up.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "certpilot needs Python 3.11 or newer" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.certpilot-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing certpilot and its dependencies into .venv (about a minute the first time)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c 'import cli.main, prefect, sqlmodel, cryptography' # fail here, not later, if the install did
  echo "$wanted" > "$stamp"
fi

if [ "${1:-}" = "--servers" ]; then
  # Debian packages of the real servers the tests use: pebble ships pebble and pebble-challtestsrv (ACME).
  debs=(pebble openssl openssh-server nginx haproxy socat curl chromium prometheus softhsm2)  # openssl: the private CA tests check CRLs, OCSP and chains; sshd, nginx and haproxy: the deployment targets; chromium: the console test loads the Prefect UI headless; prometheus: promtool checks the shipped alert rules and a real Prometheus scrapes /metrics; softhsm2: a PKCS#11 token for the CA key custody tests
  missing=()
  for deb in "${debs[@]}"; do dpkg -s "$deb" >/dev/null 2>&1 || missing+=("$deb"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432 -t 3 2>/dev/null; then
    echo "setup: starting PostgreSQL"
    cluster=$(ls /etc/postgresql 2>/dev/null | head -n 1)
    [ -n "$cluster" ] || { echo "PostgreSQL is not installed: apt-get install -y postgresql" >&2; exit 1; }
    pg_ctlcluster --skip-systemctl-redirect "$cluster" main start
    for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 -t 1 && break; sleep 1; done
  fi
  pg_isready -h 127.0.0.1 -p 5432 -t 3
fi
