"""Function URLs (issue 13 section 1): ``FUNCTION_URL_PORT`` and ``FUNCTION_URL_INVOKE_MODE``.

End to end against the real daemon: awslambdaric runs ``functions/url_handlers.py`` (BUFFERED),
the Node.js runtime client runs ``examples/function-url/stream.mjs`` (RESPONSE_STREAM with
``awslambda.HttpResponseStream.from``), and ``functions/prelude_runtime.py`` streams any prelude
the test asks for. Clients: Python's http.client, curl, and urllib with a cookie jar (a
browser-like client that stores the Set-Cookie headers and sends them back). The event and
mapping rules are AWS's (see the module docstring of ``lambda_rapid.invoke.function_url``).
"""

from __future__ import annotations

import base64
import http.client
import http.cookiejar
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from datetime import datetime
from types import SimpleNamespace

import pytest

from conftest import FUNCTIONS_DIR, PYTHON, RIC, ROOT, free_port, start_daemon, wait_until
from lambda_rapid import config as cfg
from lambda_rapid import errors
from lambda_rapid.invocation import Result
from lambda_rapid.invoke import function_url as furl
from support import UUID_RE, metric
from test_config import assert_one_line_error, run_daemon
from test_runtimes import node_ric  # noqa: F401  (a fixture)

URL_HANDLERS = RIC + ["url_handlers.handler"]
PRELUDE_RUNTIME = [PYTHON, str(FUNCTIONS_DIR / "prelude_runtime.py")]
EXAMPLE_DIR = ROOT / "examples" / "function-url"
NUL8 = "\0" * 8


# ---- helpers ---------------------------------------------------------------------------------

def url_daemon(command, cwd=FUNCTIONS_DIR, mode=None, **env):
    """A daemon with its Function URL on a free port (``proc.url_port``)."""
    url_port = free_port()
    extra = {"FUNCTION_URL_PORT": url_port}
    if mode is not None:
        extra["FUNCTION_URL_INVOKE_MODE"] = mode
    proc = start_daemon(command, cwd=cwd, **extra, **env)
    proc.url_port = url_port
    return proc


