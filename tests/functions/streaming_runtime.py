"""A minimal custom runtime that streams its responses, as a Node.js ``streamifyResponse`` handler
does: POST .../response with ``Lambda-Runtime-Function-Response-Mode: streaming`` and a chunked
body. (awslambdaric, the Python runtime client, cannot stream.)

The event says what to do: ``{"chunks": ["a", "b"], "gap": 0.2, "then": "end"}`` streams each
chunk, ``gap`` seconds apart, then ``then`` is one of ``end`` (finish the stream), ``error`` (finish
with error trailers), ``exit`` (the process exits with status 1 mid-stream), ``hang`` (never
finish). It prints one log line per invocation.
"""

import json
import os
import socket
import sys
import time

HOST, _, PORT = os.environ["AWS_LAMBDA_RUNTIME_API"].partition(":")


def request(head: bytes, body: bytes = b"") -> tuple:
    sock = socket.create_connection((HOST, int(PORT)))
    sock.sendall(head + body)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head_text, _, rest = data.partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        rest += sock.recv(65536)
    sock.close()
    return headers, rest


def main() -> None:
    while True:
        headers, body = request(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n")
        rid = headers["lambda-runtime-aws-request-id"]
        event = json.loads(body)
        print(f"streaming runtime handles {rid}", flush=True)
        sock = socket.create_connection((HOST, int(PORT)))
        sock.sendall(b"POST /2018-06-01/runtime/invocation/%s/response HTTP/1.1\r\nHost: x\r\n"
                     b"Lambda-Runtime-Function-Response-Mode: streaming\r\nTransfer-Encoding: chunked\r\n"
                     b"Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n"
                     b"Content-Type: application/octet-stream\r\n\r\n" % rid.encode())
        for i, chunk in enumerate(event.get("chunks", [])):
            if i:
                time.sleep(float(event.get("gap", 0)))
            data = chunk.encode()
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
        then = event.get("then", "end")
        if then == "exit":
            sys.exit(1)
        if then == "hang":
            time.sleep(3600)
        if then == "error":
            import base64
            error = json.dumps({"errorType": "Stream.Broke", "errorMessage": "midway"}).encode()
            sock.sendall(b"0\r\nLambda-Runtime-Function-Error-Type: Stream.Broke\r\n"
                         b"Lambda-Runtime-Function-Error-Body: %s\r\n\r\n" % base64.b64encode(error))
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
