#!/usr/bin/env bash
# Make sure wrk (the HTTP load generator `make bench` uses for P1) exists.
set -euo pipefail
if command -v wrk >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "wrk not found: installing it with apt-get" >&2
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
  command -v wrk >/dev/null 2>&1 && exit 0
fi
echo "wrk is required for the benchmarks. Install it: 'sudo apt-get install wrk' (Debian/Ubuntu)," >&2
echo "'brew install wrk' (macOS), or put a wrk binary on PATH." >&2
exit 1
