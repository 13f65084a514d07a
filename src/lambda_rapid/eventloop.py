"""The event loop: uvloop when it is installed, else asyncio's own.

uvloop imports :mod:`ssl` unconditionally, and OpenSSL is about 4 MB of the daemon's resident
memory. An HTTP-only daemon never speaks TLS, so unless TLS may be needed (AMQP on, or lambda-server)
uvloop and asyncio are imported against a stand-in ``ssl`` module that only satisfies their
import-time constants; the stand-in is removed again, so a later ``import ssl`` by anything else
gets the real module. Any surprise while doing so falls back to the normal import.
"""

from __future__ import annotations

import sys
import types


class _TlsUnavailable(Exception):
    """What the stand-in's classes raise: TLS was not loaded in this process."""


def _stand_in_ssl() -> types.ModuleType:
    module = types.ModuleType("ssl", "stand-in: TLS is not used by this process")

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name.isupper() or name.startswith(("SSL_ERROR", "CERT_", "PROTOCOL_", "OP_")):
            return 0
        return type(name, (_TlsUnavailable,), {})

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def _import_without_tls() -> None:
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return
    sys.modules["ssl"] = _stand_in_ssl()
    try:
        import asyncio  # noqa: F401
        try:
            import uvloop  # noqa: F401
        except ImportError:
            pass
    except Exception:
        for name in [n for n in sys.modules if n == "uvloop" or n.startswith(("uvloop.", "asyncio"))]:
            del sys.modules[name]
    finally:
        del sys.modules["ssl"]


def new_event_loop(tls: bool = True):
    """A new event loop; ``tls=False`` lets this process skip loading OpenSSL."""
    if not tls:
        _import_without_tls()
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
