"""Cluster test driver: rollouts over two nodes while the test kills one of them. Writes a marker
file after the first results (the test then kills the node) and prints one JSON line. With a
`go` file: after the marker, waits until the test creates it (once the GCS has declared the node
dead), so that the driver learns of the worker's death only after the GCS did."""

import json
import sys
import time
from collections import Counter
from pathlib import Path

from rl_agents.rollout import make_tasks
from rl_agents.rollout_group import RolloutSection


def main(marker: str, n_tasks: int, workers: int = 2, go: str | None = None) -> None:
    import ray

    ray.init()
    # 2 workers, spread: one on the head (2 CPUs), one on w1; the one lost with w1 is replaced on the head.
    # 3 workers: the head is full, and the one lost with the other node is retired.
    section = RolloutSection(num_workers=workers, envs_per_worker=2, max_new_tokens=24, max_context=1024)
    group = section.make_group("tiny-llama", "rl_agents/TextShop-v0", progress=False)
    tasks = make_tasks(group.list_tasks("train")[:n_tasks], seed=0)
    nodes_at_start = sorted({i["node_id"] for i in group.worker_info})
    seen, rows = Counter(), []
    here = ray.get_runtime_context().get_node_id()
    for traj in group.iter_results(tasks):
        key = (traj.task_id, traj.metadata["sample_index"])
        seen[key] += 1
        rows.append({"node_id": traj.metadata["node_id"], "worker": traj.metadata["worker"],
                     "error": traj.metadata.get("error")})
        # Kill once the other node has delivered work too (its worker may start later than the head's).
        if len(rows) >= 4 and not Path(marker).exists() and any(r["node_id"] != here for r in rows):
            Path(marker).write_text("go")
            while go is not None and not Path(go).exists():
                time.sleep(0.2)
    out = {"nodes": {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}, "nodes_at_start": nodes_at_start, "rows": rows, "wanted": len(tasks),
           "returned": sum(seen.values()), "distinct": len(seen),
           "missing": len({(t.task_id, t.sample_index) for t in tasks} - set(seen)),
           "restarts": group.total_restarts, "retired": group.retired, "live": group.live()}
    group.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *(int(a) if a.isdigit() else a for a in sys.argv[3:]))
