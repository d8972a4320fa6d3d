#!/usr/bin/env bash
# Make sure a redis-server binary exists (the tests start their own throwaway servers from it).
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "redis-server not found: installing it with apt-get" >&2
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  # Debian's package may start a service on 6379; the tests do not use it.
  command -v redis-server >/dev/null 2>&1 && exit 0
fi
echo "redis-server is required. Install it: 'sudo apt-get install redis-server' (Debian/Ubuntu)," >&2
echo "'brew install redis' (macOS), or put a redis-server binary on PATH." >&2
exit 1
