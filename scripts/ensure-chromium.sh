#!/usr/bin/env bash
# Headless Chromium for the browser tests of the web console (tests/test_console_browser.py drives
# it with Playwright through its executable_path; nothing is downloaded at test time, and
# `playwright install` is never run).
#
# Present: nothing to do. Missing and root (CI on a fresh Debian): install the Debian package
# `chromium`. Missing and not root: say what to install and fail.
set -euo pipefail

find_chromium() {
    local candidate
    for candidate in "${CALLBRIDGE_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if find_chromium >/dev/null; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-chromium: no Chromium found (/usr/bin/chromium); install it as root: apt-get install chromium" >&2
    exit 1
fi

echo "ensure-chromium: installing the Debian package chromium" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null

if ! path=$(find_chromium); then
    echo "ensure-chromium: chromium installed but no /usr/bin/chromium" >&2
    exit 1
fi
echo "ensure-chromium: $path ($("$path" --version 2>/dev/null || echo 'version unknown'))" >&2
