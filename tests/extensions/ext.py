#!/usr/bin/env python3
"""A test extension (stdlib only). What it does depends on the prefix of its file name:

rec-*        registers for INVOKE and SHUTDOWN and records every event
silent-*     never registers (sleeps)
crash-*      exits with status 3 before registering
initerr-*    registers, posts /extension/init/error, reads the answer 0.1 s later, records it, exits
probe-*      tries every misuse of the API, records the answers, then behaves like rec-*
many-*       registers 11 extensions under made-up names (the 11th must be refused)
telemetry-*  like rec-*, and subscribes to the Telemetry API (logs-*: to the Logs API); records what it gets
stall-*      like telemetry-*, but its listener stalls STALL_SECONDS on the first batch
deaf-*       like telemetry-*, but its listener accepts connections and never answers
tcp-*        like telemetry-*, with a TCP destination (NDJSON)
die-*        like rec-*, but the first one started exits with status 1 on its first INVOKE
busy-*       like rec-*, but after each INVOKE it works BUSY_SECONDS before its next event/next
linger-*     like telemetry-*, but after SHUTDOWN it waits LINGER_SECONDS (default 1) for the last
             telemetry before it exits, as AWS's sample extensions do
lmi-*        for Lambda Managed Instances: records the answers to registering for INVOKE, to a Telemetry
             subscription with schema 2022-12-13 and to the Logs API, then registers for SHUTDOWN only
             and subscribes with schema 2025-01-29 (records what it gets, like telemetry-*)

Records are JSON lines appended to $EXT_LOG: {"ext", "pid", "what", ...}.
"""
import http.client
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

API = os.environ["AWS_LAMBDA_RUNTIME_API"]
NAME = os.path.basename(sys.argv[0])
KIND = NAME.split("-")[0]
LOG = os.environ.get("EXT_LOG", "/dev/null")
LOCK = threading.Lock()


def record(what, **fields):
    line = json.dumps({"ext": NAME, "pid": os.getpid(), "pgid": os.getpgid(0), "what": what, "t": time.time(),
                       **fields})
    with LOCK, open(LOG, "a") as f:
        f.write(line + "\n")


def died_before():
    with open(LOG) as f:
        return '"what": "died"' in f.read()


