#!/usr/bin/env bash
# Headless Chromium and its WebDriver, for the web demo's browser test (tests/test_web_demo.py drives them with
# Selenium, which is told where both are, so that it never downloads a browser of its own).
#
# Run:  bash scripts/install_browser.sh
#
# Installs Debian's chromium and chromium-driver with apt-get, only when `chromium` or `chromedriver` is missing
# from PATH. Needs root for that; without root it prints the command to run and exits 1. Quiet on success apart
# from one line; on an apt failure it prints apt's output.
set -euo pipefail

PACKAGES=(chromium chromium-driver)

have_both() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

if have_both; then
    echo "install_browser: already installed: $(command -v chromium), $(command -v chromedriver)"
    exit 0
fi

install_command="apt-get update && apt-get install -y --no-install-recommends ${PACKAGES[*]}"
if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: chromium or chromedriver is missing, and installing them needs root. Run:" >&2
    echo "    sudo sh -c '$install_command'" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: chromium or chromedriver is missing and there is no apt-get here; install Chromium and" \
         "its matching chromedriver with your system's package manager, so that both are on PATH." >&2
    exit 1
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}"; } \
        >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_browser: apt-get failed (its output is above)." >&2
    exit 1
fi
if ! have_both; then
    echo "install_browser: apt-get installed ${PACKAGES[*]}, but chromium or chromedriver is still not on PATH." >&2
    exit 1
fi
echo "install_browser: installed ${PACKAGES[*]} ($(chromium --version 2>/dev/null || echo chromium))"
