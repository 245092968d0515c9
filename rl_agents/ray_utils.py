"""Starting Ray for a local run (a laptop, this 2-core machine, a test).

`ray job submit` runs the driver inside a cluster that already has Ray (and its dashboard): then
`init_ray` only connects. A local run starts Ray without the dashboard (it costs a core's worth of
start-up and ~200 MB on a small machine). Without the dashboard Ray's state API is unreachable,
and Ray Train's `PlacementGroupCleaner` actor logs "Failed to query Ray Train Controller actor
state" every second for the whole of every training run; a worker setup hook lowers that one
logger to ERROR in every Ray worker process. Nothing else is silenced.
"""

from __future__ import annotations

import logging
import os

QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
SETUP_HOOK = "rl_agents.ray_utils.quiet_worker_logs"


def quiet_worker_logs() -> None:
    """Ray `worker_process_setup_hook`: runs once in every worker process before any task."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(**kwargs) -> bool:
    """`ray.init(**kwargs)` unless Ray is up; return True if this call started (or connected) Ray.

    Local (no `address`, no RAY_ADDRESS): no dashboard, and the setup hook above is added to the
    runtime env. Connecting to a cluster: the kwargs go to `ray.init` unchanged (the job's own
    runtime env applies).
    """
    import ray

    if ray.is_initialized():
        return False
    if kwargs.get("address") is None and not os.environ.get("RAY_ADDRESS"):
        kwargs.setdefault("include_dashboard", False)
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        runtime_env.setdefault("worker_process_setup_hook", SETUP_HOOK)
        kwargs["runtime_env"] = runtime_env
    ray.init(**kwargs)
    return True
