#!/usr/bin/env bash
# Installs Debian's chromium for the browser test tier (driven by Python playwright with
# executable_path=/usr/bin/chromium). Never runs `playwright install`.
# Skipped when /usr/bin/chromium already exists.
set -euo pipefail
log() { echo "[install_browser] $*" >&2; }
if [ -x /usr/bin/chromium ]; then
  log "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else log "need root (or sudo) to apt-get install chromium"; exit 1; fi
fi
export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
$SUDO apt-get update -q
log "apt-get install chromium"
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation fonts-dejavu-core
log "installed: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
