#!/usr/bin/env bash
# Debian's chromium for scripts/browser-check.sh, installed when missing (as
# root, with apt-get); otherwise one sentence saying what to do.
set -euo pipefail
command -v chromium >/dev/null && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium (Debian package) ..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  command -v chromium >/dev/null || { echo "install-chromium: apt-get ran but no chromium is on PATH" >&2; exit 1; }
else
  echo "install-chromium: chromium is not installed and this is not root with apt-get; install Debian's package (apt-get install chromium) and run again" >&2
  exit 1
fi
