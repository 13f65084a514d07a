#!/bin/sh
# Run the echo-lambda image with lambda-runtime-api-daemon bind-mounted where the image's
# entrypoint looks for aws-lambda-rie. Build the daemon first (from the repository root):
#   .venv/bin/python tools/build_zipapp.py
# AMQP_URI defaults to a RabbitMQ broker on this host; set AMQP_URI= (empty) for HTTP only.
# AMQP_USERNAME / AMQP_PASSWORD, when set, are passed on (RabbitMQ's guest user may only log in
# from localhost, and a container is not localhost to the broker).
# A broker that listens on loopback only (as on this project's test machines) is out of this
# container's reach: the daemon serves HTTP and keeps retrying; for AMQP-RPC run the image with
# --network host and AMQP_URI=amqp://127.0.0.1:5672/ (the README's "Containers" section).
# DOCKER: the engine's command (default docker; e.g. DOCKER=podman). PORT: the host port (8080).
cp ${PWD}/../../../bin/lambda-runtime-api-daemon .

${DOCKER:-docker} run --rm  \
  -u $(id -u):$(id -g) \
  -p ${PORT:-8080}:8080 \
  -v ${PWD}/lambda-runtime-api-daemon:/usr/local/bin/aws-lambda-rie \
  -e AWS_LAMBDA_FUNCTION_NAME=echo-lambda \
  -e AMQP_USERNAME -e AMQP_PASSWORD \
  -e AMQP_URI="${AMQP_URI-amqp://$(hostname -I | awk '{print $1}'):5672?connection_attempts=20&retry_delay=10&heartbeat=0}" \
  echo-lambda

rm lambda-runtime-api-daemon
