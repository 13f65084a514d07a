"""A function behind a Function URL, for tests/test_function_url.py. The path says what it does:

    /event           answer 200 with the event it got (JSON) as the body
    /return          return the request body's JSON as the result (the test picks the result)
    /length          answer with the length of the request body, decoded
    /raise           raise (an unhandled function error)
    /sleep?s=N       sleep N seconds (to time out)
    /exit            exit the runtime process mid-invocation (a crash)
"""

from __future__ import annotations

import base64
import json
import os
import time


def handler(event, context):
    path = event["rawPath"]
    if path.startswith("/event"):
        return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(event)}
    if path == "/return":
        body = event.get("body", "")
        if event["isBase64Encoded"]:
            body = base64.b64decode(body).decode()
        return json.loads(body)
    if path == "/length":
        body = event.get("body", "")
        data = base64.b64decode(body) if event["isBase64Encoded"] else body.encode()
        return {"statusCode": 200, "body": str(len(data))}
    if path == "/raise":
        raise ValueError("the function failed on purpose")
    if path == "/sleep":
        time.sleep(float(event["queryStringParameters"]["s"]))
        return "slept"
    if path == "/exit":
        os._exit(3)
    return {"statusCode": 404, "body": f"no route {path}"}
