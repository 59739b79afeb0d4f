#!/usr/bin/env bash
# Regenerate requirements.lock: every dependency of SmartClaw (runtime + the test and bench extras + the
# build backend for `pip install -e .`) pinned to one version, with the sha256 of every file PyPI has for it.
#
#   scripts/lock.sh               after changing [project] dependencies in pyproject.toml
#   scripts/lock.sh --upgrade     move every pin to the newest version pyproject.toml allows
#   scripts/lock.sh -P aiohttp    move one package only (any pip-compile option is passed on)
#
# pip-tools runs in a throwaway venv (nothing is installed into .venv), against PyPI only: local pip
# configuration (extra indexes, find-links) is ignored so the hashes are PyPI's. LOCK_INDEX_URL names another
# index (a mirror of PyPI). The lock is resolved for the interpreter $PY (default python3), which must be
# CPython 3.11 on Linux: the lock targets Linux CPython 3.11+ (newer versions work as long as the pinned
# releases ship wheels for them). Review the diff and commit requirements.lock with the pyproject.toml change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PIP_TOOLS_VERSION=7.7.0
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: resolve the lock with CPython 3.11 (the oldest supported), e.g. PY=python3.11 $0" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PIP_CONSTRAINT=
export PIP_INDEX_URL=${LOCK_INDEX_URL:-https://pypi.org/simple}
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "pip-tools==$PIP_TOOLS_VERSION"
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$tmp/venv/bin/pip-compile" --quiet \
  --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
  --extra test --extra bench --build-deps-for editable \
  --cache-dir "$tmp/cache" --output-file requirements.lock "$@" pyproject.toml
echo "wrote requirements.lock ($(grep -c '^[A-Za-z0-9]' requirements.lock) packages)" >&2
