#!/usr/bin/env bash
# PostgreSQL server binaries for the test suite (tests/pgserver.py starts its own server from
# /usr/lib/postgresql/<version>/bin; it never uses a system cluster).
#
# Present: nothing to do. Missing and root (CI on a fresh Debian): install the Debian package
# `postgresql`, and stop the cluster its postinst may have started. Missing and not root: say
# what to install and fail.
set -euo pipefail

PG_LIB=${CALLBRIDGE_PG_LIB:-/usr/lib/postgresql}

have_postgres() {
    compgen -G "$PG_LIB/*/bin/postgres" >/dev/null
}

if have_postgres; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-postgres: PostgreSQL server binaries not found ($PG_LIB/*/bin/postgres); install them as root: apt-get install postgresql" >&2
    exit 1
fi

echo "ensure-postgres: installing the Debian package postgresql" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null

# The package's postinst creates and may start a cluster (e.g. 15/main): the tests never use it.
if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters --no-header 2>/dev/null | while read -r version name _port status _rest; do
        case "$status" in
            online*) pg_ctlcluster "$version" "$name" stop || true ;;
        esac
    done
fi

if ! have_postgres; then
    echo "ensure-postgres: postgresql installed but no $PG_LIB/*/bin/postgres" >&2
    exit 1
fi
echo "ensure-postgres: $(ls -d "$PG_LIB"/*/bin/postgres | tail -n 1)" >&2
