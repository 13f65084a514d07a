#!/usr/bin/env bash
# The main job: serve examples/echo/echo-lambda/echo.py over the Invoke API on http://localhost:8080
# (HTTP only, no broker needed). Extra environment variables (PORT, MAX_CONCURRENCY, ...) pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cd examples/echo/echo-lambda
export AWS_LAMBDA_FUNCTION_NAME=${AWS_LAMBDA_FUNCTION_NAME:-echo-lambda}
exec ../../../.venv/bin/lambda-runtime-api-daemon ../../../.venv/bin/python -m awslambdaric echo.handler
