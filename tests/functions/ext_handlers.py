"""Handlers for the extension tests (module ``ext_handlers``, cwd = tests/functions)."""

import json
import os
import time


def _invokes_seen(request_id):
    seen = set()
    try:
        with open(os.environ["EXT_LOG"]) as f:
            for line in f:
                rec = json.loads(line)
                event = rec.get("event") or {}
                if rec.get("what") == "event" and event.get("requestId") == request_id:
                    seen.add(rec["ext"])
    except FileNotFoundError:
        pass
    return seen


def seen(event, context):
    """Which extensions had received INVOKE for this request (waiting up to 3 s for the expected ones)."""
    expect = set(event.get("expect", []))
    first = _invokes_seen(context.aws_request_id)
    found = first
    deadline = time.time() + 3
    while not expect <= found and time.time() < deadline:
        time.sleep(0.01)
        found = _invokes_seen(context.aws_request_id)
    time.sleep(float(event.get("hold", 0)))
    print(f"handler ran for {context.aws_request_id}")
    return {"seen": sorted(found), "at_start": sorted(first), "pid": os.getpid(), "pgid": os.getpgid(0)}


def sleep(event, context):
    time.sleep(float(event.get("seconds", 1)))
    return {"slept": True}


def crash(event, context):
    os._exit(3)
