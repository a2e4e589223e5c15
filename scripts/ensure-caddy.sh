#!/usr/bin/env bash
# Caddy, the reverse proxy of deploy/compose.yaml, for the test that runs deploy/Caddyfile in
# front of two instances (tests/test_deploy_proxy.py). Present: nothing to do. Missing and
# root: install the Debian package `caddy` and stop the service its postinst may start.
set -euo pipefail

if command -v caddy >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-caddy: caddy not found; install it as root: apt-get install caddy" >&2
    exit 1
fi
echo "ensure-caddy: installing the Debian package caddy" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends caddy >/dev/null
if command -v systemctl >/dev/null; then
    systemctl stop caddy 2>/dev/null || true
fi
command -v caddy >/dev/null
echo "ensure-caddy: $(caddy version)" >&2
