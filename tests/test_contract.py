"""The Invoke contract (``invoke.contract``) as pure rules; the doors that use it are tested end to end
in test_invoke_api.py (HTTP), test_amqp_rpc.py (AMQP-RPC) and test_lambda_server.py."""

from __future__ import annotations

import base64

import pytest

from lambda_rapid import errors
from lambda_rapid.invoke import contract

SERVES = contract.serves_function("fn", "7")
ARN = "arn:aws:lambda:eu-west-1:012345678912:function:"


def parse(headers=None, name="fn", qualifier=None, payload=b"{}", **kw):
    return contract.parse(headers or {}, name, qualifier, payload, serves=SERVES, region="eu-west-1", **kw)


def refusal(*args, **kw) -> contract.Refusal:
    with pytest.raises(contract.Refusal) as info:
        parse(*args, **kw)
    return info.value


@pytest.mark.parametrize("raw,expected", [
    ("fn", ("fn", None)), ("fn:7", ("fn", "7")), ("123:function:fn", ("fn", None)),
    ("123:function:fn:$LATEST", ("fn", "$LATEST")), (f"{ARN}fn", ("fn", None)), (f"{ARN}fn:7", ("fn", "7")),
    ("arn:aws:s3:::bucket", (None, None)), ("a:b:c:d:e", (None, None)),
])
def test_function_names(raw, expected):
    assert contract.parse_function_name(raw) == expected


def test_a_valid_call():
    context = base64.b64encode(b'{"custom": {"k": "v"}}').decode()
    call = parse({"x-amz-log-type": "Tail", "x-amz-client-context": context, "x-amzn-trace-id": "Root=1-x"},
                 name="function:7", payload=b"  ")
    assert (call.name, call.qualifier, call.invocation_type, call.tail) == ("function", "7", "RequestResponse", True)
    assert call.client_context == '{"custom": {"k": "v"}}' and call.encoded_context == context
    assert call.payload == b"{}" and call.trace_id == "Root=1-x"


def test_refusals_in_order_and_with_aws_texts():
    assert refusal({"x-amz-invocation-type": "Later"}, payload=b"x" * 10**7).api_error is errors.INVALID_PARAMETER_VALUE
    event = {"x-amz-invocation-type": "Event"}
    too_big = refusal(event, name="nope", payload=b"x" * (contract.EVENT_REQUEST_LIMIT + 1))
    assert too_big.api_error is errors.REQUEST_TOO_LARGE and str(contract.EVENT_REQUEST_LIMIT) in too_big.message
    assert refusal(name="fn:7", qualifier="8").message == contract.NAME_MISMATCH
    missing = refusal(qualifier="8")
    assert missing.api_error is errors.RESOURCE_NOT_FOUND and missing.message == f"Function not found: {ARN}fn:8"
    assert refusal(name="x:y:z").message == f"Function not found: {ARN}x:y:z"  # malformed: the name as given
    assert refusal({"x-amz-log-type": "Verbose"}).api_error is errors.INVALID_PARAMETER_VALUE
    assert refusal({"x-amz-client-context": "e30"}).message == contract.BAD_CONTEXT  # "{}" without padding
    assert refusal({"x-amz-client-context": base64.b64encode(b"[1]").decode()}).message == contract.BAD_CONTEXT
    assert refusal(payload=b"not json").api_error is errors.INVALID_REQUEST_CONTENT
    # AMQP-RPC passes the bytes as they are; the door that knows (HTTP) says whether it read too much
    assert parse(payload=b"not json", check_json=False).payload == b"not json"
    big = b'"' + b"x" * contract.EVENT_REQUEST_LIMIT + b'"'
    assert parse(event, payload=big, too_large=False).payload is big
    assert refusal(payload=b"{}", too_large=True).api_error is errors.REQUEST_TOO_LARGE
    stream = refusal({"x-amz-invocation-type": "Event"}, allowed=contract.STREAM_INVOCATION_TYPES)
    assert "RequestResponse, DryRun" in stream.message


def test_http_binding():
    call = contract.parse_http({}, "arn%3Aaws%3Alambda%3Aus-east-1%3A1%3Afunction%3Afn", "Qualifier=%24LATEST",
                               b"{}", False, serves=SERVES, region="eu-west-1")
    assert (call.name, call.qualifier) == ("fn", "$LATEST")
    assert contract.function_in_path("/2015-03-31/functions/fn/invocations") == "fn"
    assert contract.function_in_path("/2015-03-31/functions/a/b/invocations") is None
    assert contract.function_in_path("/2021-11-15/functions/fn/response-streaming-invocations",
                                     contract.STREAM_PREFIX, contract.STREAM_SUFFIX) == "fn"


def test_request_ids():
    sdk = "6F0C9A4E-1D2B-4C3D-8E9F-0A1B2C3D4E5F"
    assert contract.request_id(sdk, lambda _id: False) == sdk.lower()
    taken = contract.request_id(sdk, lambda _id: True)
    assert taken != sdk.lower() and len(taken) == 36
    assert contract.request_id("not-a-uuid", lambda _id: False) != "not-a-uuid"
    assert contract.request_id(None, lambda _id: False)


