"""A minimal custom runtime that streams what a Function URL event asks for, for
tests/test_function_url.py: POST .../response with ``Lambda-Runtime-Function-Response-Mode:
streaming`` and a chunked body, as a runtime that writes AWS's HTTP-integration prelude does.

The request body (JSON) says what to stream: ``{"content_type": "...", "pieces": ["...", ...],
"gap": 0.2, "then": "end"}``. Each piece is sent as its own chunk, ``gap`` seconds apart (a piece
is text whose characters are bytes: ``"\\u0000"`` is a NUL); ``then`` is ``end`` (finish) or
``error`` (finish with error trailers).
"""

import base64
import json
import os
import socket
import time

HOST, _, PORT = os.environ["AWS_LAMBDA_RUNTIME_API"].partition(":")


def next_event() -> tuple:
    sock = socket.create_connection((HOST, int(PORT)))
    sock.sendall(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    sock.close()
    return headers["lambda-runtime-aws-request-id"], json.loads(body)


def main() -> None:
    while True:
        request_id, event = next_event()
        plan = json.loads(event.get("body") or "{}")
        sock = socket.create_connection((HOST, int(PORT)))
        sock.sendall(b"POST /2018-06-01/runtime/invocation/%s/response HTTP/1.1\r\nHost: x\r\n"
                     b"Lambda-Runtime-Function-Response-Mode: streaming\r\nTransfer-Encoding: chunked\r\n"
                     b"Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n"
                     b"Content-Type: %s\r\n\r\n" % (request_id.encode(), plan["content_type"].encode()))
        for i, piece in enumerate(plan.get("pieces", [])):
            if i:
                time.sleep(float(plan.get("gap", 0)))
            data = piece.encode("latin-1")
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
        if plan.get("then") == "error":
            error = base64.b64encode(json.dumps({"errorType": "Stream.Broke", "errorMessage": "midway"}).encode())
            sock.sendall(b"0\r\nLambda-Runtime-Function-Error-Type: Stream.Broke\r\n"
                         b"Lambda-Runtime-Function-Error-Body: %s\r\n\r\n" % error)
        else:
            sock.sendall(b"0\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply:
            more = sock.recv(65536)
            if not more:
                break
            reply += more
        sock.close()


if __name__ == "__main__":
    main()
