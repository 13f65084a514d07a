"""Handlers for the end-to-end tests (module ``e2e_handlers``, cwd = this folder).

``handler`` dispatches on ``event["action"]`` so one daemon can exercise many behaviours; the
other functions are used directly as handlers where a test needs a dedicated one.
"""

import os
import subprocess
import time

import handlers


def _append(path, text):
    with open(path, "a") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def marker(event, context):
    """Append this invocation's request id (and optional tag) to ``event["path"]``."""
    _append(event["path"], f"{context.aws_request_id} {event.get('tag', '')}".strip())
    if event.get("seconds"):
        time.sleep(float(event["seconds"]))
    return {"marked": event["path"], "pid": os.getpid()}


def spawn_and_hang(event, context):
    """Start a grandchild in our process group, record both pids, then hang past any timeout."""
    child = subprocess.Popen(["sleep", "120"])
    _append(event["path"], f"{os.getpid()} {child.pid}")
    time.sleep(120)


def handler(event, context):
    action = event.get("action", "echo") if isinstance(event, dict) else "echo"
    if action == "marker":
        return marker(event, context)
    if action == "spawn_and_hang":
        return spawn_and_hang(event, context)
    return getattr(handlers, action)(event, context)
