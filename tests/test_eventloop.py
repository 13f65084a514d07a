"""The HTTP-only daemon does not load OpenSSL; with AMQP on (TLS possible) it does."""

import subprocess
import sys

PROBE = """
import sys
from lambda_rapid.eventloop import new_event_loop
loop = new_event_loop(tls={tls})
import asyncio
from lambda_rapid.daemon import Daemon
async def serve():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    server.close()
loop.run_until_complete(serve())
print(type(loop).__module__, "_ssl" in sys.modules)
import ssl
print(hasattr(ssl, "create_default_context") and ssl.create_default_context() is not None)
"""


def run(tls: bool) -> list:
    r = subprocess.run([sys.executable, "-c", PROBE.format(tls=tls)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_http_only_loop_skips_openssl_but_ssl_still_imports_later():
    assert run(False) == ["uvloop", "False", "True"]


def test_tls_loop_loads_openssl():
    assert run(True) == ["uvloop", "True", "True"]
