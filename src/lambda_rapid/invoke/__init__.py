"""The Invoke contract and its front doors: HTTP Invoke API, response streaming, AMQP-RPC."""
