"""vLLM vs HF as the rollout engine on CPU, on the same TextShop episodes (issue #18), and vLLM's
start-up: eager vs torch.compile, with a cold and a warm compile cache.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_engines.py --episodes 16 --max-turns 4 --threads 1
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_engines.py --part startup --threads 2

`--part startup`: each start in a fresh process (as each rollout actor and each run starts one):
eager; compiled with an empty compile cache (`VLLM_CACHE_ROOT` a new directory); compiled again
with that cache (a second actor, or the next run, on the same node); then each engine's greedy
tokens/s on the same 16 prompts x 48 new tokens, so that the start-up can be weighed against
the speed it buys. Final JSON line.

Runs in `.venv-vllm` (both engines are there). One `RolloutWorker` per engine plays the same greedy
episodes (SmolLM2-135M-Instruct, fp32, all episodes in one batch per turn), engines alternating
`--repeats` times so that the box's noise hits both; start-up is timed apart. Prints each run and a
final JSON line: episodes/s and generated tokens/s per engine (median), the vLLM / HF ratio, and how
many episodes played identical actions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch / OMP threads of both engines")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True, help="vLLM enforce_eager")
    p.add_argument("--part", choices=["engines", "startup"], default="engines")
    p.add_argument("--child", choices=["eager", "compile"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part == "startup":
        return startup(args)

    import os

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if args.threads == 1 else f"0-{args.threads - 1}")
    import envs  # noqa: F401
    from rl_agents.engines import SamplingParams
    from rl_agents.engines.hf import HFEngine
    from rl_agents.engines.vllm import VLLMEngine
    from rl_agents.models import smollm2_path
    from rl_agents.rollout import RolloutConfig, RolloutWorker, make_tasks

    model = str(smollm2_path())
    tasks = make_tasks([f"train-{i:05d}" for i in range(args.episodes)])
    cfg = RolloutConfig("rl_agents/TextShop-v0", num_envs=args.episodes, env_kwargs={"max_turns": args.max_turns},
                        sampling=SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens))
    engines, start = {}, {}
    for name, make in (("hf", lambda: HFEngine(model, num_threads=args.threads)),
                       ("vllm", lambda: VLLMEngine(model, dtype="float32", device="cpu", enforce_eager=args.eager,
                                                   kv_cache_memory_bytes=1024 * 2**20))):
        t0 = time.perf_counter()
        engines[name] = make()
        start[name] = time.perf_counter() - t0
        print(f"{name}: start-up {start[name]:.1f} s", flush=True)
    runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
    actions: dict[str, list] = {}
    for r in range(args.repeats):
        for name in (("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")):
            t0 = time.perf_counter()
            trajs = sorted(RolloutWorker(engines[name], cfg).rollout(tasks), key=lambda t: t.task_id)
            wall = time.perf_counter() - t0
            tokens = sum(t.metadata["generated_tokens"] for t in trajs)
            runs[name].append({"wall_s": wall, "episodes_per_s": len(trajs) / wall, "tokens_per_s": tokens / wall,
                               "tokens": tokens})
            actions[name] = [[turn.text for turn in t.agent_turns] for t in trajs]
            print(f"{name} run {r}: {wall:.1f} s, {len(trajs) / wall:.3f} episodes/s, {tokens / wall:.1f} tok/s",
                  flush=True)
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("episodes_per_s", "tokens_per_s")}
           for n, v in runs.items()}
    out = {"episodes": args.episodes, "max_turns": args.max_turns, "threads": args.threads, "eager": args.eager,
           "start_up_s": start, "median": med, "runs": runs,
           "ratio_vllm_over_hf": {k: med["vllm"][k] / med["hf"][k] for k in ("episodes_per_s", "tokens_per_s")},
           "same_actions": sum(a == b for a, b in zip(actions["hf"], actions["vllm"]))}
    print(json.dumps(out), flush=True)


def _child(args) -> None:
    """One engine start in this process: start-up seconds, then greedy tokens/s (JSON line)."""
    import os

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if args.threads == 1 else f"0-{args.threads - 1}")
    from rl_agents.engines import SamplingParams
    from rl_agents.engines.vllm import VLLMEngine
    from rl_agents.models import load_tokenizer, smollm2_path

    model = str(smollm2_path())
    t0 = time.perf_counter()
    engine = VLLMEngine(model, dtype="float32", device="cpu", enforce_eager=args.child == "eager",
                        kv_cache_memory_bytes=1024 * 2**20)
    start_s = time.perf_counter() - t0
    tok = load_tokenizer(model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Describe item number {i} of a shop."}],
                                       add_generation_prompt=True, tokenize=True) for i in range(16)]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    params = SamplingParams(temperature=0.0, max_new_tokens=48)
    engine.generate(prompts[:2], params)  # first call: warm-up, not timed
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        gens = engine.generate(prompts, params)
        rates.append(sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t0))
    print("CHILD " + json.dumps({"start_up_s": start_s, "tokens_per_s": statistics.median(rates)}), flush=True)


def startup(args) -> None:
    import os
    import subprocess
    import sys
    import tempfile

    if args.child:
        return _child(args)
    cache = tempfile.mkdtemp(prefix="vllm-cache-")
    out = {"threads": args.threads, "runs": {}}
    for label, mode in (("eager", "eager"), ("compile_cold_cache", "compile"), ("compile_warm_cache", "compile")):
        env = {**os.environ, "VLLM_CACHE_ROOT": cache}
        r = subprocess.run([sys.executable, __file__, "--part", "startup", "--child", mode, "--threads",
                            str(args.threads), "--repeats", str(args.repeats)], env=env, capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("CHILD ")]
        if r.returncode or not line:
            raise SystemExit(f"{label} failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        out["runs"][label] = json.loads(line[0][6:])
        print(f"{label}: start-up {out['runs'][label]['start_up_s']:.1f} s, "
              f"{out['runs'][label]['tokens_per_s']:.1f} tok/s", flush=True)
    runs = out["runs"]
    out["compile_speedup"] = runs["compile_warm_cache"]["tokens_per_s"] / runs["eager"]["tokens_per_s"]
    out["warm_cache_start_saving_s"] = runs["compile_cold_cache"]["start_up_s"] - runs["compile_warm_cache"]["start_up_s"]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main()
