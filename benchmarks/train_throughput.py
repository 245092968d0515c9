"""DPO training throughput: rl_agents (Ray Train worker + DeepSpeed) vs TRL's `DPOTrainer`.

Same model (SmolLM2-135M-Instruct from `smollm2_path()`, or `--model tiny`), same multi-turn pairs
of different lengths (text trajectories rendered with the model's chat template: the prompt is
the instruction, chosen/rejected are the rest of each trajectory), same batch (`--batch` pairs per
optimizer step, one forward pass of 2·batch rows, no accumulation), same bf16 mixed precision,
same CPU (our single Ray worker gets both cores; TRL runs in this process with 2 torch threads).
Runs alternate (ours, TRL, ours, TRL, ...) so background load hits both alike.

Measured per run: real (non-padding) tokens of the optimizer steps divided by the time spent in
them; for us, plus the one-off reference pass (`perf/reference_s`), since TRL (default config)
computes its reference inside each step instead. Process start, model loading and Ray start-up are
excluded on both sides. Also reported: real tokens / computed tokens (padding waste) on both sides.

    python benchmarks/train_throughput.py [--model smollm2|tiny] [--pairs 16] [--batch 4] [--rounds 2]

The last line printed is a JSON object with the ratio `speedup` = ours / TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("go to the kitchen open fridge take apple look inventory drawer red blue table shelf put examine cabinet "
         "countertop heat cool clean mug knife in on with from microwave sink basin is closed you see nothing "
         "happens arrive at a an and then next find").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_chats(n: int, seed: int) -> list[tuple[list[dict], list[dict], list[dict]]]:
    """(prompt, chosen, rejected) chat messages; trajectories of 2-6 turns, ~150-600 tokens."""
    rng = random.Random(seed)

    def rest(steps: int) -> list[dict]:
        msgs = []
        for k in range(steps):
            if k:
                msgs.append({"role": "user", "content": f"Observation: {_text(rng, rng.randint(10, 45))}"})
            msgs.append({"role": "assistant", "content": f"Thought: {_text(rng, rng.randint(6, 25))}\n"
                                                         f"Action: {_text(rng, rng.randint(2, 6))}"})
        return msgs

    chats = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Task {i}: {_text(rng, rng.randint(20, 50))}"}]
        chats.append((prompt, rest(rng.randint(2, 6)), rest(rng.randint(2, 6))))
    return chats


def encode_pairs(chats, tokenizer):
    from rl_agents.tokenization import ChatSegmenter, encode_trajectory
    from rl_agents.trajectory import Trajectory, Turn

    seg = ChatSegmenter(tokenizer)

    def enc(prompt, rest):
        turns = [Turn(m["role"], m["content"]) for m in prompt + rest]
        return encode_trajectory(Trajectory(task_id="t", env_id="bench", turns=turns), seg)
    return [(enc(p, c), enc(p, r)) for p, c, r in chats]


# ---- ours ----------------------------------------------------------------------------------------
def run_ours(pairs, model_dir: str, batch: int, storage: str, name: str) -> dict:
    from algorithms.losses import DPOObjective
    from rl_agents.train import DeepSpeedConfig, ModelConfig, OptimConfig, TrainConfig, train

    cfg = TrainConfig(model=ModelConfig(path=model_dir), deepspeed=DeepSpeedConfig(enabled=True, zero_stage=0, bf16=True),
                      optim=OptimConfig(lr=1e-6, warmup_ratio=0.0, epochs=1, batch_size=batch, micro_batch_size=batch),
                      num_workers=1, cpus_per_worker=2, storage_path=storage, name=name, max_failures=0)
    result = train(DPOObjective(), pairs, cfg)
    rows = result.history
    seconds = sum(r["perf/step_s"] for r in rows) + rows[0]["perf/reference_s"]
    cpu_seconds = sum(r["perf/step_cpu_s"] for r in rows) + rows[0]["perf/reference_cpu_s"]
    real = sum(r["perf/real_tokens"] for r in rows)
    computed = sum(r["perf/real_tokens"] / r["perf/real_token_frac"] for r in rows)
    shutil.rmtree(result.run_dir, ignore_errors=True)
    return {"side": "ours", "steps": len(rows), "seconds": seconds, "cpu_seconds": cpu_seconds, "real_tokens": real,
            "tokens_per_s": real / seconds, "tokens_per_cpu_s": real / cpu_seconds, "real_token_frac": real / computed,
            "reference_s": rows[0]["perf/reference_s"], "loss_first": rows[0]["loss/dpo"]}


# ---- TRL -----------------------------------------------------------------------------------------
def run_trl(chats, model_dir: str, batch: int, out_dir: str, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in chats])
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     learning_rate=1e-6, lr_scheduler_type="cosine", warmup_steps=0, num_train_epochs=1, beta=0.1,
                     bf16=True, use_cpu=True, logging_steps=1, report_to="none", save_strategy="no", seed=seed,
                     max_length=None, dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False)
    stats = {"real": 0, "computed": 0, "step_s": [], "step_cpu_s": [], "losses": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            stats["t0"], stats["c0"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            stats["step_s"].append(time.perf_counter() - stats["t0"])
            stats["step_cpu_s"].append(time.process_time() - stats["c0"])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                stats["losses"].append(logs["loss"])

    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Timer()])
    collate = trainer.data_collator

    def counting_collator(examples):
        out = collate(examples)
        stats["real"] += int(out["attention_mask"].sum())
        stats["computed"] += out["attention_mask"].numel()
        return out
    trainer.data_collator = counting_collator
    trainer.train()
    seconds, cpu_seconds = sum(stats["step_s"]), sum(stats["step_cpu_s"])
    return {"side": "trl", "steps": len(stats["step_s"]), "seconds": seconds, "cpu_seconds": cpu_seconds,
            "real_tokens": stats["real"], "tokens_per_s": stats["real"] / seconds,
            "tokens_per_cpu_s": stats["real"] / cpu_seconds, "real_token_frac": stats["real"] / stats["computed"],
            "loss_first": stats["losses"][0] if stats["losses"] else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import ray

    from rl_agents.models import load_tokenizer, smollm2_path, tiny_llama_dir

    model_dir = str(smollm2_path() if args.model == "smollm2" else tiny_llama_dir())
    chats = make_chats(args.pairs, args.seed)
    pairs = encode_pairs(chats, load_tokenizer(model_dir))
    tmp = tempfile.mkdtemp(prefix="train_throughput_")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        for k in range(args.rounds):
            for side in ("ours", "trl"):
                if side == "ours":
                    r = run_ours(pairs, model_dir, args.batch, tmp, f"ours-{k}")
                else:
                    r = run_trl(chats, model_dir, args.batch, os.path.join(tmp, f"trl-{k}"), args.seed)
                r["round"] = k
                results.append(r)
                print(json.dumps(r), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    def side(name, key):
        return [r[key] for r in results if r["side"] == name]

    def ratio(key, reduce):
        return round(reduce(side("ours", key)) / reduce(side("trl", key)), 3)

    # The machine is shared: wall times swing with other people's load. `speedup` is the median of the
    # per-round ratios (each round's two runs are back to back); best-of-N and CPU time are less
    # sensitive to load and reported next to it.
    per_round = [o / t for o, t in zip(side("ours", "tokens_per_s"), side("trl", "tokens_per_s"))]
    print(json.dumps({"benchmark": "dpo_train_throughput", "model": args.model, "pairs": args.pairs,
                      "batch": args.batch, "rounds": args.rounds,
                      "ours_tokens_per_s": round(statistics.median(side("ours", "tokens_per_s")), 1),
                      "trl_tokens_per_s": round(statistics.median(side("trl", "tokens_per_s")), 1),
                      "speedup": round(statistics.median(per_round), 3),
                      "speedup_per_round": [round(x, 3) for x in per_round],
                      "speedup_best_of_n": ratio("tokens_per_s", max),
                      "speedup_cpu_time": ratio("tokens_per_cpu_s", statistics.median),
                      "ours_real_token_frac": round(statistics.median(side("ours", "real_token_frac")), 3),
                      "trl_real_token_frac": round(statistics.median(side("trl", "real_token_frac")), 3),
                      "ours_real_tokens": side("ours", "real_tokens")[0], "trl_real_tokens": side("trl", "real_tokens")[0]}))


if __name__ == "__main__":
    main()
