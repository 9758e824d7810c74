#!/usr/bin/env bash
# Headless Chromium for tests/test_serve_browser.py: Debian's package, installed when missing and this
# user may (root with apt-get). Without it the browser test skips, saying so; nothing else needs it.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "gmem: installing Debian's chromium for the browser test (once per machine)"
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >build/chromium.log 2>&1; then
        exit 0
    fi
    echo "gmem: could not install chromium (build/chromium.log): the browser test will skip"
else
    echo "gmem: chromium not found (apt-get install chromium): the browser test will skip"
fi
exit 0
