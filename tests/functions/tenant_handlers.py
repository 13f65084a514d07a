"""Handlers of the tenant isolation tests (module ``tenant_handlers``, cwd = this folder)."""

import logging
import os
import time

logger = logging.getLogger()
logger.setLevel(logging.INFO)
SERVED = []  # the tenants this process has served, in order (an instance serves one, for its life)


def whose(event, context):
    """Who runs this invocation: the tenant awslambdaric was given, the process, what it served before."""
    time.sleep(float(event.get("seconds", 0)))
    SERVED.append(context.tenant_id)
    logger.info("serving tenant %s", context.tenant_id)
    return {"tenant": context.tenant_id, "pid": os.getpid(), "served": SERVED,
            "arn": context.invoked_function_arn, "version": context.function_version}
