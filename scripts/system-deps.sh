#!/usr/bin/env bash
# Debian packages the test suite uses: mosquitto (the external-broker tests).
# Installs them when missing and we may (root, or passwordless sudo); otherwise says what to install.
set -u
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "note: please install ${need[*]} (apt-get install ${need[*]}); tests that need it will be skipped" >&2
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]} with apt-get ..." >&2
  $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null \
    || echo "warning: apt-get install ${need[*]} failed; tests that need it will be skipped" >&2
  # the Debian package starts a system mosquitto on :1883; our tests start their own on free ports
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi
else
  echo "note: install ${need[*]} with your package manager; tests that need it will be skipped" >&2
fi
exit 0
