"""Starting Ray for a local run (a laptop, this 2-core machine, a test).

`ray job submit` runs the driver inside a cluster that already has Ray (and its dashboard): then
`init_ray` only connects. A local run starts Ray bound to 127.0.0.1 (`loopback_only`), with a reaper that stops its processes if
the driver is killed (`rl_agents.reaper`), and without the dashboard (it costs a core's worth of
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
    local = kwargs.get("address") is None and not os.environ.get("RAY_ADDRESS")
    if local:
        kwargs.setdefault("include_dashboard", False)
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        runtime_env.setdefault("worker_process_setup_hook", SETUP_HOOK)
        kwargs["runtime_env"] = runtime_env
        loopback_only()
    ray.init(**kwargs)
    if local and not _REAPER:
        from rl_agents import reaper

        _REAPER.append(reaper.start())  # one per driver process, whatever number of ray.init calls
    return True


_REAPER: list = []


def loopback_only() -> None:
    """Make a local Ray instance listen on 127.0.0.1 only.

    On Linux Ray resolves "127.0.0.1" to the machine's routable IP and its GCS, raylet, workers
    and agents listen on every interface (token-protected since Ray 2.60, but still reachable
    from the network). Ray binds to the loopback when it considers itself a single-machine
    instance: the `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` switch (read at import into
    `ray._private.ray_constants.ENABLE_RAY_CLUSTER`, and by the processes Ray starts). We set both;
    `rl_agents.ray_utils` tests check the listening sockets. Cluster runs (`ray start`, `ray job
    submit`, an `address`) never come here."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
