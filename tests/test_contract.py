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
