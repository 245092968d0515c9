"""Rollouts on a two-node Ray cluster vs one node: what adding a machine buys an env-bound load.

    python benchmarks/cluster_rollout.py                    # ~6 min on 2 CPU cores
    python benchmarks/cluster_rollout.py --episodes 32 --warmup 30 --repeats 1

A real cluster on this machine (`rl_agents.local_cluster.LocalCluster`): a head and a worker node,
separate `ray start` processes, each in its own network namespace where we are root, each with
**1 CPU** so that two nodes are two cores' worth of work on a 2-core box, not more. A driver
process runs a `RolloutGroup` of 1 worker (one node) and of 2 workers (spread: one per node),
alternating, on ScienceWorld (the real Java simulator) with a scripted policy (no model: the
load is the env). Each group first runs `--warmup` untimed episodes per worker (a fresh JVM
JIT-compiles on a second core for its first ~15 s of stepping). Reports episodes/s for each, the
ratio of the best run of each (goal >= 1.6x) and each repeat's paired ratio, the nodes the 2-worker run used (from the trajectories' `node_id`), and the
machine's parallelism at that moment (2 busy processes / 1: the ceiling on a shared box).
The last line of output is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: `benchmarks.*` importable here and, via PYTHONPATH, in the actors


def drive(args) -> dict:
    """Runs inside the cluster (a driver process with the cluster's environment)."""
    import ray

    from benchmarks.rollout_throughput import machine_parallelism
    from rl_agents.engines import EngineSpec, SamplingParams
    from rl_agents.models import smollm2_path
    from rl_agents.rollout import RolloutConfig, make_tasks
    from rl_agents.rollout_group import RolloutGroup

    ray.init(log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    spec = EngineSpec("scripted", str(smollm2_path()), kwargs={
        "end_of_turn": "<|im_end|>", "policy": "benchmarks.rollout_throughput:sciworld_policy"})
    cfg = RolloutConfig(args.env, split="train", env_kwargs={"max_turns": args.turns}, num_envs=1,
                        sampling=SamplingParams(temperature=0.0, max_new_tokens=32))
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    runs = []
    for rep in range(args.repeats):  # alternate: a neighbour's load hits both alike
        for n in (1, 2):
            with RolloutGroup(spec, cfg, num_workers=n, num_cpus=1, chunk_size=args.chunk, scheduling="SPREAD",
                              progress=False) as group:
                task_ids = group.list_tasks("train")[::3]  # a mix of task types
                warm = n * args.warmup
                group.run(make_tasks(task_ids[:warm], seed=99))
                tasks = make_tasks(task_ids[warm : warm + args.episodes])
                t0 = time.perf_counter()
                trajs = group.run(tasks)
                wall = time.perf_counter() - t0
            used = sorted({nodes.get(t.metadata["node_id"], "?") for t in trajs})
            runs.append({"nodes": n, "wall_s": wall, "episodes_per_s": len(trajs) / wall,
                         "env_steps_per_s": sum(t.num_steps for t in trajs) / wall, "node_ips": used,
                         "errors": sum("error" in t.metadata for t in trajs), "load_avg": os.getloadavg()})
            print(f"run {rep}: {n} node(s) {used}: {len(trajs)} episodes in {wall:.1f} s "
                  f"({len(trajs) / wall:.2f}/s, load {os.getloadavg()[0]:.1f})", flush=True)
        runs.append({"machine_parallelism": machine_parallelism()})
        print(f"run {rep}: machine parallelism now (2 busy processes / 1): {runs[-1]['machine_parallelism']:.2f}x",
              flush=True)
    return {"runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="rl_agents/ScienceWorld-v0")
    p.add_argument("--episodes", type=int, default=160)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=8, help="tasks per streaming call to a worker")
    p.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.driver:
        print("RESULT " + json.dumps(drive(args)), flush=True)
        return

    from rl_agents.local_cluster import LocalCluster

    result = {"benchmark": "cluster_rollout", "cpus": os.cpu_count(), "env": args.env, "episodes": args.episodes,
              "turns_per_episode_max": args.turns, "load_avg_start": os.getloadavg()}
    t0 = time.perf_counter()
    with LocalCluster(workers=1, cpus_per_node=1) as cluster:
        result.update(isolated_nodes=cluster.isolate, cluster_start_s=time.perf_counter() - t0)
        cmd = [sys.executable, __file__, "--driver", *sys.argv[1:]]
        proc = subprocess.Popen(cmd, env=cluster.env(), stdout=subprocess.PIPE, text=True, cwd=ROOT)
        last = ""
        for line in proc.stdout:  # the driver's progress lines as they come
            if line.startswith("RESULT "):
                last = line
            else:
                print(line, end="", flush=True)
        if proc.wait() or not last:
            sys.exit(f"driver failed (rc {proc.returncode})")
        result.update(json.loads(last[len("RESULT "):]))
    runs = result["runs"]
    for n in (1, 2):  # the least-disturbed run of each
        result[f"nodes_{n}"] = max((r for r in runs if r.get("nodes") == n), key=lambda r: r["episodes_per_s"])
    result["machine_parallelism"] = max(r["machine_parallelism"] for r in runs if "machine_parallelism" in r)
    result["speedup"] = result["nodes_2"]["episodes_per_s"] / result["nodes_1"]["episodes_per_s"]
    ones, twos = ([r["episodes_per_s"] for r in runs if r.get("nodes") == n] for n in (1, 2))
    result["paired_speedups"] = [b / a for a, b in zip(ones, twos)]  # each repeat's 2-node run ÷ its 1-node run
    result["median_paired_speedup"] = statistics.median(result["paired_speedups"])
    print(f"  -> paired (each repeat): {', '.join(f'{x:.2f}x' for x in result['paired_speedups'])}; "
          f"median {result['median_paired_speedup']:.2f}x", flush=True)
    print(f"  -> 2 nodes / 1 node: {result['speedup']:.2f}x episodes/s ({result['nodes_2']['episodes_per_s']:.2f} vs "
          f"{result['nodes_1']['episodes_per_s']:.2f}; 2 nodes used {result['nodes_2']['node_ips']}; machine "
          f"parallelism {result['machine_parallelism']:.2f}x)", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
