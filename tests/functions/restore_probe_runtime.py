"""A custom runtime (raw HTTP, stdlib only) that calls SnapStart's Runtime API endpoints out of turn
and records every answer in ``$PROBE_LOG`` (one JSON line each): restore/error before restore/next,
POST restore/next, restore/next twice; then it serves invocations, echoing the event."""

import http.client
import json
import os

HOST, _, PORT = os.environ["AWS_LAMBDA_RUNTIME_API"].partition(":")


def call(method, path, body=None):
    conn = http.client.HTTPConnection(HOST, int(PORT), timeout=60)
    conn.request(method, "/2018-06-01/runtime/" + path, body=body,
                 headers={"Lambda-Runtime-Function-Error-Type": "Runtime.AfterRestoreError"} if body else {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def record(name, status, data):
    with open(os.environ["PROBE_LOG"], "a") as f:
        f.write(json.dumps({"call": name, "status": status, "body": data.decode()}) + "\n")


record("restore_error_too_early", *call("POST", "restore/error", b'{"errorType":"X"}')[::2])
record("restore_next_by_post", *call("POST", "restore/next", b"{}")[::2])
record("restore_next", *call("GET", "restore/next")[::2])
record("restore_next_again", *call("GET", "restore/next")[::2])
while True:
    status, headers, body = call("GET", "invocation/next")
    request_id = headers["lambda-runtime-aws-request-id"]
    conn = http.client.HTTPConnection(HOST, int(PORT), timeout=60)
    conn.request("POST", f"/2018-06-01/runtime/invocation/{request_id}/response", body=body,
                 headers={"Lambda-Runtime-Invocation-Id": headers["lambda-runtime-invocation-id"]})
    conn.getresponse().read()
    conn.close()
