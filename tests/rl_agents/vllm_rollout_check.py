"""Runs in the vLLM environment (.venv-vllm), started by test_vllm_rollouts.py: a `RolloutWorker` with
the project's `VLLMEngine` plays TextShop episodes (greedy, `debug=True`), then one with the HF engine
plays the same tasks. Prints one JSON line: per episode whether its recorded token ids are exactly
the prompts the engine got, the two engines' actions, and where they part, the HF model's log-prob
margin between the two tokens at the first differing position (a near-tie is float rounding)."""

import json
import sys


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(model: str, n_tasks: str) -> None:
    import torch

    import envs  # noqa: F401  (registers TextShop)
    from rl_agents.engines import SamplingParams
    from rl_agents.engines.hf import HFEngine
    from rl_agents.engines.vllm import VLLMEngine
    from rl_agents.models import load_model
    from rl_agents.rollout import RolloutConfig, RolloutWorker, make_tasks
    from rl_agents.tokenization import ChatSegmenter, encode_trajectory

    tasks = make_tasks([f"train-{i:05d}" for i in range(int(n_tasks))])
    cfg = RolloutConfig("rl_agents/TextShop-v0", num_envs=len(tasks), debug=True, env_kwargs={"max_turns": 4},
                        sampling=SamplingParams(temperature=0.0, max_new_tokens=48))
    vllm = VLLMEngine(model, dtype="float32", device="cpu", enforce_eager=True, kv_cache_memory_bytes=512 * 2**20)
    runs = {"vllm": {t.task_id: t for t in RolloutWorker(vllm, cfg).rollout(tasks)}}
    vllm.close()
    runs["hf"] = {t.task_id: t for t in RolloutWorker(HFEngine(model), cfg).rollout(tasks)}
    seg = ChatSegmenter(HFEngine(model).tokenizer)
    lm = load_model(model).eval()
    out = []
    for task in tasks:
        v, h = runs["vllm"][task.task_id], runs["hf"][task.task_id]
        agent_idx = [i for i, turn in enumerate(v.turns) if turn.is_agent]
        prompts = [[x for turn in v.turns[:i] for x in turn.token_ids] for i in agent_idx]
        row = {"task": task.task_id, "steps": v.num_steps, "prompts_exact": prompts == v.metadata["debug_prompts"],
               "encoded_exact": encode_trajectory(v, seg).input_ids == [x for turn in v.turns[:agent_idx[-1] + 1]
                                                                        for x in turn.token_ids],
               "vllm_actions": [t.text for t in v.agent_turns], "hf_actions": [t.text for t in h.agent_turns]}
        for k, (tv, th) in enumerate(zip(v.agent_turns, h.agent_turns)):
            if tv.token_ids != th.token_ids:  # same context up to here (every earlier turn agreed)
                j = first_difference(tv.token_ids, th.token_ids)
                if j < min(len(tv.token_ids), len(th.token_ids)):
                    context = prompts[k] + tv.token_ids[:j]
                    with torch.no_grad():
                        logp = torch.log_softmax(lm(torch.tensor([context])).logits[0, -1].float(), -1)
                    row["first_split"] = {"turn": k, "token": j,
                                          "hf_margin": (logp[th.token_ids[j]] - logp[tv.token_ids[j]]).item()}
                break
        out.append(row)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main(*sys.argv[1:3])
