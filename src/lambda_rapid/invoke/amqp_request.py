"""An AMQP-RPC request message read as the Invoke contract has it (``contract.parse``).

The message's headers (string or UTF-8 byte values) and body become the Invocation the pool runs,
and whether its caller streams the response (``X-Amz-Invoke-Mode: RESPONSE_STREAM``); a
``contract.Refusal`` says why not. Used by the daemon's consumer (``amqp_rpc``).
"""

from __future__ import annotations

from typing import Callable

from .. import errors
from ..amqp.link import header_text
from ..config import Config
from ..invocation import Invocation
from . import contract, eventstream


class RequestReader:
    def __init__(self, config: Config, is_active: Callable[[str], bool]) -> None:
        self.function_name = config.function_name
        self.serves = contract.serves_function(config.function_name, config.function_version)
        self.region = config.region
        self.tenant_isolated = config.tenant_isolated
        self.arn = config.function_arn
        self.is_active = is_active  # whether a request id is running (a caller's id is not reused then)

    def read(self, message) -> tuple:
        """(the Invocation a request message asks for, whether its caller streams the response);
        a contract.Refusal says why not."""
        props = message.header.properties
        headers = _headers(props.headers)
        mode = headers.get("x-amz-invoke-mode")
        streaming = mode == eventstream.RESPONSE_STREAM
        if mode is not None and not streaming and mode != eventstream.BUFFERED:
            raise contract.Refusal(errors.INVALID_PARAMETER_VALUE, f"Unsupported invoke mode {mode[:100]!r}; use "
                                   f"{eventstream.BUFFERED} or {eventstream.RESPONSE_STREAM}.")
        call = contract.parse(headers, self.function_name, headers.get("x-amz-qualifier"), message.body,
                              serves=self.serves, region=self.region, check_json=False,
                              tenant_isolated=self.tenant_isolated,
                              allowed=contract.STREAM_INVOCATION_TYPES if streaming else contract.INVOCATION_TYPES)
        request_id = contract.request_id(header_text(props.correlation_id), self.is_active)
        inv = Invocation(request_id, call.payload, arn=self.arn, client_context=call.client_context,
                         trace_id=call.trace_id, invocation_type=call.invocation_type, tail=call.tail,
                         qualifier=call.qualifier, tenant_id=call.tenant_id)
        return inv, streaming


def _headers(table: object) -> dict:
    """Request headers by lower-cased name; string and byte values only (others are ignored)."""
    result: dict = {}
    if not isinstance(table, dict):
        return result
    for key, value in table.items():
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise contract.Refusal(errors.INVALID_REQUEST_CONTENT, f"Header {key!r} is not UTF-8 text.") from None
        elif not isinstance(value, str):
            if str(key).lower().startswith(("x-amz-", "x-amzn-")):
                raise contract.Refusal(errors.INVALID_PARAMETER_VALUE,
                                       f"Header {key!r} must be a string, not {type(value).__name__}.")
            continue
        result[str(key).lower()] = value
    return result
