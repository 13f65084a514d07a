"""The AWS Lambda Invoke contract, once for every front door: what a valid call is, what is refused.

The daemon's HTTP Invoke API (``http_api``), its AMQP-RPC consumer (``amqp_rpc``) and the
lambda-server (``server.router``) each translate their wire format into a call to :func:`parse`
and the outcome back; none of them checks a name, a qualifier, a type or a size on its own. The
rules: function names (bare, ``NAME:QUALIFIER``, partial or full ARN), qualifiers (path or query,
which must agree), invocation types, log types, request size limits, client context, the
request-id rule, the tenant id of a tenant-isolated function, and the refusals (an
``errors.ApiError`` and its message). AMQP messages carry the Invoke API's own header names, so one
lower-cased header mapping serves all three doors.

Pure: no I/O, no knowledge of sockets, HTTP framing, AMQP or the pool.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
from typing import Callable, Mapping, Optional

from .. import errors
from ..errors import EVENT_REQUEST_LIMIT, SYNC_REQUEST_LIMIT
from ..invocation import is_uuid, new_request_id

ACCOUNT_ID = "012345678912"
PREFIX = "/2015-03-31/functions/"
SUFFIX = "/invocations"
STREAM_PREFIX = "/2021-11-15/functions/"
STREAM_SUFFIX = "/response-streaming-invocations"
INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")
STREAM_INVOCATION_TYPES = ("RequestResponse", "DryRun")  # InvokeWithResponseStream has no Event
LOG_TYPES = ("None", "Tail")
BAD_CONTEXT = "Client context must be a valid Base64-encoded JSON object."
NAME_MISMATCH = "The derived qualifier from the function name does not match the specified qualifier."
# Lambda Managed Instances' published version: what an unqualified invoke of an LMI function runs
# ("$LATEST.PUBLISHED version in Lambda Managed Instances", AWS Lambda Developer Guide); in the API
# model's qualifier pattern ``\$(LATEST(\.PUBLISHED)?)|[a-zA-Z0-9-_$]+``. A daemon runs one version
# of its code, so it answers to this name as it does to $LATEST.
LATEST_PUBLISHED = "$LATEST.PUBLISHED"

# Tenant isolation (AWS's TenancyConfig, TenantIsolationMode=PER_TENANT). The TenantId member of
# Invoke and InvokeWithResponseStream is the X-Amz-Tenant-Id header, 1-256 characters of this
# pattern (botocore's Lambda model, shape TenantId; API_Invoke in the Lambda API Reference).
TENANT_ID_PATTERN = r"[a-zA-Z0-9\._:\/=+\-@ ]+"
TENANT_ID_MAX = 256
_TENANT_ID = re.compile(TENANT_ID_PATTERN)
# InvalidParameterValueException with these texts: "Troubleshooting tenant isolation" (AWS Lambda
# Developer Guide) names the exception for both cases; the first text is AWS's as the launch post
# ("Building multi-tenant SaaS applications with AWS Lambda's new tenant isolation mode", AWS Compute
# Blog) shows it, both as AWS's SAM CLI words them (samcli/commands/local/lib/local_lambda.py).
TENANT_ID_REQUIRED = ("The invoked function is enabled with tenancy configuration. "
                      "Add a valid tenant ID in your request and try again.")
TENANT_ID_NOT_ALLOWED = ("The invoked function is not enabled with tenancy configuration. "
                         "Remove the tenant ID from your request and try again.")

# Header names of the contract, as AWS spells them on responses (requests are matched lower-cased).
REQUEST_ID = "x-amzn-RequestId"
ERROR_TYPE = "x-amzn-ErrorType"
RETRY_AFTER = "Retry-After"
FUNCTION_ERROR = "X-Amz-Function-Error"
LOG_RESULT = "X-Amz-Log-Result"
EXECUTED_VERSION = "X-Amz-Executed-Version"
TENANT_ID = "X-Amz-Tenant-Id"  # also the AMQP header that carries it
UNHANDLED = "Unhandled"  # the X-Amz-Function-Error value for every error the function did not handle


class Refusal(Exception):
    """An Invoke call AWS would refuse: which API error, and its message."""

    def __init__(self, api_error: errors.ApiError, message: str) -> None:
        super().__init__(message)
        self.api_error = api_error
        self.message = message

    def body(self) -> bytes:
        return self.api_error.body(self.message)


class InvokeRequest:
    """A valid Invoke call, before it becomes an Invocation (daemon) or a message (lambda-server)."""

    __slots__ = ("name", "qualifier", "invocation_type", "tail", "encoded_context", "client_context",
                 "payload", "trace_id", "tenant_id")


# ---- names, qualifiers, ARNs ------------------------------------------------------------------

def function_arn(region: str, name: str, qualifier: Optional[str] = None) -> str:
    arn = f"arn:aws:lambda:{region}:{ACCOUNT_ID}:function:{name}"
    return arn if qualifier is None else f"{arn}:{qualifier}"


def not_found(region: str, name: str, qualifier: Optional[str] = None) -> Refusal:
    return Refusal(errors.RESOURCE_NOT_FOUND, errors.not_found_message(function_arn(region, name, qualifier)))


def function_in_path(path: str, prefix: str = PREFIX, suffix: str = SUFFIX) -> Optional[str]:
    """The {FunctionName} segment of an invoke route, or None when ``path`` is not that route."""
    if path.startswith(prefix) and path.endswith(suffix):
        name = path[len(prefix):-len(suffix)]
        if name and "/" not in name:
            return name
    return None


def parse_function_name(raw: str) -> tuple:
    """(name, qualifier) from a name, NAME:Q, partial ARN or full ARN; name None if malformed.
    The region and account of an ARN are not checked: this is the only account there is."""
    parts = raw.split(":")
    n = len(parts)
    if parts[0] == "arn":
        if n in (7, 8) and parts[1].startswith("aws") and parts[2] == "lambda" and parts[5] == "function":
            return parts[6], parts[7] if n == 8 else None
        return None, None
    if n in (3, 4) and parts[1] == "function":
        return parts[2], parts[3] if n == 4 else None
    if n == 2:
        return parts[0], parts[1]
    if n == 1:
        return parts[0], None
    return None, None


def serves_function(name: str, version: str) -> Callable[[str, Optional[str]], bool]:
    """The ``serves`` rule of a daemon: its function (also called ``function``), at ``$LATEST``,
    ``$LATEST.PUBLISHED`` or its configured version, or with no qualifier."""
    names, versions = ("function", name), ("$LATEST", LATEST_PUBLISHED, version)
    return lambda n, q: n in names and (q is None or q in versions)


# ---- the rest of the request ------------------------------------------------------------------

def body_limit(invocation_type: Optional[str]) -> int:
    """AWS's request size limits: 1 MB for an Event, 6 MB otherwise."""
    return EVENT_REQUEST_LIMIT if invocation_type == "Event" else SYNC_REQUEST_LIMIT


