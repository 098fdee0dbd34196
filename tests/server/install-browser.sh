#!/usr/bin/env bash
# Debian's chromium for the web-page test (driven by Playwright). Idempotent: does nothing
# when /usr/bin/chromium is already there. Needs root or passwordless sudo on a fresh machine.
set -euo pipefail
bash "$(dirname "$0")/../apt-install.sh" /usr/bin/chromium chromium
