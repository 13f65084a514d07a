"""lambda-server: the AWS Lambda Invoke API (HTTP) routed by function name to daemons through RabbitMQ.

It has no pool and runs no function: each invoke becomes an AMQP-RPC request on the queue named
after the function, and the reply becomes the HTTP response. It depends on the Invoke contract
(``invoke.contract``) and the broker link (``amqp``), never on the daemon's own front doors.
"""