def call(proc, method, path, body=None, headers=None, timeout=30.0):
    """(status, [(name, value), ...] as sent, body bytes) of one request to the Function URL."""
    conn = http.client.HTTPConnection("127.0.0.1", proc.url_port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


def values(headers, name):
    return [v for k, v in headers if k.lower() == name.lower()]


def one(headers, name):
    found = values(headers, name)
    assert len(found) == 1, (name, headers)
    return found[0]


def returning(proc, result, **kwargs):
    """The HTTP response when the function returns ``result``."""
    return call(proc, "POST", "/return", json.dumps(result).encode(), {"Content-Type": "application/json"}, **kwargs)


def plan(proc, path="/", **streamed):
    """Ask prelude_runtime to stream ``streamed`` (content_type, pieces, gap, then)."""
    return call(proc, "POST", path, json.dumps(streamed).encode(), {"Content-Type": "application/json"})


def read_timed(response) -> list:
    """[(seconds since the call, piece), ...] as the pieces of a streamed body arrive."""
    started = time.monotonic()
    pieces = []
    while True:
        piece = response.read1(65536)
        if not piece:
            return pieces
        pieces.append((time.monotonic() - started, piece))


@pytest.fixture(scope="module")
def buffered():
    proc = url_daemon(URL_HANDLERS, AWS_LAMBDA_FUNCTION_NAME="url-fn", AWS_LAMBDA_FUNCTION_TIMEOUT=2,
                      MAX_CONCURRENCY=2)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def prelude():
    proc = url_daemon(PRELUDE_RUNTIME, mode="RESPONSE_STREAM", AWS_LAMBDA_FUNCTION_NAME="prelude-fn",
                      AWS_LAMBDA_FUNCTION_TIMEOUT=10)
    yield proc
    proc.stop()


# ---- unit: the rules -------------------------------------------------------------------------

@pytest.mark.parametrize("content_type,text", [
    ("text/plain", True), ("text/html; charset=utf-8", True), ("TEXT/CSV", True), ("application/json", True),
    ("application/json; charset=utf-8", True), ("application/xml", True), ("application/vnd.api+json", True),
    ("image/svg+xml", True), ("application/javascript", True), ("application/octet-stream", False),
    ("image/png", False), ("application/x-www-form-urlencoded", False), ("multipart/form-data; boundary=x", False),
    ("", False), ("application/pdf", False),
])
def test_which_bodies_are_text(content_type, text):
    assert furl.is_text(content_type) is text


def test_query_cookies_and_time_helpers():
    assert furl.query_parameters("a=1&a=2&b=%2Fx&c=&d&e=x+y") == {"a": "1,2", "b": "/x", "c": "", "d": "", "e": "x y"}
    assert furl.request_cookies("a=1; b=2;c=3 ;") == ["a=1", "b=2", "c=3"]
    assert furl.request_cookies(None) == [] and furl.request_cookies("") == []
    assert furl.event_time(1583348638.39) == "04/Mar/2020:19:03:58 +0000"


def test_event_of_a_minimal_request():
    request = SimpleNamespace(method="GET", path="/", query="", headers={"host": "example.test:9000"}, body=b"")
    event = furl.url_event(request, request_id="rid", trace_id="Root=1-x", source_ip="10.0.0.1", port=9000, now=0.0)
    assert set(event) == {"version", "routeKey", "rawPath", "rawQueryString", "headers", "requestContext",
                          "isBase64Encoded"}
    assert event["requestContext"]["domainName"] == "example.test"
    assert event["requestContext"]["apiId"] == event["requestContext"]["domainPrefix"] == "example"
    assert event["requestContext"]["time"] == "01/Jan/1970:00:00:00 +0000"
    assert event["headers"]["x-forwarded-for"] == "10.0.0.1" and event["headers"]["x-forwarded-port"] == "9000"


@pytest.mark.parametrize("result,status,content_type,body", [
    ({"statusCode": 201, "headers": {"Content-Type": "text/plain"}, "body": "made"}, 201, "text/plain", b"made"),
    ({"statusCode": "418", "body": "teapot"}, 418, "application/json", b"teapot"),
    ({"statusCode": 200.0, "body": ""}, 200, "application/json", b""),
    ({"statusCode": 204}, 204, "application/json", b""),
    ({"statusCode": 200, "body": "aGk=", "isBase64Encoded": True}, 200, "application/json", b"hi"),
    ({"statusCode": 200, "body": {"a": [1, 2]}}, 200, "application/json", b'{"a":[1,2]}'),
    ({"hello": "world"}, 200, "application/json", b'{"hello":"world"}'),
    ("hello", 200, "application/json", b"hello"),
    ([1, "two", True], 200, "application/json", b'[1,"two",true]'),
    (3.5, 200, "application/json", b"3.5"),
    (None, 200, "application/json", b"null"),
])
def test_result_mapping(result, status, content_type, body):
    got_status, head, got_body = furl.http_response(json.dumps(result).encode())
    assert (got_status, got_body) == (status, body)
    assert head.lower().startswith(b"content-type: " + content_type.lower().encode()) or \
        b"content-type: " + content_type.encode() in head


@pytest.mark.parametrize("payload", [
    b"not json", json.dumps({"statusCode": "abc"}).encode(), json.dumps({"statusCode": 99}).encode(),
    json.dumps({"statusCode": True}).encode(),
    json.dumps({"statusCode": 200, "body": "!!", "isBase64Encoded": True}).encode(),
])
def test_results_that_are_no_http_response(payload):
    with pytest.raises(furl.BadResponse):
        furl.http_response(payload)


def test_header_lines():
    head = furl.header_lines({"X-A": "1", "Content-Length": "9", "Bad Name": "x", "X-N": 5, "X-B": False,
                              "X-None": None, "Transfer-Encoding": "chunked", "X-Evil": "a\r\nSet-Cookie: p=1"},
                             ["c=1", 7, "d=2"], b"content-type: application/json\r\n")
    assert head == (b"content-type: application/json\r\nX-A: 1\r\nX-N: 5\r\nX-B: false\r\n"
                    b"X-Evil: a  Set-Cookie: p=1\r\nSet-Cookie: c=1\r\nSet-Cookie: d=2\r\n")
    typed = furl.header_lines({"content-type": "text/html"}, None, b"content-type: x\r\n")
    assert typed == b"content-type: text/html\r\n"


def test_answers_for_errors_and_refusals():
    for outcome in ("function_error", "timeout", "crash", "init_error"):
        assert furl.answer(Result(outcome, b'{"errorType":"X"}', function_error=True)) == \
            (502, b"content-type: application/json\r\n", b"Internal Server Error")
    status, head, body = furl.answer(Result("throttled", errors.throttled_body(), api_error=errors.TOO_MANY_REQUESTS))
    assert status == 429 and b"x-amzn-ErrorType: TooManyRequestsException" in head and b"Rate Exceeded." in body


# ---- unit: configuration -----------------------------------------------------------------------

def load(**env):
    return cfg.load(RIC + ["url_handlers.handler"], {"PATH": "/usr/bin:/bin", **{k: str(v) for k, v in env.items()}},
                    cwd=str(FUNCTIONS_DIR))


def config_error(**env) -> str:
    with pytest.raises(cfg.ConfigError) as e:
        load(**env)
    return str(e.value)


def test_config():
    assert (load().function_url_port, load().function_url_invoke_mode) == (None, "BUFFERED")
    c = load(FUNCTION_URL_PORT=9000)
    assert (c.function_url_port, c.function_url_invoke_mode) == (9000, "BUFFERED")
    c = load(FUNCTION_URL_PORT="9000", FUNCTION_URL_INVOKE_MODE="response_stream")
    assert c.function_url_invoke_mode == "RESPONSE_STREAM"
    assert load(FUNCTION_URL_PORT=9000, FUNCTION_URL_INVOKE_MODE="BUFFERED").function_url_invoke_mode == "BUFFERED"
    assert "FUNCTION_URL_PORT='abc'" in config_error(FUNCTION_URL_PORT="abc")
    assert "FUNCTION_URL_PORT='70000'" in config_error(FUNCTION_URL_PORT="70000")
    assert "FUNCTION_URL_INVOKE_MODE='STREAMING'" in config_error(FUNCTION_URL_PORT=9000,
                                                                 FUNCTION_URL_INVOKE_MODE="STREAMING")
    assert "FUNCTION_URL_PORT is not" in config_error(FUNCTION_URL_INVOKE_MODE="RESPONSE_STREAM")
    assert "PORT (the Invoke API)" in config_error(FUNCTION_URL_PORT=8080)
    assert "RUNTIME_API_PORT" in config_error(FUNCTION_URL_PORT=9100, RUNTIME_API_PORT=9100)


def test_startup_errors():
    assert_one_line_error(run_daemon(URL_HANDLERS, cwd=FUNCTIONS_DIR, FUNCTION_URL_PORT=free_port(),
                                     FUNCTION_URL_INVOKE_MODE="bogus"), "FUNCTION_URL_INVOKE_MODE", "bogus")
    assert_one_line_error(run_daemon(URL_HANDLERS, cwd=FUNCTIONS_DIR, FUNCTION_URL_PORT="x"), "FUNCTION_URL_PORT")
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = run_daemon(URL_HANDLERS, cwd=FUNCTIONS_DIR, FUNCTION_URL_PORT=port, INVOKE_API_HOST="127.0.0.1")
        assert_one_line_error(done, "Function URL", str(port))


# ---- end to end: the event -------------------------------------------------------------------

def test_event_field_by_field(buffered):
    body = json.dumps({"key": "välue"}, ensure_ascii=False).encode()
    conn = http.client.HTTPConnection("127.0.0.1", buffered.url_port, timeout=30)
    conn.putrequest("PUT", "/event/a%2Fb/c?x=1&x=2&y=%20z&empty=&flag", skip_accept_encoding=True)
    for name, value in [("User-Agent", "furl-test/1.0"), ("X-Multi", "one"), ("X-Multi", "two"),
                        ("Cookie", "session=abc; theme=dark"), ("Content-Type", "application/json"),
                        ("X-Amzn-Trace-Id", "Root=1-5f84c7a9-0123456789abcdef01234567"),
                        ("Connection", "keep-alive, X-Hop"), ("X-Hop", "gone"), ("Content-Length", str(len(body)))]:
        conn.putheader(name, value)
    conn.endheaders(body)
    before = time.time()
    response = conn.getresponse()
    event = json.loads(response.read())
    rid = response.getheader("x-amzn-RequestId")
    conn.close()

    assert list(event) == ["version", "routeKey", "rawPath", "rawQueryString", "cookies", "headers",
                           "queryStringParameters", "requestContext", "body", "isBase64Encoded"]
    assert event["version"] == "2.0" and event["routeKey"] == "$default"
    assert event["rawPath"] == "/event/a%2Fb/c"
    assert event["rawQueryString"] == "x=1&x=2&y=%20z&empty=&flag"
    assert event["cookies"] == ["session=abc", "theme=dark"]
    assert event["headers"] == {
        "host": f"127.0.0.1:{buffered.url_port}", "user-agent": "furl-test/1.0", "x-multi": "one,two",
        "cookie": "session=abc; theme=dark", "content-type": "application/json",
        "x-amzn-trace-id": "Root=1-5f84c7a9-0123456789abcdef01234567", "content-length": str(len(body)),
        "x-forwarded-for": "127.0.0.1", "x-forwarded-proto": "http", "x-forwarded-port": str(buffered.url_port)}
    assert event["queryStringParameters"] == {"x": "1,2", "y": " z", "empty": "", "flag": ""}
    context = event["requestContext"]
    assert list(context) == ["accountId", "apiId", "domainName", "domainPrefix", "http", "requestId", "routeKey",
                             "stage", "time", "timeEpoch"]
    assert context["accountId"] == "anonymous"
    assert context["domainName"] == "127.0.0.1" and context["apiId"] == context["domainPrefix"] == "127"
    assert context["http"] == {"method": "PUT", "path": "/event/a%2Fb/c", "protocol": "HTTP/1.1",
                               "sourceIp": "127.0.0.1", "userAgent": "furl-test/1.0"}
    assert UUID_RE.match(context["requestId"]) and context["requestId"] == rid
    assert context["routeKey"] == context["stage"] == "$default"
    assert re.fullmatch(r"\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000", context["time"])
    stamp = datetime.strptime(context["time"], "%d/%b/%Y:%H:%M:%S %z")
    assert isinstance(context["timeEpoch"], int)
    assert int(stamp.timestamp()) == context["timeEpoch"] // 1000
    assert abs(context["timeEpoch"] / 1000 - before) < 30
    assert event["body"] == '{"key": "välue"}' and event["isBase64Encoded"] is False


def test_event_without_body_query_or_cookies(buffered):
    status, headers, data = call(buffered, "GET", "/event")
    event = json.loads(data)
    assert status == 200
    assert "body" not in event and "cookies" not in event and "queryStringParameters" not in event
    assert event["rawQueryString"] == "" and event["isBase64Encoded"] is False
    assert event["requestContext"]["http"]["method"] == "GET"


@pytest.mark.parametrize("method", ["DELETE", "PATCH", "OPTIONS", "HEAD"])
def test_any_method_is_an_invocation(buffered, method):
    status, headers, data = call(buffered, method, "/event/m")
    assert status == 200
    if method == "HEAD":
        assert data == b"" and int(one(headers, "content-length")) > 0
    else:
        assert json.loads(data)["requestContext"]["http"]["method"] == method


@pytest.mark.parametrize("content_type,body,text", [
    ("text/plain; charset=utf-8", "héllo\n".encode(), True),
    ("application/json", b'{"a": 1}', True),
    ("application/xml", b"<a/>", True),
    ("text/html", b"<p>hi</p>", True),
    ("application/octet-stream", b"\x00\x01\xfe\xff", False),
    ("image/png", b"\x89PNG\r\n\x1a\n", False),
    ("application/x-www-form-urlencoded", b"a=1&b=2", False),
    ("multipart/form-data; boundary=xyz", b"--xyz\r\n\r\nfield\r\n--xyz--\r\n", False),
    (None, b"no type at all", False),
    ("text/plain", b"\xff\xfe not utf-8", False),
])
def test_body_text_or_base64(buffered, content_type, body, text):
    headers = {} if content_type is None else {"Content-Type": content_type}
    event = json.loads(call(buffered, "POST", "/event", body, headers)[2])
    assert event["isBase64Encoded"] is (not text)
    assert (event["body"].encode() if text else base64.b64decode(event["body"])) == body


# ---- end to end: the response ------------------------------------------------------------------

def test_status_headers_and_body(buffered):
    status, headers, data = returning(buffered, {"statusCode": 201, "headers": {"Content-Type": "text/plain",
                                                 "X-Custom": "Custom Value", "X-Num": 7}, "body": "created"})
    assert (status, data) == (201, b"created")
    assert one(headers, "content-type") == "text/plain" and one(headers, "x-custom") == "Custom Value"
    assert one(headers, "x-num") == "7" and one(headers, "content-length") == "7"
    assert UUID_RE.match(one(headers, "x-amzn-RequestId"))


def test_cookies_become_set_cookie_headers(buffered):
    status, headers, data = returning(buffered, {"statusCode": 200, "cookies": [
        "Cookie_1=Value1; Expires=21 Oct 2031 07:48 GMT", "Cookie_2=Value2; Max-Age=78000"], "body": "x"})
    assert status == 200
    assert values(headers, "set-cookie") == ["Cookie_1=Value1; Expires=21 Oct 2031 07:48 GMT",
                                             "Cookie_2=Value2; Max-Age=78000"]


def test_base64_body_and_defaults(buffered):
    png = b"\x89PNG\r\n\x1a\n\x00\x00binary"
    status, headers, data = returning(buffered, {"statusCode": 200, "headers": {"content-type": "image/png"},
                                                 "body": base64.b64encode(png).decode(), "isBase64Encoded": True})
    assert (status, data, one(headers, "content-type")) == (200, png, "image/png")
    status, headers, data = returning(buffered, {"statusCode": "418", "body": "teapot"})
    assert (status, data, one(headers, "content-type")) == (418, b"teapot", "application/json")
    status, headers, data = returning(buffered, {"statusCode": 200, "body": {"nested": [1, 2]}})
    assert (status, data) == (200, b'{"nested":[1,2]}')
    status, headers, data = returning(buffered, {"statusCode": 204})
    assert (status, data) == (204, b"")


@pytest.mark.parametrize("result,body", [
    ({"message": "Hello, world!"}, b'{"message":"Hello, world!"}'),
    ("Hello, world!", b"Hello, world!"),
    (["hello", 3, True], b'["hello",3,true]'),
    (3, b"3"),
    (None, b"null"),
])
def test_results_without_status_code(buffered, result, body):
    status, headers, data = returning(buffered, result)
    assert (status, data, one(headers, "content-type")) == (200, body, "application/json")


def test_the_functions_framing_headers_and_bad_names_are_dropped(buffered):
    status, headers, data = returning(buffered, {"statusCode": 200, "body": "ok", "headers": {
        "Content-Length": "999", "Transfer-Encoding": "chunked", "Bad Name": "x", "X-Evil": "a\r\nSet-Cookie: p=1"}})
    assert (status, data) == (200, b"ok")
    assert one(headers, "content-length") == "2" and not values(headers, "transfer-encoding")
    assert not values(headers, "set-cookie") and one(headers, "x-evil") == "a  Set-Cookie: p=1"


@pytest.mark.parametrize("result", [{"statusCode": "abc"}, {"statusCode": 700, "body": "x"},
                                    {"statusCode": 200, "body": "!!", "isBase64Encoded": True}])
def test_an_invalid_response_is_a_502(buffered, result):
    status, headers, data = returning(buffered, result)
    assert (status, data, one(headers, "content-type")) == (502, b"Internal Server Error", "application/json")


# ---- end to end: errors ----------------------------------------------------------------------

def test_function_error_timeout_and_crash_are_502(buffered):
    for path in ("/raise", "/sleep?s=10", "/exit"):
        status, headers, data = call(buffered, "GET", path)
        assert (status, data) == (502, b"Internal Server Error"), path
        assert one(headers, "content-type") == "application/json"
    assert "the function failed on purpose" in buffered.stdout  # the runtime's own log of the error
    status, _, data = call(buffered, "GET", "/event")  # a fresh instance serves the next request
    assert status == 200 and json.loads(data)["version"] == "2.0"


def test_body_over_the_limit(buffered):
    rejected = metric(buffered.metrics(), 'lambda_invocations_total{outcome="rejected"}')
    status, headers, data = call(buffered, "POST", "/length", b"x" * (errors.SYNC_REQUEST_LIMIT + 1),
                                 {"Content-Type": "text/plain"})
    assert status == 413 and one(headers, "x-amzn-ErrorType") == "RequestEntityTooLargeException"
    assert json.loads(data)["message"] == errors.request_too_large_message(errors.SYNC_REQUEST_LIMIT)
    # Under the limit as sent, over it once base64-encoded into the event.
    status, headers, data = call(buffered, "POST", "/length", b"\x00" * 5_000_000,
                                 {"Content-Type": "application/octet-stream"})
    assert status == 413
    assert metric(buffered.metrics(), 'lambda_invocations_total{outcome="rejected"}') == rejected + 2
    status, headers, data = call(buffered, "POST", "/length", b"y" * 4_000_000, {"Content-Type": "text/plain"})
    assert (status, data) == (200, b"4000000")


def test_throttled_when_no_instance_is_free():
    proc = url_daemon(URL_HANDLERS, AWS_LAMBDA_FUNCTION_TIMEOUT=30, MAX_CONCURRENCY=1, MAX_QUEUED_INVOCATIONS=0)
    try:
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(r=call(proc, "GET", "/sleep?s=3")), daemon=True)
        thread.start()
        wait_until(lambda: metric(proc.metrics(), "lambda_in_flight") == 1, 30, message="the first in flight")
        status, headers, data = call(proc, "GET", "/event")
        assert status == 429 and one(headers, "x-amzn-ErrorType") == "TooManyRequestsException"
        assert json.loads(data)["message"] == "Rate Exceeded."
        thread.join(30)
        assert first["r"][0] == 200 and first["r"][2] == b"slept"
    finally:
        proc.stop()


