"""A durable function (AWS's durable execution SDK) for tests/test_durable.py.

It checkpoints through the Lambda control plane at ``AWS_ENDPOINT_URL_LAMBDA`` (AWS's emulator in
the test): two steps, a wait, a callback an outside caller completes, and a step that fails its
first attempt and succeeds on the retry the SDK schedules. The result names the ARN the function was
invoked by (qualified when the execution is).
"""

from __future__ import annotations

from aws_durable_execution_sdk_python.config import CallbackConfig, Duration, JitterStrategy, StepConfig
from aws_durable_execution_sdk_python.context import DurableContext
from aws_durable_execution_sdk_python.execution import durable_execution
from aws_durable_execution_sdk_python.retries import RetryStrategyConfig, create_retry_strategy
from aws_durable_execution_sdk_python.types import StepContext

RETRY_ONCE = StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(
    max_attempts=3, initial_delay=Duration.from_seconds(1), backoff_rate=1, jitter_strategy=JitterStrategy.NONE)))


class CardDeclined(Exception):
    pass


def charge(step: StepContext, amount: int) -> dict:
    if step.attempt == 1:
        raise CardDeclined(f"attempt {step.attempt} declined")
    return {"charged": amount, "attempt": step.attempt}


@durable_execution
def handler(event: dict, context: DurableContext) -> dict:
    order = event["order"]
    total = context.step(lambda _step: sum(event["items"]), name="price")
    context.wait(Duration.from_seconds(1), name="cool-down")
    approval = context.create_callback(name="approval", config=CallbackConfig(timeout=Duration.from_seconds(120)))
    approved_by = approval.result()
    payment = context.step(lambda step: charge(step, total), name="charge", config=RETRY_ONCE)
    return {"order": order, "total": total, "approved_by": approved_by, "payment": payment,
            "invoked_arn": context.lambda_context.invoked_function_arn}
