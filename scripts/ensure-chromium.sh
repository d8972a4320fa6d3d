#!/usr/bin/env bash
# Make sure a Chromium binary exists for the job board's browser test (Debian's chromium package).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "chromium not found: installing Debian's chromium package with apt-get" >&2
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  command -v chromium >/dev/null 2>&1 && exit 0
fi
echo "chromium is required for tests/test_board.py: 'sudo apt-get install chromium' (Debian/Ubuntu)." >&2
exit 1
