"""StepAgent's step prefixes: what sharing them saves, old schedule vs ours side by side in one run.

    python benchmarks/stepagent_prefixes.py --threads 1          # SmolLM2-135M, 24 TextShop experts, 2 samples
    python benchmarks/stepagent_prefixes.py --model tiny-llama --tasks 3   # seconds: every code path
    python benchmarks/stepagent_prefixes.py --part training --tasks 12 --threads 2

StepAgent cuts each expert trajectory before every action (prefix k + 1 = prefix k + the expert's
action and the next observation) and samples `--samples` agent actions per prefix; both variants
then work on (prefix, action) sequences.

1. inspection (generation): the prefixes x samples, greedy, by one HF engine (a fresh one per
   schedule), as ONE call of everything (the schedule before waves) and through
   `algorithms.stepagent.inspect_steps` (waves by step: prefix k + 1 prefilled past prefix k).
2. discriminator features (StepAgent-inverse, no grad): the expert action and the samples of
   every prefix as whole sequences in length-sorted batches (`action_features`, the old way) and
   through `algorithms.step_gail.sequence_features` (one forward per prefix, its KV reused for
   every action of that prefix).

3. training (Step-DPO pairs and StepAgent-inverse PPO samples, forward + backward of one epoch's
   micro-batches, LoRA, bf16): padded rows in length-sorted micro-batches (before) vs
   `train.share_prefixes` (`rl_agents.packing`: each micro-batch's shared prefixes run once, step
   data batched by trajectory so that rows sharing a prefix share micro-batches). Both train on
   every example once (whole batches), so the epoch's mean loss must agree.

Reports tokens fed to the model (exact, noise-free), wall and CPU time, and that both schedules
agree (same actions; features equal to 1e-4). The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _speedups(before: dict, after: dict, tokens: str) -> dict:
    return {"token_ratio": before[tokens] / after[tokens], "wall_speedup": before["wall_s"] / after["wall_s"],
            "cpu_speedup": before["cpu_s"] / after["cpu_s"]}


def _versus(label: str, before: dict, after: dict, tokens: str, r: dict) -> str:
    """'<label> N tokens .. s wall .. s CPU; shared prefixes M tokens .. s .. s -> ratios' of a part."""
    return (f"{label} {before[tokens]} tokens {before['wall_s']:.1f} s wall {before['cpu_s']:.1f} s CPU; shared prefixes "
            f"{after[tokens]} tokens {after['wall_s']:.1f} s {after['cpu_s']:.1f} s -> {r['token_ratio']:.2f}x fewer "
            f"tokens, {r['wall_speedup']:.2f}x wall, {r['cpu_speedup']:.2f}x CPU")


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def bench_inspection(args, experts, model) -> dict:
    import ray

    from rl_agents.rollout_group import RolloutSection
    from algorithms.data import step_prefixes
    from algorithms.stepagent import inspect_steps
    from rl_agents.engines.base import SamplingParams
    from rl_agents.engines.hf import HFEngine
    from rl_agents.ray_utils import init_ray
    from rl_agents.tokenization import ChatSegmenter, tokenize_rollout_turns

    n, out, actions = args.samples, {}, {}
    sampling = dict(temperature=0.0, max_new_tokens=args.max_new_tokens)

    one = HFEngine(model, prefix_cache_mb=None)
    seg = ChatSegmenter(one.tokenizer)
    prompts = [[i for ids in tokenize_rollout_turns(sp.prefix.turns, seg) for i in ids]
               for e in experts for sp in step_prefixes(e) for _ in range(n)]
    params = SamplingParams(stop_token_ids=tuple(seg.stop_token_ids), **sampling)
    actions["one_call"], wall, cpu = _timed(lambda: [g.token_ids for g in one.generate(prompts, params)])
    out["one_call"] = {"prompt_tokens": one.prompt_tokens,
                       "prefilled_tokens": one.prompt_tokens - one.prefix_cache.reused_tokens,
                       "wall_s": wall, "cpu_s": cpu}
    del one

    waves = HFEngine(model, prefix_cache_mb=None)
    waves.reserve_prefix_cache(len(experts) * n, 2048)
    worker = SimpleNamespace(generate=SimpleNamespace(remote=lambda p, s: ray.put(waves.generate(p, s))))
    algo = SimpleNamespace(segmenter=lambda: seg, iteration=0, group=lambda: SimpleNamespace(workers=[worker]),
                           experts=lambda: {t.task_id: t for t in experts},
                           config=SimpleNamespace(seed=0, rollout=RolloutSection(**sampling)))
    started = init_ray(num_cpus=1, log_to_driver=False)
    try:
        actions["waves"], wall, cpu = _timed(lambda: [p.action_ids for p in inspect_steps(algo, n, None)])
    finally:
        if started:
            ray.shutdown()
    out["waves"] = {"prompt_tokens": waves.prompt_tokens,
                    "prefilled_tokens": waves.prompt_tokens - waves.prefix_cache.reused_tokens,
                    "wall_s": wall, "cpu_s": cpu}
    same = sum(a == b for a, b in zip(actions["one_call"], actions["waves"]))
    o, w = out["one_call"], out["waves"]
    out.update(prompts=len(prompts), identical_actions=f"{same}/{len(prompts)}",
               prefill_ratio=o["prefilled_tokens"] / max(1, w["prefilled_tokens"]),
               wall_speedup=o["wall_s"] / w["wall_s"], cpu_speedup=o["cpu_s"] / w["cpu_s"])
    return out


def bench_features(args, experts, model) -> dict:
    import torch

    from algorithms.data import step_prefixes
    from algorithms.step_gail import action_features, sequence_features
    from rl_agents.collate import collate_sequences
    from rl_agents.models import load_model, load_tokenizer
    from rl_agents.tokenization import ChatSegmenter, encode_step

    seg = ChatSegmenter(load_tokenizer(model))
    backbone = load_model(model).eval()
    seqs = []
    for e in experts:  # per prefix: the expert's action, then `samples` other actions of the same trajectory
        steps = step_prefixes(e)
        for sp in steps:
            seqs.append(encode_step(e, sp.step, sp.expert_turn.text, seg))
            for j in range(args.samples):
                other = steps[(sp.step + 1 + j) % len(steps)].expert_turn.text
                seqs.append(encode_step(e, sp.step, other, seg))
    fed = []
    hook = backbone.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].numel()),
                                                   with_kwargs=True)

    def whole():  # length-sorted batches of whole sequences
        order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
        feats = [None] * len(seqs)
        for s in range(0, len(order), args.batch_size):
            idx = order[s:s + args.batch_size]
            f = action_features(backbone, collate_sequences([seqs[i] for i in idx], 0))
            for k, i in enumerate(idx):
                feats[i] = f[k]
        return torch.stack(feats)

    out = {}
    for name, fn in (("whole_sequences", whole),
                     ("shared_prefixes", lambda: sequence_features(backbone, seqs, batch_size=args.batch_size))):
        fed.clear()
        out[name + "_feats"], wall, cpu = _timed(fn)
        out[name] = {"tokens_fed": sum(fed), "forwards": len(fed), "wall_s": wall, "cpu_s": cpu}
    hook.remove()
    gap = (out.pop("whole_sequences_feats") - out.pop("shared_prefixes_feats")).abs().max().item()
    w, s = out["whole_sequences"], out["shared_prefixes"]
    out.update(sequences=len(seqs), max_abs_diff=gap, **_speedups(w, s, "tokens_fed"))
    return out


def _step_examples(args, experts, seg):
    """Per prefix: the expert's action and `samples` other actions of the same trajectory (a
    deterministic stand-in for the agent's samples; no generation)."""
    from algorithms.data import step_prefixes
    from rl_agents.tokenization import encode_step

    out = []
    for e in experts:
        steps = step_prefixes(e)
        for sp in steps:
            others = [steps[(sp.step + 1 + j) % len(steps)].expert_turn.text for j in range(args.samples)]
            out.append((encode_step(e, sp.step, sp.expert_turn.text, seg), [encode_step(e, sp.step, o, seg) for o in others]))
    return out