def request_id(candidate: Optional[str], in_use: Callable[[str], bool]) -> str:
    """The caller's id (the SDK's Amz-Sdk-Invocation-Id, an AMQP correlation_id) when it is a UUID
    not already in flight, lower-cased; else a fresh one."""
    if candidate is not None and is_uuid(candidate):
        lowered = candidate.lower()
        if not in_use(lowered):
            return lowered
    return new_request_id()


def decode_client_context(encoded: str) -> Optional[str]:
    """The decoded client context (JSON object text), or None when it is not valid."""
    try:
        raw = base64.b64decode(encoded, validate=True)
        doc = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    # latin-1 keeps the UTF-8 bytes as they are when the header is written out
    return raw.decode("latin-1").replace("\r", "").replace("\n", "")


def tenant_id_violations(value: str) -> list:
    """The constraints of the TenantId member that ``value`` breaks, in AWS's words (its API
    validation messages), empty when it is valid."""
    broken = []
    if _TENANT_ID.fullmatch(value) is None:
        broken.append(f"Member must satisfy regular expression pattern: {TENANT_ID_PATTERN}")
    if len(value) > TENANT_ID_MAX:
        broken.append(f"Member must have length less than or equal to {TENANT_ID_MAX}")
    elif not value:
        broken.append("Member must have length greater than or equal to 1")
    return broken


def check_tenant_id(value: Optional[str]) -> None:
    """Refuse a tenant id that breaks the model's constraints: 400 ValidationException, before the
    function is looked at (AWS validates the request's members first)."""
    if value is None:
        return
    broken = tenant_id_violations(value)
    if broken:
        count = f"{len(broken)} validation error{'s' if len(broken) > 1 else ''} detected: "
        raise Refusal(errors.VALIDATION, count + "; ".join(
            f"Value '{value}' at 'tenantId' failed to satisfy constraint: {text}" for text in broken))


