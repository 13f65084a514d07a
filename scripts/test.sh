#!/usr/bin/env bash
# The whole test suite: set-up, RabbitMQ if it is down, then pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# podman and the Debian base image for tests/test_containers.py: once per machine (it says what the
# first run cost); where containers cannot be had (exit 77: not root, no apt-get) those tests skip.
./scripts/setup-containers.sh >/dev/null || [ $? -eq 77 ]
if command -v rabbitmqctl >/dev/null 2>&1; then
  if ! rabbitmqctl -q status >/dev/null 2>&1; then
    echo "starting RabbitMQ" >&2
    rabbitmq-server -detached || true
  fi
  rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 || rabbitmqctl await_startup
fi
.venv/bin/ruff check src tests bench examples tools
# No reruns: a test that fails once is a race in the product or a test that depends on timing it
# does not control, and either is a bug to fix.
exec .venv/bin/pytest -q "$@"