def call(method, path, body=None, headers=None, timeout=None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{API}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def register(name=NAME, events=("INVOKE", "SHUTDOWN"), extra=None):
    headers = {"Lambda-Extension-Name": name, **(extra or {})}
    return call("POST", "/2020-01-01/extension/register", {"events": list(events)}, headers)


def answer(status, body):
    try:
        return {"status": status, "body": json.loads(body)}
    except ValueError:
        return {"status": status, "body": body.decode(errors="replace")}


def probe():
    results = {}
    results["no_name"] = answer(*_sb(call("POST", "/2020-01-01/extension/register", {"events": []})))
    results["bad_body"] = answer(*_sb(call("POST", "/2020-01-01/extension/register", b"{not json",
                                           {"Lambda-Extension-Name": NAME})))
    results["bad_event"] = answer(*_sb(register(events=("INVOKE", "BOGUS"))))
    results["wrong_method"] = answer(*_sb(call("GET", "/2020-01-01/extension/register")))
    status, headers, body = register(extra={"Lambda-Extension-Accept-Feature": "accountId"})
    results["register"] = answer(status, body)
    ident = headers.get("lambda-extension-identifier")
    results["identifier"] = ident
    results["again"] = answer(*_sb(register()))
    results["internal_shutdown"] = answer(*_sb(register(name="inner", events=("SHUTDOWN",))))
    results["next_no_id"] = answer(*_sb(call("GET", "/2020-01-01/extension/event/next")))
    results["next_bad_id"] = answer(*_sb(call("GET", "/2020-01-01/extension/event/next",
                                              headers={"Lambda-Extension-Identifier": "garbage"})))
    results["next_unknown_id"] = answer(*_sb(call(
        "GET", "/2020-01-01/extension/event/next",
        headers={"Lambda-Extension-Identifier": "00000000-0000-4000-8000-000000000000"})))
    results["init_error_no_type"] = answer(*_sb(call("POST", "/2020-01-01/extension/init/error", b"{}",
                                                     {"Lambda-Extension-Identifier": ident})))
    sub = {"schemaVersion": "2022-12-13", "types": ["platform"], "destination": {"protocol": "HTTP",
                                                                                 "URI": "http://example.com:80/"}}
    results["subscribe_remote"] = answer(*_sb(call("PUT", "/2022-07-01/telemetry", sub,
                                                   {"Lambda-Extension-Identifier": ident})))
    results["subscribe_bad"] = answer(*_sb(call("PUT", "/2022-07-01/telemetry", {"types": []},
                                                {"Lambda-Extension-Identifier": ident})))
    record("probe", results=results)
    return ident


def _sb(triple):
    return triple[0], triple[2]


def event_loop(ident, on_first_invoke=None):
    first = True
    while True:
        status, headers, body = call("GET", "/2020-01-01/extension/event/next",
                                     headers={"Lambda-Extension-Identifier": ident})
        event = json.loads(body)
        record("event", event=event, event_id=headers.get("lambda-extension-event-identifier"))
        print(f"[{NAME}] received {event['eventType']}", flush=True)
        if event["eventType"] == "INVOKE" and first and on_first_invoke is not None:
            first = False
            on_first_invoke()
        if event["eventType"] == "SHUTDOWN":
            if KIND == "linger":
                time.sleep(float(os.environ.get("LINGER_SECONDS", "1")))
            record("exit")
            sys.exit(0)
        if KIND == "die" and not died_before():
            record("died")
            sys.exit(1)
        if KIND == "busy":
            time.sleep(float(os.environ.get("BUSY_SECONDS", "10")))


class Listener(BaseHTTPRequestHandler):
    stalled = False

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if KIND == "stall" and not Listener.stalled:
            Listener.stalled = True
            time.sleep(float(os.environ.get("STALL_SECONDS", "6")))
        for item in json.loads(body):
            record("telemetry", item=item)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def subscribe(ident):
    if KIND == "deaf":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1000)
        port = sock.getsockname()[1]
        keep = []

        def accept_forever():
            while True:
                conn, _ = sock.accept()
                keep.append(conn)  # never read, never answered

        threading.Thread(target=accept_forever, daemon=True).start()
    elif KIND == "tcp":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(10)
        port = sock.getsockname()[1]

        def read_lines():
            conn, _ = sock.accept()
            for line in conn.makefile("rb"):
                record("telemetry", item=json.loads(line))

        threading.Thread(target=read_lines, daemon=True).start()
    else:
        server = HTTPServer(("127.0.0.1", 0), Listener)
        port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
    api, path = ("/2020-08-15/logs", "logs") if KIND == "logs" else ("/2022-07-01/telemetry", "telemetry")
    body = {"types": ["platform", "function", "extension"], "buffering": {"timeoutMs": 25},
            "destination": {"protocol": "HTTP", "URI": f"http://sandbox.localdomain:{port}/{path}"}}
    if KIND == "tcp":
        body["destination"] = {"protocol": "TCP", "URI": f"localhost:{port}"}
    if api.startswith("/2022"):
        body["schemaVersion"] = "2022-12-13"
    if KIND == "lmi":
        headers = {"Lambda-Extension-Identifier": ident}
        record("lmi_old_schema", answer=answer(*_sb(call("PUT", api, body, headers))))
        record("lmi_logs_api", answer=answer(*_sb(call("PUT", "/2020-08-15/logs", body, headers))))
        body["schemaVersion"] = "2025-01-29"
    status, _, answer_body = call("PUT", api, body, {"Lambda-Extension-Identifier": ident})
    record("subscribed", status=status, body=answer_body.decode())


def main():
    record("start")
    if KIND == "silent":
        time.sleep(3600)
    if KIND == "crash":
        sys.exit(3)
    if KIND == "many":
        for i in range(11):
            status, _, body = register(name=f"{NAME}-{i}", events=("INVOKE",))
            record("many", i=i, status=status, body=json.loads(body))
        time.sleep(3600)
    if KIND == "probe":
        ident = probe()

        def late():
            record("late", answer=answer(*_sb(register(name="late-comer", events=("INVOKE",)))))
        event_loop(ident, late)
    if KIND == "lmi":
        record("lmi_invoke", answer=answer(*_sb(register())))
    status, headers, body = register(events=("SHUTDOWN",) if KIND == "lmi" else ("INVOKE", "SHUTDOWN"))
    ident = headers["lambda-extension-identifier"]
    record("registered", status=status, body=json.loads(body), id=ident)
    print(f"[{NAME}] registered", flush=True)
    if KIND == "initerr":
        conn = http.client.HTTPConnection(API, timeout=30)
        conn.request("POST", "/2020-01-01/extension/init/error",
                     json.dumps({"errorMessage": "missing API key", "errorType": "Extension.ConfigInvalid"}),
                     {"Lambda-Extension-Identifier": ident,
                      "Lambda-Extension-Function-Error-Type": "Extension.ConfigInvalid"})
        time.sleep(0.1)  # it reads the answer a little later, as a busy extension may
        record("init_error", status=conn.getresponse().status)
        sys.exit(0)  # AWS: the extension should exit after it receives the response
    if KIND in ("telemetry", "logs", "stall", "deaf", "tcp", "linger", "lmi"):
        subscribe(ident)
    event_loop(ident)


main()
