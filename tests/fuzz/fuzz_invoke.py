"""atheris harness: the Invoke API's request validation (lambda_rapid/invoke/contract.py, or
``parse_invoke`` in invoke/http_api.py before the contract had a module of its own).

Each input is turned (FuzzedDataProvider) into what the Invoke API sees of a request: the path
(the invoke routes, or anything), the query (``Qualifier=``), the headers it reads
(``X-Amz-Invocation-Type``, ``X-Amz-Log-Type``, ``X-Amz-Client-Context``, ``X-Amzn-Trace-Id``,
``Amz-Sdk-Invocation-Id``), each absent, valid or arbitrary, and the body. It goes through the
route match, the request-id rule and the validation as ``InvokeApi.invoke`` calls them, for a
daemon serving ``function`` / ``fuzz-fn`` at ``$LATEST`` and version 7.

A crash is any exception other than a refusal (``contract.Refusal``; formerly ``InvalidInvoke`` or
``UnknownFunction``). A
finding (see harness.py) is an accepted call that breaks the contract: a name or qualifier not
served, a payload that is not JSON, a client context that is not a JSON object, an invocation or
log type not allowed, a refusal whose AWS error is not a 400/413 with a JSON body, a request id
that is not a UUID.

Usage: see harness.py (``python tests/fuzz/fuzz_invoke.py -max_total_time=30 DIR``).
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse

import harness

NAMES = ("function", "fuzz-fn", "fuzz-fn:$LATEST", "fuzz-fn:7", "fuzz-fn:8", "other",
         "arn:aws:lambda:us-east-1:012345678912:function:fuzz-fn",
         "arn:aws:lambda:us-east-1:012345678912:function:fuzz-fn:7", "012345678912:function:fuzz-fn",
         "function:fuzz-fn:$LATEST", "arn:aws-cn:lambda:x:1:function:function", "")
INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun", "requestresponse", "")
LOG_TYPES = ("None", "Tail", "tail", "")
SERVED = ("function", "fuzz-fn")
VERSIONS = ("$LATEST", "7")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class Contract:
    """The same few calls over either layout of the code."""

    def __init__(self) -> None:
        try:
            from lambda_rapid.invoke import contract
        except ImportError:
            contract = None
        from lambda_rapid.invoke import http_api

        self.contract = contract
        self.http_api = http_api
        source = contract or http_api
        self.PREFIX, self.SUFFIX = source.PREFIX, source.SUFFIX
        self.STREAM_PREFIX, self.STREAM_SUFFIX = source.STREAM_PREFIX, source.STREAM_SUFFIX
        self.INVOCATION_TYPES, self.STREAM_INVOCATION_TYPES = source.INVOCATION_TYPES, source.STREAM_INVOCATION_TYPES
        self.function_in_path = source.function_in_path
        self.refusals = (contract.Refusal,) if contract else (http_api.InvalidInvoke,)
        self.not_found = () if contract else (http_api.UnknownFunction,)

    def request_id(self, headers: dict) -> str:
        if self.contract:
            return self.contract.request_id(headers.get("amz-sdk-invocation-id"), lambda _rid: False)
        return self.http_api.request_id_for(headers, lambda _rid: False)

    def parse(self, request, raw: str, serves, allowed: tuple):
        if self.contract:
            return self.contract.parse_http(request.headers, raw, request.query, request.body, request.too_large,
                                            serves=serves, region="us-east-1", allowed=allowed)
        return self.http_api.parse_invoke(request, raw, serves, allowed)

    def targets(self) -> list:
        if self.contract:
            c = self.contract
            return [c.parse, c.parse_http, c.parse_function_name, c.function_in_path, c.decode_client_context,
                    c.request_id, c.body_limit]
        h = self.http_api
        return [h.parse_invoke, h.parse_function_name, h.function_in_path, h.decode_client_context,
                h.request_id_for, h.invoke_body_limit]


def load():
    return Contract()


class FakeRequest:
    """What parse_invoke reads of an HTTP request."""

    def __init__(self, path: str, query: str, headers: dict, body: bytes, too_large: bool, limit: int) -> None:
        self.method = "POST"
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.too_large = too_large
        self.limit = limit
        self.on_chunk = None


def pick(fdp, choices: tuple, text_len: int = 40) -> str:
    """One of ``choices``, or (when the index runs past them) arbitrary text."""
    index = fdp.ConsumeIntInRange(0, len(choices))
    if index < len(choices):
        return choices[index]
    return fdp.ConsumeUnicodeNoSurrogates(text_len)


def header_text(text: str) -> str:
    """A header value as the HTTP layer hands it over: latin-1 text without CR/LF, right-stripped."""
    return text.encode("utf-8", "replace").decode("latin-1").replace("\r", "").replace("\n", "").rstrip(" \t")


def make_input(api: Contract):
    def serves(name, qualifier) -> bool:
        return name in SERVED and (qualifier is None or qualifier in VERSIONS)

    def one_input(data: bytes) -> None:
        import atheris

        fdp = atheris.FuzzedDataProvider(data)
        name = pick(fdp, NAMES)
        if fdp.ConsumeBool():
            name = urllib.parse.quote(name, safe=fdp.ConsumeUnicodeNoSurrogates(3))
        route = fdp.ConsumeIntInRange(0, 2)
        if route == 0:
            path = api.PREFIX + name + api.SUFFIX
        elif route == 1:
            path = api.STREAM_PREFIX + name + api.STREAM_SUFFIX
        else:
            path = fdp.ConsumeUnicodeNoSurrogates(80)
        query = ""
        if fdp.ConsumeBool():
            query = "Qualifier=" + urllib.parse.quote(pick(fdp, VERSIONS + ("8", "")))
        elif fdp.ConsumeBool():
            query = fdp.ConsumeUnicodeNoSurrogates(30)
        headers = {}
        if fdp.ConsumeBool():
            headers["x-amz-invocation-type"] = header_text(pick(fdp, INVOCATION_TYPES))
        if fdp.ConsumeBool():
            headers["x-amz-log-type"] = header_text(pick(fdp, LOG_TYPES))
        if fdp.ConsumeBool():
            kind = fdp.ConsumeIntInRange(0, 2)
            raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60))
            if kind == 0:
                context = base64.b64encode(json.dumps({"custom": raw.decode("latin-1")}).encode()).decode()
            elif kind == 1:
                context = base64.b64encode(raw).decode()
            else:
                context = header_text(raw.decode("latin-1"))
            headers["x-amz-client-context"] = context
        if fdp.ConsumeBool():
            headers["x-amzn-trace-id"] = header_text(fdp.ConsumeUnicodeNoSurrogates(40))
        if fdp.ConsumeBool():
            headers["amz-sdk-invocation-id"] = header_text(fdp.ConsumeUnicodeNoSurrogates(40))
        too_large = fdp.ConsumeIntInRange(0, 15) == 0
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
        request = FakeRequest(path, query, headers, body, too_large, 6_291_456)
        problems = check(api, request, serves)
        harness.finding(problems, data)

    return one_input


def check(api: Contract, request: FakeRequest, serves) -> list:
    problems = []
    request_id = api.request_id(request.headers)
    if not UUID.match(request_id):
        problems.append(f"request id {request_id!r} is not a UUID")
    raw = api.function_in_path(request.path)
    allowed = api.INVOCATION_TYPES
    if raw is None:
        raw = api.function_in_path(request.path, api.STREAM_PREFIX, api.STREAM_SUFFIX)
        allowed = api.STREAM_INVOCATION_TYPES
        if raw is None:
            return problems
    try:
        call = api.parse(request, raw, serves, allowed)
    except api.refusals as e:
        if e.api_error.status not in (400, 404, 413):
            problems.append(f"refused with status {e.api_error.status}")
        try:
            json.loads(e.api_error.body(e.message))
        except ValueError:
            problems.append("refusal body is not JSON")
        return problems
    except api.not_found:
        return problems
    if not serves(call.name, call.qualifier):
        problems.append(f"accepted for {call.name!r} qualifier {call.qualifier!r}, not served")
    if call.invocation_type not in allowed:
        problems.append(f"accepted invocation type {call.invocation_type!r}")
    if request.too_large:
        problems.append("accepted a request marked too large")
    try:
        json.loads(call.payload)
    except ValueError:
        problems.append("accepted a payload that is not JSON")
    if call.client_context is not None:
        try:
            doc = json.loads(call.client_context.encode("latin-1").decode("utf-8"))
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            problems.append("accepted a client context that is not a JSON object")
    if (request.headers.get("x-amz-log-type") or "None") not in ("None", "Tail"):  # empty = absent
        problems.append("accepted an unknown log type")
    return problems


def targets(api: Contract) -> dict:
    where = "invoke/contract.py" if api.contract else "invoke/http_api.py (parse_invoke and what it calls)"
    return {f"{where} validation": api.targets()}


def seed(*choices: int, body: bytes = b"{}") -> bytes:
    """An input whose first bytes steer the FuzzedDataProvider; the exact decoding is atheris'."""
    return bytes(choices) + body


SEEDS = [seed(0, 0, 0, 0, 0, 0, 0, 0), seed(1, 0, 0, 1, 2, 1, 1, 0, 1, 0, 0, body=b'{"a": [1, 2]}'),
         seed(6, 1, 37, 0, 1, 3, 1, 1, 1, 0, 0, body=b""), seed(7, 0, 1, 1, 0, 0, 0, 0, 1, body=b"not json"),
         seed(3, 0, 2, 0, 0, 1, 0, 1, 0, 0, body=b'"x"'), seed(9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, body=b"[]")]

if __name__ == "__main__":
    harness.main(load, make_input, SEEDS, targets)
