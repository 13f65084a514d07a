"""An internal extension that tries to register at import time (stdlib only), for the Lambda Managed
Instances tests: the handler returns the Extensions API's answer to each attempt."""

import json
import os
import threading
import urllib.error
import urllib.request

API = os.environ["AWS_LAMBDA_RUNTIME_API"]


def _register(name, events):
    req = urllib.request.Request(f"http://{API}/2020-01-01/extension/register", method="POST",
                                 data=json.dumps({"events": events}).encode(),
                                 headers={"Lambda-Extension-Name": name})
    try:
        with urllib.request.urlopen(req) as r:
            identifier = r.headers["Lambda-Extension-Identifier"]
            answer = {"status": r.status, "body": json.loads(r.read())}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": json.loads(e.read())}
    # A registered extension must wait in event/next, or the init never completes.
    threading.Thread(target=_wait_for_events, args=(identifier,), daemon=True).start()
    return answer


def _wait_for_events(identifier):
    while True:
        req = urllib.request.Request(f"http://{API}/2020-01-01/extension/event/next",
                                     headers={"Lambda-Extension-Identifier": identifier})
        with urllib.request.urlopen(req) as r:
            r.read()


ANSWERS = {"invoke": _register("inner-invoke", ["INVOKE"]), "shutdown": _register("inner-shutdown", ["SHUTDOWN"]),
           "none": _register("inner-none", [])}


def handler(event, context):
    return ANSWERS