# ---- end to end: clients -----------------------------------------------------------------------

def test_curl(buffered):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    url = f"http://127.0.0.1:{buffered.url_port}"
    done = subprocess.run(["curl", "-s", "-X", "POST", f"{url}/event/curl?via=curl", "-H", "Content-Type: text/plain",
                           "-b", "a=1; b=2", "--data-binary", "from curl"], capture_output=True, timeout=30)
    event = json.loads(done.stdout)
    assert event["body"] == "from curl" and event["cookies"] == ["a=1", "b=2"]
    assert event["queryStringParameters"] == {"via": "curl"}
    assert event["requestContext"]["http"]["userAgent"].startswith("curl/")
    done = subprocess.run(["curl", "-s", "-i", "-X", "POST", f"{url}/return", "-H", "Content-Type: application/json",
                           "--data-binary", json.dumps({"statusCode": 202, "cookies": ["k=v"], "body": "accepted"})],
                          capture_output=True, timeout=30)
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202") and b"\r\nSet-Cookie: k=v" in head and body == b"accepted"


def test_browser_like_client_keeps_and_sends_cookies(buffered):
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    browser.addheaders = [("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0"),
                          ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
                          ("Accept-Language", "en-GB,en;q=0.5")]
    url = f"http://127.0.0.1:{buffered.url_port}"
    result = {"statusCode": 200, "headers": {"content-type": "text/html"}, "body": "<p>welcome</p>",
              "cookies": ["session=s3cr3t; Path=/; HttpOnly", "theme=dark; Path=/"]}
    login = urllib.request.Request(f"{url}/return", method="POST", headers={"Content-Type": "application/json"},
                                   data=json.dumps(result).encode())
    with browser.open(login, timeout=30) as r:
        assert r.read() == b"<p>welcome</p>" and r.headers["content-type"] == "text/html"
    assert sorted(c.name for c in jar) == ["session", "theme"]
    with browser.open(f"{url}/event/page?tab=1", timeout=30) as r:
        event = json.loads(r.read())
    assert sorted(event["cookies"]) == ["session=s3cr3t", "theme=dark"]
    assert event["headers"]["accept-language"] == "en-GB,en;q=0.5"
    assert event["requestContext"]["http"]["userAgent"].startswith("Mozilla/5.0")


