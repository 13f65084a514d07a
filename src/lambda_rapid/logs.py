"""The daemon's own log lines: stderr, plain text or JSON (USE_STRUCTURED_LOGGING), at LOG_LEVEL.

Runtime output does not go through here (it goes to stdout unchanged, see process.OutputSink).
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, app: str) -> None:
        super().__init__()
        self.app = app

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "app": self.app,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup(level: str, structured: bool, app: str = "lambda-runtime-api-daemon") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if structured:
        handler.setFormatter(JsonFormatter(app))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d " + app + " %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
        logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries stay quieter than the daemon unless DEBUG was asked for.
    for noisy in ("aiormq", "aio_pika", "asyncio"):
        logging.getLogger(noisy).setLevel(level if level == "DEBUG" else "WARNING")
