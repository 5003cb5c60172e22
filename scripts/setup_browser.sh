#!/usr/bin/env bash
# Debian's chromium and its driver, for the test that drives the server's page in a real headless
# browser (tests/test_serve.py). Installed where apt works as root; elsewhere that one test is
# skipped with a reason that names what is missing. Idempotent: nothing to do when both exist.
set -uo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup: no chromium/chromedriver and no root apt-get: the browser test will be skipped"
    exit 0
fi
echo "setup: installing Debian's chromium and chromium-driver (for the page test)"
if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
        >/tmp/twotower-setup-browser.log 2>&1; then
    echo "setup: chromium installed"
else
    echo "setup: could not install chromium (see /tmp/twotower-setup-browser.log): the browser test will be skipped"
fi
