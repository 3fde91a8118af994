#!/usr/bin/env bash
# Installs what the multi-master tests need on a fresh Debian machine, as root:
#   - PostgreSQL server binaries (Debian's `postgresql`) and the `postgres` OS user they run as;
#   - crossbar (the WAMP router) and psycopg2 in the project venv.
# Idempotent and quiet; a second run only checks (well under a second). It starts nothing: the
# tests start a throwaway cluster and router of their own on free loopback ports.
#
# Usage: bash tests/multimaster_setup.sh            (venv: .venv next to this repo, or $VENV)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

have_postgres() {
    { command -v initdb >/dev/null && command -v pg_ctl >/dev/null; } \
        || compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || return 1
    # postgres refuses to run as root: as root the tests run it as the `postgres` user
    [ "$(id -u)" -ne 0 ] || getent passwd postgres >/dev/null
}

if ! have_postgres; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "multimaster_setup: PostgreSQL is missing and only root can install it" >&2
        exit 1
    fi
    # The Debian package would also create (and, where it can, start) a `main` cluster on 5432:
    # the tests never use it, so skip it. postgresql-common reads this drop-in directory.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" \
        >/etc/postgresql-common/createcluster.d/buildbot-ec2-hybrid-tests.conf
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    have_postgres || { echo "multimaster_setup: PostgreSQL install failed" >&2; exit 1; }
fi

if [ ! -x "$PY" ]; then
    echo "multimaster_setup: no venv at $VENV (run 'make venv' first, or set VENV)" >&2
    exit 1
fi
# find_spec, not import: importing crossbar takes seconds, looking it up does not.
if ! "$PY" - <<'EOF'
import importlib.util
import sys

sys.exit(0 if all(importlib.util.find_spec(m) for m in ("crossbar", "psycopg2")) else 1)
EOF
then
    "$PY" -m pip install -qq --disable-pip-version-check \
        "crossbar>=26.10" "psycopg2-binary>=2.9" >/dev/null
fi
[ -x "$VENV/bin/crossbar" ] || { echo "multimaster_setup: $VENV/bin/crossbar missing" >&2; exit 1; }