def test_the_invoke_api_still_serves(buffered):
    status, _, body = buffered.invoke({"rawPath": "/return", "isBase64Encoded": False, "body": '"direct"'})
    assert (status, json.loads(body)) == (200, "direct")


def test_off_unless_set(daemon_factory):
    proc = daemon_factory(URL_HANDLERS, cwd=FUNCTIONS_DIR)
    assert "Function URL" not in proc.stderr + proc.stdout


# ---- end to end: RESPONSE_STREAM ---------------------------------------------------------------

@pytest.mark.timeout(900)
def test_node_http_response_stream(request):
    node = request.getfixturevalue("node_ric")  # installs aws-lambda-ric if needed (test_runtimes.py)
    proc = url_daemon([str(node), "stream.handler"], cwd=EXAMPLE_DIR, mode="RESPONSE_STREAM",
                      AWS_LAMBDA_FUNCTION_NAME="node-url", AWS_LAMBDA_INIT_TIMEOUT=60, AWS_LAMBDA_FUNCTION_TIMEOUT=20)
    try:
        call(proc, "GET", "/warm-up?n=1&gap_ms=0", timeout=60)
        conn = http.client.HTTPConnection("127.0.0.1", proc.url_port, timeout=30)
        conn.request("GET", "/stream/this?n=4&gap_ms=400&status=201")
        response = conn.getresponse()
        assert response.status == 201
        headers = response.getheaders()
        assert one(headers, "content-type") == "text/plain; charset=utf-8"
        assert one(headers, "x-request-path") == "/stream/this"
        assert one(headers, "transfer-encoding") == "chunked"
        assert values(headers, "set-cookie") == ["visits=1; Path=/", "last=%2Fstream%2Fthis; HttpOnly"]
        pieces = read_timed(response)
        conn.close()
        assert b"".join(p for _, p in pieces) == b"".join(b"line %d of 4\n" % i for i in (1, 2, 3, 4))
        assert len(pieces) >= 2 and pieces[0][1].startswith(b"line 1")
        assert pieces[-1][0] - pieces[0][0] >= 0.8  # the first line came before the function wrote the last

        # An error after the first line: the status was sent already, the body ends there.
        status, headers, data = call(proc, "GET", "/x?fail=1")
        assert (status, data) == (200, b"line 1 of 5\n")
        status, headers, data = call(proc, "GET", "/y?n=2&gap_ms=0&status=404")
        assert (status, data) == (404, b"line 1 of 2\nline 2 of 2\n")

        if shutil.which("curl"):
            started = time.monotonic()
            curl = subprocess.Popen(["curl", "-s", "-N", f"http://127.0.0.1:{proc.url_port}/curl?n=3&gap_ms=400"],
                                    stdout=subprocess.PIPE)
            arrivals = [(time.monotonic() - started, line) for line in curl.stdout]
            curl.wait(30)
            assert [line for _, line in arrivals] == [b"line 1 of 3\n", b"line 2 of 3\n", b"line 3 of 3\n"]
            assert arrivals[-1][0] - arrivals[0][0] >= 0.5
    finally:
        proc.stop()


