"""``lambda-server``: environment -> ServerConfig -> the Invoke API routed through RabbitMQ.

Lifecycle in one place: listen at once (HTTP answers 503 until the broker is reached), keep the
broker link up, and on SIGTERM / SIGINT stop taking invokes, let the waiting ones finish briefly,
close the broker connection and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from .. import logs
from ..cli import info_requested, new_event_loop
from ..config import redact_uri
from ..http.server import HttpServer
from . import config as config_module

PROG = "lambda-server"
USAGE = f"""usage: {PROG}

Serve the AWS Lambda Invoke API over HTTP and route each invoke by function name, through RabbitMQ
(AMQP-RPC), to the lambda-runtime-api-daemons consuming the queue named after that function.
Settings are environment variables (INVOKE_API_HOST, PORT, AMQP_URI, AMQP_USERNAME, AMQP_PASSWORD,
AWS_LAMBDA_FUNCTION_TIMEOUT, LOG_LEVEL, USE_STRUCTURED_LOGGING): see the README."""
SHUTDOWN_GRACE = 10.0  # seconds waiting invokes get to receive their replies at shutdown

log = logging.getLogger(__name__)


async def serve(config: config_module.ServerConfig) -> int:
    from .router import Router  # imports aio-pika

    loop = asyncio.get_running_loop()
    router = Router(config)
    http = HttpServer(router, request_timeout=60.0, idle_timeout=600.0)
    try:
        await http.listen(config.invoke_host, config.invoke_port)
    except OSError as e:
        print(f"{PROG}: error: cannot listen on {config.invoke_host}:{config.invoke_port}: {e.strerror or e}",
              file=sys.stderr, flush=True)
        return 1
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("Invoke API on %s:%d, routing through %s (reply timeout %gs)", config.invoke_host,
             config.invoke_port, redact_uri(config.amqp_uri), config.timeout)
    router.link.start()
    await stopping.wait()
    log.info("stopping")
    http.close()
    await router.drain(min(SHUTDOWN_GRACE, config.timeout))
    await router.link.close()
    http.close_connections()
    log.info("stopped")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if info_requested(args, PROG, USAGE):
        return 0
    if args:
        print(f"{PROG}: error: unexpected arguments {' '.join(args)!r} (settings are environment variables)",
              file=sys.stderr)
        return 1
    try:
        config = config_module.load(os.environ)
    except config_module.ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1
    logs.setup(config.log_level, config.structured_logging, app=PROG)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(serve(config))
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
