"""The pool's counters and their Prometheus text exposition (format 0.0.4), rendered on request.

Written by hand rather than with prometheus-client: the pool bumps plain integers on the hot path
and the text is only built when /metrics is scraped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

from .histogram import Histogram
from .instances import InstanceState
from .invocation import OUTCOMES

if TYPE_CHECKING:
    from .pool import Pool


class Metrics:
    """Counters the pool keeps for /metrics; plain numbers, cheap to bump on the hot path."""

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.spawns = 0
        self.kills: Dict[str, int] = {}  # StopReason value -> instances stopped for it
        self.init_failures = 0
        self.durations = Histogram()
        self.observe = self.durations.observe


def render(pool: Pool) -> bytes:
    m = pool.metrics
    out = [
        "# HELP lambda_invocations_total Invocations by how they ended.",
        "# TYPE lambda_invocations_total counter",
    ]
    out += [f'lambda_invocations_total{{outcome="{k}"}} {v}' for k, v in m.outcomes.items()]
    out += m.durations.lines("lambda_invocation_duration_seconds",
                             "Time from hand-over to the runtime to its answer.")
    ready = [i for i in pool.instances if i.state is InstanceState.READY]
    busy = sum(1 for i in ready if i.held)
    out += [
        "# HELP lambda_instances Runtime instances by state.",
        "# TYPE lambda_instances gauge",
        f'lambda_instances{{state="starting"}} {pool.instances.count(InstanceState.STARTING)}',
        f'lambda_instances{{state="idle"}} {len(ready) - busy}',
        f'lambda_instances{{state="busy"}} {busy}',
        "# HELP lambda_queue_depth Invocations waiting for an instance.",
        "# TYPE lambda_queue_depth gauge",
        f"lambda_queue_depth {len(pool.queue)}",
        "# HELP lambda_in_flight Invocations running in a runtime.",
        "# TYPE lambda_in_flight gauge",
        f"lambda_in_flight {len(pool.in_flight)}",
        "# HELP lambda_instance_spawns_total Runtime instances started.",
        "# TYPE lambda_instance_spawns_total counter",
        f"lambda_instance_spawns_total {m.spawns}",
        "# HELP lambda_instance_init_failures_total Instances that failed their init.",
        "# TYPE lambda_instance_init_failures_total counter",
        f"lambda_instance_init_failures_total {m.init_failures}",
        "# HELP lambda_instance_kills_total Instances stopped, by reason.",
        "# TYPE lambda_instance_kills_total counter",
    ]
    out += [f'lambda_instance_kills_total{{reason="{k}"}} {v}' for k, v in sorted(m.kills.items())]
    return ("\n".join(out) + "\n").encode()
