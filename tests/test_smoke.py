"""The seed's first curl line against the real daemon and awslambdaric."""

import json


def test_echo_generic_name(echo_daemon):
    status, headers, body = echo_daemon.invoke({"key": "value"})
    assert status == 200
    assert json.loads(body) == {"key": "value"}
    assert headers["x-amz-executed-version"] == "$LATEST"
    assert headers["x-amzn-requestid"]
