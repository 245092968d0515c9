"""Cluster test driver: SFT on Ray Train, one worker, on a node with the `trainer` resource, with a
checkpoint every step on storage every node reads; the test kills that node mid-training and
starts a replacement. Prints one JSON line."""

import json
import sys

from algorithms.losses import SFTObjective
from rl_agents.experts import iter_expert_trajectories
from rl_agents.models import load_tokenizer, tiny_llama_dir
from rl_agents.tokenization import ChatSegmenter, encode_trajectory
from rl_agents.train import ModelConfig, OptimConfig, TrainConfig, train


def main(storage: str) -> None:
    import ray

    ray.init()
    segmenter = ChatSegmenter(load_tokenizer(tiny_llama_dir()))
    data = [encode_trajectory(t, segmenter) for t in iter_expert_trajectories("rl_agents/TextShop-v0", "train", 12)]
    cfg = TrainConfig(num_workers=1, resources_per_worker={"trainer": 1}, storage_path=storage, name="sft",
                      checkpoint_every=1, max_failures=2, model=ModelConfig(path=str(tiny_llama_dir())),
                      optim=OptimConfig(lr=1e-3, batch_size=2, micro_batch_size=2, epochs=2))
    result = train(SFTObjective(), data, cfg)
    print("RESULT " + json.dumps({"steps": [r["step"] for r in result.history],
                                  "checkpoint": result.checkpoint_path}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
