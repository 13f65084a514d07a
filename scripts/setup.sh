#!/usr/bin/env bash
# Create .venv and install the project with everything its tests and examples need.
# Safe to run again: pip only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# An editable install leaves our modules uncompiled, and with PYTHONDONTWRITEBYTECODE set (as on CI
# machines) every start would compile them again: write the bytecode once (~25 ms of cold start).
.venv/bin/python -m compileall -q src >/dev/null
# The single-file executables bin/lambda-runtime-api-daemon and bin/lambda-server (not committed).
.venv/bin/python tools/build_zipapp.py >/dev/null
