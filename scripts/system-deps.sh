#!/usr/bin/env bash
# System packages SmartClaw needs, installed with apt-get when missing and we may (root or passwordless sudo).
#   scripts/system-deps.sh venv   - python3 >= 3.11 with venv/ensurepip (needed by `make demo` and `make test`)
#   scripts/system-deps.sh        - also mosquitto (the external-broker tests), chromium and a CJK font (the
#                                   browser tests, tests/browser: Debian's chromium, never a downloaded one)
set -u
PY=${PY:-python3}
need=()
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "error: $PY not found; install Python 3.11 or newer" >&2; exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: SmartClaw needs Python 3.11+, $PY is $("$PY" -V 2>&1); run: make PY=python3.11 ..." >&2; exit 1
fi
"$PY" -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ "${1:-}" != venv ]; then
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
  [ -x /usr/bin/chromium ] || need+=(chromium)
  if ! { command -v fc-list >/dev/null 2>&1 && fc-list :lang=zh-cn family | grep -q .; }; then need+=(fonts-noto-cjk); fi
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "note: please install ${need[*]} (sudo apt-get install ${need[*]})" >&2
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]} with apt-get ..." >&2
  $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null \
    || echo "warning: apt-get install ${need[*]} failed" >&2
  # the Debian package starts a system mosquitto on :1883; our tests start their own on free ports
  if [[ " ${need[*]} " == *" mosquitto "* ]] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi
else
  echo "note: install ${need[*]} with your package manager" >&2
fi
exit 0
