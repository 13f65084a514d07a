"""AWS error shapes as data: API-level errors (status, x-amzn-ErrorType, body) and function-level
error bodies (200 + X-Amz-Function-Error). Every front door renders errors from here.

Body member names follow botocore's Lambda model: ``message`` (lower case) for
InvalidRequestContent / RequestTooLarge / TooManyRequests / InvalidParameterValue, ``Message`` for
ResourceNotFound and Service, so boto3 raises the modelled exception with the right text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

SYNC_REQUEST_LIMIT = 6_291_456  # bytes of payload AWS takes for RequestResponse (and DryRun)
EVENT_REQUEST_LIMIT = 1_048_576  # ... and for Event (invoke.contract.body_limit applies them)
RESPONSE_LIMIT = 6_291_556
# Streamed responses may be up to 200 MB (AWS raised it from 20 MB in 2025: "response streaming functions
# can return payloads up to 200 MB", https://docs.aws.amazon.com/lambda/latest/dg/configuration-response-streaming.html).
STREAM_RESPONSE_LIMIT = 209_715_200
_COMPACT = (",", ":")  # AWS writes its error bodies without spaces


@dataclass(frozen=True)
class ApiError:
    status: int
    code: str
    fault: str  # "User" or "Service"
    message_key: str  # "message" or "Message"
    retry_after: bool = False

    def body(self, message: str, **extra: str) -> bytes:
        doc = {"Type": self.fault}
        doc.update(extra)
        doc[self.message_key] = message
        return json.dumps(doc, separators=_COMPACT).encode()


INVALID_REQUEST_CONTENT = ApiError(400, "InvalidRequestContentException", "User", "message")
INVALID_PARAMETER_VALUE = ApiError(400, "InvalidParameterValueException", "User", "message")
# A request member that breaks its constraint in the API model (length, pattern): AWS answers
# "1 validation error detected: Value '...' at 'member' failed to satisfy constraint: ...". Not in
# botocore's Lambda model, so boto3 raises a plain ClientError with this code.
VALIDATION = ApiError(400, "ValidationException", "User", "message")
RESOURCE_NOT_FOUND = ApiError(404, "ResourceNotFoundException", "User", "Message")
REQUEST_TOO_LARGE = ApiError(413, "RequestEntityTooLargeException", "User", "message")
TOO_MANY_REQUESTS = ApiError(429, "TooManyRequestsException", "User", "message", retry_after=True)
SERVICE = ApiError(503, "ServiceException", "Service", "Message")
BAD_GATEWAY = ApiError(502, "ServiceException", "Service", "Message")
# "The afterRestore() runtime hook encountered an error" (botocore's Lambda model: 400, Type/Message).
SNAP_START = ApiError(400, "SnapStartException", "User", "Message")
# By x-amzn-ErrorType, for a door that relays another's refusal (ServiceException: the 503 one).
API_ERRORS = {e.code: e for e in (INVALID_REQUEST_CONTENT, INVALID_PARAMETER_VALUE, VALIDATION, RESOURCE_NOT_FOUND,
                                  REQUEST_TOO_LARGE, TOO_MANY_REQUESTS, SERVICE, SNAP_START)}


def throttled_body() -> bytes:
    return TOO_MANY_REQUESTS.body("Rate Exceeded.", Reason="ReservedFunctionConcurrentInvocationLimitExceeded")


def request_too_large_message(limit: int) -> str:
    return f"Request must be smaller than {limit} bytes for the InvokeFunction operation"


def not_found_message(arn: str) -> str:
    return f"Function not found: {arn}"


# ---- function-level errors: HTTP 200 with X-Amz-Function-Error: Unhandled --------------------

def function_error(error_type: str, message: str) -> bytes:
    return json.dumps({"errorType": error_type, "errorMessage": message}, separators=_COMPACT).encode()


def timeout_error(request_id: str, timeout: float) -> bytes:
    return function_error("Sandbox.Timedout",
                          f"RequestId: {request_id} Error: Task timed out after {timeout:.2f} seconds")


def init_timeout_error(request_id: str, timeout: float) -> bytes:
    return function_error("Sandbox.Timedout",
                          f"RequestId: {request_id} Error: Init phase timed out after {timeout:.2f} seconds")


def exit_error(request_id: str, status: str) -> bytes:
    return function_error("Runtime.ExitError",
                          f"RequestId: {request_id} Error: Runtime exited with error: {status}")


def response_too_large_error(limit: int = RESPONSE_LIMIT) -> bytes:
    return function_error("Function.ResponseSizeTooLarge",
                          f"Response payload size exceeded maximum allowed payload size ({limit} bytes).")


def spawn_error(request_id: str, reason: str) -> bytes:
    return function_error("Runtime.InvalidEntrypoint", f"RequestId: {request_id} Error: {reason}")


def runtime_error_body(body: bytes, error_type: Optional[str]) -> bytes:
    """What a caller gets for a runtime's /error or /init/error post (the body as posted)."""
    if body.strip():
        return body
    return function_error(error_type or "Runtime.Unknown", "The runtime reported an error without a body.")


# ---- Runtime API errors (to runtimes) --------------------------------------------------------

def runtime_api_error(error_type: str, message: str) -> bytes:
    return json.dumps({"errorType": error_type, "errorMessage": message}, separators=_COMPACT).encode()
