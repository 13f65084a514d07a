"""The Lambda Server's settings, read once from the environment mapping it is handed, validated, frozen.

Same rules as the daemon's ``config`` (whose value parsers it reuses): an invalid value stops the
start-up with a message naming the variable and the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..config import (
    DEFAULT_AMQP_URI,
    ConfigError,
    inject_amqp_credentials,
    parse_bool,
    parse_log_level,
    parse_number,
    parse_port,
    structured_logging_enabled,
    validate_amqp_uri,
)

DEFAULT_TIMEOUT = 1800.0

__all__ = ["ConfigError", "ServerConfig", "load"]


@dataclass(frozen=True)
class ServerConfig:
    invoke_host: str = "0.0.0.0"
    invoke_port: int = 8080
    amqp_uri: str = DEFAULT_AMQP_URI
    timeout: float = DEFAULT_TIMEOUT  # fail-safe: longest wait for a reply
    region: str = "us-east-1"
    log_level: str = "INFO"
    structured_logging: bool = False
    enable_openfaas: bool = False


def load(env: Mapping[str, str]) -> ServerConfig:
    uri = env.get("AMQP_URI")
    if not uri:
        # AMQP_USERNAME/AMQP_PASSWORD replace the default's guest:guest
        uri = DEFAULT_AMQP_URI
        if env.get("AMQP_USERNAME") and env.get("AMQP_PASSWORD"):
            uri = uri.replace("guest:guest@", "")
    uri = inject_amqp_credentials(uri, env.get("AMQP_USERNAME"), env.get("AMQP_PASSWORD"))
    validate_amqp_uri(uri)
    timeout = parse_number("AWS_LAMBDA_FUNCTION_TIMEOUT", env.get("AWS_LAMBDA_FUNCTION_TIMEOUT", "1800"),
                           allow_equal=False)
    openfaas = parse_bool("ENABLE_OPENFAAS", env["ENABLE_OPENFAAS"]) if "ENABLE_OPENFAAS" in env else False
    return ServerConfig(
        invoke_host=env.get("INVOKE_API_HOST", "0.0.0.0"),
        invoke_port=parse_port("PORT", env.get("PORT", "8080")),
        amqp_uri=uri,
        timeout=timeout,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        log_level=parse_log_level("LOG_LEVEL", env.get("LOG_LEVEL", "INFO")),
        structured_logging=structured_logging_enabled(env),
        enable_openfaas=openfaas,
    )
