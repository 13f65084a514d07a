#!/usr/bin/env bash
# Create .venv and install the project with everything its tests and examples need.
# Steps already done are skipped (a few milliseconds): pip runs again only when pyproject.toml or this
# script changed since its last success, the single files only when their sources changed; the
# fingerprints are kept in .venv/.setup-*. `rm .venv/.setup-*` forces both.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# sha256 of the named files, names and contents.
fingerprint() {
  { printf '%s\n' "$@"; cat "$@"; } | sha256sum | cut -d ' ' -f 1
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
installed=$(fingerprint pyproject.toml scripts/setup.sh)
if [ "$(cat .venv/.setup-installed 2>/dev/null)" != "$installed" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  echo "$installed" > .venv/.setup-installed
fi

mapfile -t sources < <(find src tools -name '*.py' -not -path '*/__pycache__/*' | LC_ALL=C sort)
built=$(fingerprint "${sources[@]}")
if [ "$(cat .venv/.setup-built 2>/dev/null)" != "$built" ] || [ ! -x bin/lambda-runtime-api-daemon ] \
    || [ ! -x bin/lambda-server ]; then
  # An editable install leaves our modules uncompiled, and with PYTHONDONTWRITEBYTECODE set (as on CI
  # machines) every start would compile them again: write the bytecode once (~25 ms of cold start).
  .venv/bin/python -m compileall -q src >/dev/null
  # The single-file executables bin/lambda-runtime-api-daemon and bin/lambda-server (not committed).
  .venv/bin/python tools/build_zipapp.py >/dev/null
  echo "$built" > .venv/.setup-built
fi
