"""Cluster test driver (run by test_cluster.py with the cluster's environment): rollouts on two
nodes, then a new policy that only this node's disk holds, then the same with the object store
closed to weights. Prints one JSON line."""

import json
import sys
from pathlib import Path

import torch

from rl_agents.config import ConfigError
from rl_agents.models import load_model, load_tokenizer, tiny_llama_dir
from rl_agents.rollout import make_tasks
from rl_agents.rollout_group import RolloutSection


def main(scratch: str) -> None:
    import ray

    ray.init()
    out = {"nodes": {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}}
    # A policy only this node's disk holds: the tiny model with a perturbed output layer.
    policy = Path(scratch) / "policy"
    model = load_model(tiny_llama_dir())
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight), alpha=0.5)
    model.save_pretrained(policy, safe_serialization=True)
    load_tokenizer(tiny_llama_dir()).save_pretrained(policy)

    section = RolloutSection(num_workers=2, envs_per_worker=2, max_new_tokens=8, max_context=1024)
    group = section.make_group("tiny-llama", "rl_agents/TextShop-v0", progress=False)
    tasks = make_tasks(group.list_tasks("train")[:4], seed=0)
    before = group.run(tasks)
    group.update_weights(policy)
    out["sync_new"] = group.check_weight_sync(model)
    out["sync_old"] = group.check_weight_sync(load_model(tiny_llama_dir()))
    after = group.run(tasks)
    out["trajectories"] = [{k: t.metadata[k] for k in ("node_id", "worker", "weights_version", "weights")}
                           for t in before + after]
    out["shipped"] = group.weights.shipped
    group.shutdown()

    # Over the object-store limit, a policy the other node cannot read fails before any work.
    small = RolloutSection(num_workers=2, envs_per_worker=2, object_store_weights_mb=0)
    try:
        small.make_group(policy, "rl_agents/TextShop-v0", progress=False)
        out["start_error"] = None
    except ConfigError as e:
        out["start_error"] = str(e)
    group = small.make_group("tiny-llama", "rl_agents/TextShop-v0", progress=False)
    try:
        group.update_weights(policy)
        out["update_error"] = None
    except ConfigError as e:
        out["update_error"] = str(e)
    try:  # a run that will write its policies to this node's scratch: refused at its start
        group.check_updates_reach(Path(scratch) / "run")
        out["run_error"] = None
    except ConfigError as e:
        out["run_error"] = str(e)
    group.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
