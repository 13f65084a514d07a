#!/bin/sh
# Run the echo-lambda image with lambda-runtime-api-daemon bind-mounted where the image's
# entrypoint looks for aws-lambda-rie. Build the daemon first (from the repository root):
#   .venv/bin/python tools/build_zipapp.py
# AMQP_URI defaults to a RabbitMQ broker on this host; set AMQP_URI= (empty) for HTTP only.
# AMQP_USERNAME / AMQP_PASSWORD, when set, are passed on (RabbitMQ's guest user may only log in
# from localhost, and a container is not localhost to the broker).
cp ${PWD}/../../../bin/lambda-runtime-api-daemon .

docker run --rm  \
  -u $(id -u):$(id -g) \
  -p 8080:8080 \
  -v ${PWD}/lambda-runtime-api-daemon:/usr/local/bin/aws-lambda-rie \
  -e AWS_LAMBDA_FUNCTION_NAME=echo-lambda \
  -e AMQP_USERNAME -e AMQP_PASSWORD \
  -e AMQP_URI="${AMQP_URI-amqp://$(hostname -I | awk '{print $1}'):5672?connection_attempts=20&retry_delay=10&heartbeat=0}" \
  echo-lambda

rm lambda-runtime-api-daemon
