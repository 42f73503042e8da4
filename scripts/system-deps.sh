#!/usr/bin/env bash
# Installs the Debian packages the tests talk to (openssl, curl, jq, git, nginx, haproxy, chromium), and what
# bench/gateway_bench.py needs besides (wrk, and gcc + libc6-dev to build its small
# client-certificate shim for wrk), when they are missing. Without root or apt, says loudly
# what is missing; the suites that need it then report themselves as not run (and fail in
# CI, where TWOFOLD_CI=1).
set -u
need=()
command -v openssl  >/dev/null 2>&1 || need+=(openssl)
command -v curl     >/dev/null 2>&1 || need+=(curl)
command -v jq       >/dev/null 2>&1 || need+=(jq)    # the README's walkthrough (tests/test_readme.py)
command -v git      >/dev/null 2>&1 || need+=(git)
command -v nginx    >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need+=(chromium)
command -v wrk      >/dev/null 2>&1 || need+=(wrk)
command -v cc       >/dev/null 2>&1 || need+=(gcc)
command -v haproxy  >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if command -v dpkg >/dev/null 2>&1; then
  dpkg -s libc6-dev >/dev/null 2>&1 || need+=(libc6-dev)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/twofold-apt.log 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/twofold-apt.log 2>&1; } \
    || { echo "system-deps: apt-get failed, see /tmp/twofold-apt.log" >&2; exit 1; }
else
  echo "!!! system-deps: missing ${need[*]} and no root/apt to install them;" >&2
  echo "!!! the suites that need them will be reported as NOT RUN." >&2
fi