def bench_training(args, experts, model) -> dict:
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from algorithms.losses import PPOObjective
    from algorithms.losses.dpo import StepDPOObjective
    from rl_agents.batches import PPOExample
    from rl_agents.collate import collate_pairs, collate_ppo
    from rl_agents.models import load_model, load_tokenizer
    from rl_agents.tokenization import ChatSegmenter
    from rl_agents.train import OptimConfig, TrainConfig
    from rl_agents.train.forward import Forward
    from rl_agents.train.loop import batch_keys, epoch_plan, example_length

    seg = ChatSegmenter(load_tokenizer(model))
    steps = _step_examples(args, experts, seg)
    rng = random.Random(0)
    data = {"step_dpo": [(c, r) for c, rs in steps for r in rs],
            "ppo": [PPOExample(r, advantage=rng.uniform(-1, 1), reward=0.0, old_logps=[-1.0 * m for m in r.action_mask])
                    for _, rs in steps for r in rs]}
    policy = get_peft_model(load_model(model, dtype=torch.bfloat16), LoraConfig(
        r=32, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM")).train()
    out = {}
    for name, examples in data.items():
        examples = examples[:len(examples) // 16 * 16]  # whole batches: both plans train on every example
        objective = StepDPOObjective(beta=0.5) if name == "step_dpo" else PPOObjective()
        lengths = [example_length(e) for e in examples]

        def epoch(share: bool):
            cfg = TrainConfig(optim=OptimConfig(batch_size=16, micro_batch_size=args.micro_batch_size),
                              num_workers=1, share_prefixes=share)
            plan = epoch_plan(lengths, cfg, 0, batch_keys(examples, cfg))
            fwd = Forward(policy, share_prefixes=share)
            total, units_all = 0.0, 0
            for step in tqdm(plan, desc=f"{name} {'shared' if share else 'padded'}", dynamic_ncols=True):
                for micro in step:
                    ex = [examples[i] for i in micro]
                    batch = (collate_ppo(ex, 0) if name == "ppo" else
                             collate_pairs([c for c, _ in ex], [r for _, r in ex], 0))
                    loss, _ = objective(fwd, batch)
                    loss.backward()
                    units = sum(objective.units(e) for e in ex)
                    total, units_all = total + loss.item() * units, units_all + units
                policy.zero_grad(set_to_none=True)
            return total / units_all, fwd.tokens

        res = {}
        for label, share in (("padded", False), ("shared_prefixes", True)):
            (loss, tokens), wall, cpu = _timed(lambda share=share: epoch(share))
            res[label] = {"epoch_loss": loss, "forward_tokens": tokens, "wall_s": wall, "cpu_s": cpu}
        p, s = res["padded"], res["shared_prefixes"]
        out[name] = {**res, "examples": len(examples), "loss_diff": abs(p["epoch_loss"] - s["epoch_loss"]),
                     **_speedups(p, s, "forward_tokens")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "inspection", "features", "training"], default="all")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--env", default="rl_agents/TextShop-v0")
    p.add_argument("--tasks", type=int, default=24, help="expert trajectories (first N train tasks)")
    p.add_argument("--samples", type=int, default=2, help="agent actions per prefix")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="sequences (whole) / actions (shared) per forward")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=2, help="training part: examples per micro-batch "
                   "(the learning benchmark's 2), global batch 16")
    args = p.parse_args()
    import torch

    import envs  # noqa: F401
    from rl_agents.experts import iter_expert_trajectories
    from rl_agents.models import resolve_model

    torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    experts = list(iter_expert_trajectories(args.env, "train", limit=args.tasks))
    steps = sum(1 for e in experts for t in e.turns if t.role == "assistant")
    print(f"{len(experts)} {args.env} experts, {steps} step prefixes x {args.samples} samples, {args.model} "
          f"float32, {args.threads} threads", flush=True)
    result: dict = {"benchmark": "stepagent_prefixes", "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(),
                    "tasks": len(experts), "step_prefixes": steps, "samples": args.samples, "model": args.model}
    if args.part in ("all", "inspection"):
        result["inspection"] = c = bench_inspection(args, experts, model)
        print(f"[inspection] one call: prefilled {c['one_call']['prefilled_tokens']} of {c['one_call']['prompt_tokens']} "
              f"prompt tokens, {c['one_call']['wall_s']:.1f} s wall, {c['one_call']['cpu_s']:.1f} s CPU; waves: "
              f"{c['waves']['prefilled_tokens']}, {c['waves']['wall_s']:.1f} s, {c['waves']['cpu_s']:.1f} s -> "
              f"{c['prefill_ratio']:.2f}x fewer prefilled tokens, {c['wall_speedup']:.2f}x wall, "
              f"{c['cpu_speedup']:.2f}x CPU; identical actions {c['identical_actions']}", flush=True)
    if args.part in ("all", "features"):
        result["features"] = f = bench_features(args, experts, model)
        print(f"[features] {f['sequences']} sequences: "
              + _versus("whole", f["whole_sequences"], f["shared_prefixes"], "tokens_fed", f)
              + f"; max |diff| {f['max_abs_diff']:.1e}", flush=True)
    if args.part in ("all", "training"):
        result["training"] = t = bench_training(args, experts, model)
        for name, r in t.items():
            print(f"[training {name}] {r['examples']} examples, one epoch fwd+bwd: "
                  + _versus("padded", r["padded"], r["shared_prefixes"], "forward_tokens", r)
                  + f"; epoch loss |diff| {r['loss_diff']:.1e}", flush=True)
    result["load_avg_end"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