def check_tenancy(tenant_id: Optional[str], tenant_isolated: Optional[bool]) -> None:
    """A tenant-isolated function takes only calls with a tenant id; any other function, none.
    ``tenant_isolated`` None: the door does not know the function (lambda-server), the daemon decides."""
    if tenant_isolated is None:
        return
    if tenant_isolated and tenant_id is None:
        raise Refusal(errors.INVALID_PARAMETER_VALUE, TENANT_ID_REQUIRED)
    if not tenant_isolated and tenant_id is not None:
        raise Refusal(errors.INVALID_PARAMETER_VALUE, TENANT_ID_NOT_ALLOWED)


def retry_after(timeout: float) -> str:
    """Seconds a throttled caller should wait: a busy runtime is free within one function timeout."""
    return str(max(1, int(timeout)))


def parse(headers: Mapping[str, str], raw_name: str, qualifier: Optional[str], payload: bytes, *,
          serves: Callable[[str, Optional[str]], bool], region: str, too_large: Optional[bool] = None,
          allowed: tuple = INVOCATION_TYPES, check_json: bool = True,
          tenant_isolated: Optional[bool] = False) -> InvokeRequest:
    """Validate an Invoke call in the order AWS does; raises :class:`Refusal`.

    ``headers``: the request's headers by lower-cased name. ``raw_name``: the FunctionName as given
    (any form, already URL-decoded); ``qualifier``: the separately given Qualifier, if any.
    ``serves(name, qualifier)`` says whether this door knows the function. ``too_large``: the door
    already knows (HTTP stops reading at the limit); None: measure ``payload``. ``check_json``:
    refuse a payload that is not JSON (the Invoke API does; AMQP-RPC passes bytes as they are).
    ``tenant_isolated``: the function's TenancyConfig (see :func:`check_tenancy`)."""
    call = InvokeRequest()
    call.invocation_type = invocation_type = headers.get("x-amz-invocation-type") or "RequestResponse"
    if invocation_type not in allowed:
        raise Refusal(errors.INVALID_PARAMETER_VALUE,
                      f"Unsupported invocation type {invocation_type!r}; use one of {', '.join(allowed)}.")
    limit = body_limit(invocation_type)
    if too_large if too_large is not None else len(payload) > limit:
        raise Refusal(errors.REQUEST_TOO_LARGE, errors.request_too_large_message(limit))
    call.tenant_id = tenant_id = headers.get("x-amz-tenant-id")
    if tenant_id is not None:
        check_tenant_id(tenant_id)

    name, named_qualifier = parse_function_name(raw_name)
    if named_qualifier is not None and qualifier is not None and named_qualifier != qualifier:
        raise Refusal(errors.INVALID_PARAMETER_VALUE, NAME_MISMATCH)
    qualifier = named_qualifier if named_qualifier is not None else qualifier
    if not name or not serves(name, qualifier):
        raise not_found(region, name or raw_name, qualifier)
    call.name, call.qualifier = name, qualifier
    if tenant_isolated or tenant_id is not None:
        check_tenancy(tenant_id, tenant_isolated)

    log_type = headers.get("x-amz-log-type") or "None"
    if log_type not in LOG_TYPES:
        raise Refusal(errors.INVALID_PARAMETER_VALUE, f"Unsupported log type {log_type!r}; use None or Tail.")
    call.tail = log_type == "Tail"

    call.encoded_context = encoded = headers.get("x-amz-client-context") or None
    call.client_context = None
    if encoded:
        call.client_context = decode_client_context(encoded)
        if call.client_context is None:
            raise Refusal(errors.INVALID_REQUEST_CONTENT, BAD_CONTEXT)

    if not payload.strip():
        payload = b"{}"  # AWS hands an empty payload to the function as {}
    elif check_json:
        try:
            json.loads(payload)
        except ValueError as e:
            raise Refusal(errors.INVALID_REQUEST_CONTENT, "Could not parse request body into json: Could "
                                                          f"not parse payload into json: {e}") from None
    call.payload = payload
    call.trace_id = headers.get("x-amzn-trace-id") or None
    return call


def parse_http(headers: Mapping[str, str], path_name: str, query: str, body: bytes, too_large: bool, *,
               serves: Callable[[str, Optional[str]], bool], region: str,
               allowed: tuple = INVOCATION_TYPES, tenant_isolated: Optional[bool] = False) -> InvokeRequest:
    """:func:`parse` for the Invoke API over HTTP: FunctionName is the URL-encoded path segment,
    Qualifier the query parameter."""
    qualifier = None
    if query:
        values = urllib.parse.parse_qs(query).get("Qualifier")
        if values:
            qualifier = values[0]
    return parse(headers, urllib.parse.unquote(path_name), qualifier, body, serves=serves, region=region,
                 too_large=too_large, allowed=allowed, tenant_isolated=tenant_isolated)
