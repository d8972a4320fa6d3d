#!/usr/bin/env bash
# Make sure a binary exists, installing its Debian package as root when it does not.
#   scripts/ensure-tool.sh BINARY DEBIAN_PACKAGE "what it is for"
set -euo pipefail
binary=$1 package=$2 purpose=$3
if command -v "$binary" >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "$binary not found: installing Debian's $package package with apt-get" >&2
  apt-get update -qq && apt-get install -y -qq "$package" >/dev/null
  command -v "$binary" >/dev/null 2>&1 && exit 0
fi
echo "$binary is required ($purpose). Install it: 'sudo apt-get install $package' (Debian/Ubuntu)," >&2
echo "or put a $binary binary on PATH." >&2
exit 1
