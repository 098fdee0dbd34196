#!/usr/bin/env bash
# Installs a Debian package the tests need when its program is missing: apt-install.sh PROGRAM PACKAGE.
# Idempotent (does nothing when PROGRAM is on the PATH or is an existing path). Needs root or
# passwordless sudo on a fresh machine.
set -euo pipefail
program="$1"
package="$2"
if command -v "$program" >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "$package" >/dev/null
command -v "$program"
