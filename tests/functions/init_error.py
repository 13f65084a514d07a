"""Fails at import: awslambdaric posts /init/error and exits."""
raise RuntimeError("cannot initialise")


def handler(event, context):
    return event