def test_limits_and_retry_after():
    assert contract.body_limit("Event") == 1_048_576
    assert contract.body_limit("RequestResponse") == contract.body_limit(None) == 6_291_456
    assert contract.retry_after(0.5) == "1" and contract.retry_after(30) == "30"
    assert contract.function_arn("us-east-1", "fn", "3") == "arn:aws:lambda:us-east-1:012345678912:function:fn:3"


# ---- tenant isolation and $LATEST.PUBLISHED --------------------------------------------------

def test_tenant_ids_of_a_tenant_isolated_function():
    call = parse({"x-amz-tenant-id": "Blue Tenant/1=+@:._-"}, tenant_isolated=True)
    assert call.tenant_id == "Blue Tenant/1=+@:._-"
    assert parse({"x-amz-tenant-id": "t" * 256}, tenant_isolated=True).tenant_id == "t" * 256
    missing = refusal(tenant_isolated=True)
    assert missing.api_error is errors.INVALID_PARAMETER_VALUE and missing.message == contract.TENANT_ID_REQUIRED
    assert missing.body() == (b'{"Type":"User","message":"The invoked function is enabled with tenancy configuration. '
                              b'Add a valid tenant ID in your request and try again."}')


def test_a_tenant_id_for_a_function_that_is_not_tenant_isolated():
    assert parse().tenant_id is None
    extra = refusal({"x-amz-tenant-id": "blue"})
    assert extra.api_error is errors.INVALID_PARAMETER_VALUE and extra.message == contract.TENANT_ID_NOT_ALLOWED
    # the lambda-server does not know the function: it checks the form and leaves the rest to the daemon
    assert parse({"x-amz-tenant-id": "blue"}, tenant_isolated=None).tenant_id == "blue"
    assert parse(tenant_isolated=None).tenant_id is None


@pytest.mark.parametrize("value,broken", [
    ("a*b", ["Member must satisfy regular expression pattern: [a-zA-Z0-9\\._:\\/=+\\-@ ]+"]),
    ("t" * 257, ["Member must have length less than or equal to 256"]),
    ("é" * 300, ["Member must satisfy regular expression pattern: [a-zA-Z0-9\\._:\\/=+\\-@ ]+",
                 "Member must have length less than or equal to 256"]),
    ("", ["Member must satisfy regular expression pattern: [a-zA-Z0-9\\._:\\/=+\\-@ ]+",
          "Member must have length greater than or equal to 1"]),
])
def test_malformed_tenant_ids_are_validation_errors(value, broken):
    for isolated in (True, False, None):  # whatever the function's tenancy: the form is checked first
        bad = refusal({"x-amz-tenant-id": value}, tenant_isolated=isolated, name="nope")
        assert bad.api_error is errors.VALIDATION and bad.api_error.status == 400
        count = "1 validation error detected: " if len(broken) == 1 else "2 validation errors detected: "
        assert bad.message == count + "; ".join(
            f"Value '{value}' at 'tenantId' failed to satisfy constraint: {text}" for text in broken)
    assert errors.API_ERRORS["ValidationException"] is errors.VALIDATION  # relayed by the lambda-server


def test_order_of_the_tenant_rules():
    # the id's form before the function is looked up; the tenancy rule after it (404 first), before the rest
    assert refusal({"x-amz-tenant-id": "a*b"}, name="nope").api_error is errors.VALIDATION
    assert refusal(name="nope", tenant_isolated=True).api_error is errors.RESOURCE_NOT_FOUND
    assert refusal(payload=b"not json", tenant_isolated=True).message == contract.TENANT_ID_REQUIRED
    too_big = refusal({"x-amz-tenant-id": "a*b"}, payload=b"x" * (contract.SYNC_REQUEST_LIMIT + 1))
    assert too_big.api_error is errors.REQUEST_TOO_LARGE


@pytest.mark.parametrize("raw,qualifier", [
    ("fn:$LATEST.PUBLISHED", None), ("fn", "$LATEST.PUBLISHED"), (f"{ARN}fn:$LATEST.PUBLISHED", None),
    ("123456789012:function:fn:$LATEST.PUBLISHED", "$LATEST.PUBLISHED"),
])
def test_latest_published_is_a_qualifier_of_every_function(raw, qualifier):
    call = parse(name=raw, qualifier=qualifier)
    assert (call.name, call.qualifier) == ("fn", "$LATEST.PUBLISHED")
    http = contract.parse_http({}, "fn", "Qualifier=%24LATEST.PUBLISHED", b"{}", False, serves=SERVES,
                               region="eu-west-1")
    assert http.qualifier == "$LATEST.PUBLISHED"
    assert refusal(name="fn:$LATEST.DRAFT").message == f"Function not found: {ARN}fn:$LATEST.DRAFT"
