#!/usr/bin/env bash
# Debian's chromium for the web-page test (driven by Playwright). Idempotent: does nothing
# when /usr/bin/chromium is already there. Needs root or passwordless sudo on a fresh machine.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
