"""An IO-bound echo for the scale-out bench (``bench/scale.py``) and ``tests/test_scale_churn.py``.

It sleeps ``SCALE_SLEEP_MS`` milliseconds (default 20), as a function waiting on a database would,
and answers with the host (``SCALE_HOST``, set per daemon) and function that ran it, so a caller
can tell which daemon did the work. With ``SCALE_RUNS_FILE`` set, every run of an event carrying
an ``"id"`` first appends ``"<id> <host>\\n"`` to that file: one write(2) on an O_APPEND descriptor,
so the lines of many runtimes on many daemons never interleave. The file then says how many times
each request ran (0: lost, 2: run twice). A run is recorded when it starts: a run cut short by a
killed daemon has still run, as far as the function's side effects go.
"""

import os
import time

HOST = os.environ.get("SCALE_HOST", "")
FUNCTION = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
SLEEP = float(os.environ.get("SCALE_SLEEP_MS", "20")) / 1000.0
_RUNS = os.environ.get("SCALE_RUNS_FILE")
_RUNS_FD = os.open(_RUNS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if _RUNS else None


def handler(event, context):
    request = event.get("id") if isinstance(event, dict) else None
    if _RUNS_FD is not None and request:
        os.write(_RUNS_FD, f"{request} {HOST}\n".encode())
    time.sleep(SLEEP)
    return {"host": HOST, "function": FUNCTION, "id": request}
