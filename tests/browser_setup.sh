#!/usr/bin/env bash
# Installs what the browser test (tests/test_www_page.py) drives: Debian's Chromium, its matching
# chromedriver and a font. Idempotent and quick when they are already there; the test runs it
# itself when they are missing, and CI may run it up front.
#
# Exit codes: 0 installed (or already there), 3 cannot install here (no apt-get, or not root
# and no passwordless sudo), anything else: the install failed.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver
PACKAGES=(chromium chromium-driver fonts-dejavu-core)

if [[ -x $CHROMIUM && -x $CHROMEDRIVER ]] && fc-list 2>/dev/null | grep -qi dejavu; then
    echo "browser_setup: $("$CHROMIUM" --version 2>/dev/null) and chromedriver already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser_setup: apt-get not found; install ${PACKAGES[*]} by other means" >&2
    exit 3
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "browser_setup: not root and no passwordless sudo; run as root:" \
            "apt-get update && apt-get install -y ${PACKAGES[*]}" >&2
        exit 3
    fi
fi

echo "browser_setup: installing ${PACKAGES[*]} with apt-get (a minute or two on a fresh machine)"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
"$CHROMIUM" --version
"$CHROMEDRIVER" --version
