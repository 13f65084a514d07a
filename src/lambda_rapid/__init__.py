"""lambda_rapid: a Lambda Runtime API Daemon (Invoke API + AMQP-RPC in front of on-demand runtimes)."""

__version__ = "0.1.0"