def test_prelude_split_across_pieces(prelude):
    metadata = json.dumps({"statusCode": 203, "headers": {"content-type": "text/csv", "x-a": "1"},
                           "cookies": ["c=1; Path=/", "d=2"]})
    pieces = [metadata[:7], metadata[7:], "\0\0\0", "\0\0\0\0\0" + "row1\n", "row2,\0\0\0\0\0\0\0\0,nul\n", "row3\n"]
    conn = http.client.HTTPConnection("127.0.0.1", prelude.url_port, timeout=30)
    conn.request("POST", "/csv", json.dumps({"content_type": furl.PRELUDE_TYPE, "pieces": pieces, "gap": 0.3}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 203
    headers = response.getheaders()
    assert one(headers, "content-type") == "text/csv" and one(headers, "x-a") == "1"
    assert values(headers, "set-cookie") == ["c=1; Path=/", "d=2"]
    timed = read_timed(response)
    conn.close()
    assert b"".join(p for _, p in timed) == b"row1\nrow2,\0\0\0\0\0\0\0\0,nul\nrow3\n"  # NULs in the body stay
    assert timed[0][1] == b"row1\n" and timed[-1][0] - timed[0][0] >= 0.4


def test_prelude_defaults_and_plain_streams(prelude):
    status, headers, data = plan(prelude, content_type=furl.PRELUDE_TYPE, pieces=["{}" + NUL8, "body"])
    assert (status, data, one(headers, "content-type")) == (200, b"body", "application/octet-stream")
    status, headers, data = plan(prelude, content_type="text/event-stream", pieces=["data: 1\n\n", "data: 2\n\n"])
    assert (status, data, one(headers, "content-type")) == (200, b"data: 1\n\ndata: 2\n\n", "text/event-stream")
    status, headers, data = plan(prelude, content_type=furl.PRELUDE_TYPE, pieces=[])
    assert (status, data) == (200, b"")


def test_prelude_errors(prelude):
    assert plan(prelude, content_type=furl.PRELUDE_TYPE, pieces=["not json" + NUL8, "x"])[:3:2] == \
        (502, b"Internal Server Error")
    assert plan(prelude, content_type=furl.PRELUDE_TYPE, pieces=['{"statusCode": 9000}' + NUL8])[:3:2] == \
        (502, b"Internal Server Error")
    assert plan(prelude, content_type=furl.PRELUDE_TYPE, pieces=['{"statusCode": 200}'])[:3:2] == \
        (502, b"Internal Server Error")  # ended inside its prelude
    assert plan(prelude, content_type=furl.PRELUDE_TYPE, pieces=[], then="error")[:3:2] == \
        (502, b"Internal Server Error")
    status, headers, data = plan(prelude, content_type=furl.PRELUDE_TYPE,
                                 pieces=['{"statusCode": 200}' + NUL8, "partial"], then="error")
    assert (status, data) == (200, b"partial")
    status, headers, data = plan(prelude, content_type="text/plain", pieces=["fine"])
    assert (status, data) == (200, b"fine")  # the instance is still good


def test_stream_mode_with_a_runtime_that_does_not_stream():
    """awslambdaric answers with an ordinary /response: in RESPONSE_STREAM mode AWS sends it as it is."""
    proc = url_daemon(URL_HANDLERS, mode="RESPONSE_STREAM", AWS_LAMBDA_FUNCTION_TIMEOUT=5)
    try:
        result = {"statusCode": 201, "body": "not read"}
        status, headers, data = returning(proc, result)
        assert (status, json.loads(data), one(headers, "content-type")) == (200, result, "application/json")
        assert call(proc, "GET", "/raise")[:3:2] == (502, b"Internal Server Error")
    finally:
        proc.stop()


def test_buffered_mode_with_a_runtime_that_streams():
    """BUFFERED: a streamed /response arrives whole and must be a JSON result like any other."""
    proc = url_daemon(PRELUDE_RUNTIME, AWS_LAMBDA_FUNCTION_TIMEOUT=5)
    try:
        status, headers, data = plan(proc, content_type="application/json", pieces=['{"statusCode": 200, ',
                                                                                    '"body": "whole"}'])
        assert (status, data) == (200, b"whole")
        assert plan(proc, content_type="text/plain", pieces=["not json"])[:3:2] == (502, b"Internal Server Error")
    finally:
        proc.stop()
