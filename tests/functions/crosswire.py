"""A handler for the invocation-id tests (module ``crosswire``, cwd = this folder): it waits until
the file ``event["wait_for"]`` exists (at most 30 s), then returns the event with the pid that ran
it, so the test decides when each answer is posted and a caller can tell whose answer it got."""

import os
import time


def wait_then_echo(event, context):
    path = event.get("wait_for")
    deadline = time.monotonic() + 30
    while path and not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"event": event, "pid": os.getpid(), "request_id": context.aws_request_id}
