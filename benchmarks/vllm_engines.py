"""vLLM vs HF as the rollout engine on CPU, on the same TextShop or ALFWorld episodes (issue #18), and
vLLM's start-up: eager vs torch.compile, with a cold and a warm compile cache.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_engines.py --episodes 16 --max-turns 4 --threads 1
    .venv-vllm/bin/python benchmarks/vllm_engines.py --env alfworld --dtype bfloat16 --threads 2
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_engines.py --part startup --threads 2
    .venv-vllm/bin/python benchmarks/vllm_engines.py --part group

`--part group`: the demo's rollout setting end to end, the engine the only difference: two Ray
rollout actors of 1 thread each (`rollout.num_workers=2, threads_per_worker=1`, the engines' own
CPU defaults, vLLM `enforce_eager` unless `--no-eager`), 32 episodes batched per actor, greedy
evaluation of SmolLM2-135M-Instruct on 20 test_seen + 20 test_unseen TextShop tasks of at most 6
turns (`rl_agents.evaluation.evaluate`, as `make demo` calls it). Per engine and repeat: the group's
start, an evaluation, a weight update (the same checkpoint: HF loads it, vLLM on CPU rebuilds
its engine) and a second evaluation. Engines alternate first place across repeats; a group is
shut down before the next one starts. Final JSON line with the ratios.

`--part startup`: each start in a fresh process (as each rollout actor and each run starts one):
eager; compiled with an empty compile cache (`VLLM_CACHE_ROOT` a new directory); compiled again
with that cache (a second actor, or the next run, on the same node); then each engine's greedy
tokens/s on the same 16 prompts x 48 new tokens, so that the start-up can be weighed against
the speed it buys. Final JSON line.

Runs in `.venv-vllm` (both engines are there). One `RolloutWorker` per engine plays the same greedy
episodes (SmolLM2-135M-Instruct or `--model`; `--dtype` fp32 or bf16 for both; TextShop, or
ALFWorld's first train games of each type in turn with `--env alfworld`; all episodes in one batch
per turn), engines alternating
`--repeats` times so that the box's noise hits both; start-up is timed apart. Prints each run and a
final JSON line: episodes/s and generated tokens/s per engine (median), the vLLM / HF ratio, and how
many episodes played identical actions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch / OMP threads of both engines")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True, help="vLLM enforce_eager")
    p.add_argument("--part", choices=["engines", "startup", "group"], default="engines")
    p.add_argument("--eval-tasks", type=int, default=20, help="--part group: tasks per test split")
    p.add_argument("--model", default=None, help="--part group and engines: the policy (default SmolLM2-135M-Instruct; an "
                                                   "SFT agent plays realistic episodes, the base model 6 turns of noise)")
    p.add_argument("--env", choices=["textshop", "alfworld"], default="textshop",
                   help="engines part: the episodes' env (ALFWorld: the first train games of each type in turn)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="engines part: both engines")
    p.add_argument("--alfworld-data", default=os.environ.get("ALFWORLD_DATA") or str(REPO.parent / "shared/data/alfworld"))
    p.add_argument("--child", choices=["eager", "compile"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part == "startup":
        return startup(args)
    if args.part == "group":
        return group(args)

    import gymnasium as gym
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if args.threads == 1 else f"0-{args.threads - 1}")
    import envs  # noqa: F401
    from rl_agents.engines import SamplingParams
    from rl_agents.engines.hf import HFEngine
    from rl_agents.engines.vllm import VLLMEngine
    from rl_agents.models import smollm2_path
    from rl_agents.rollout import RolloutConfig, RolloutWorker, make_tasks

    model = args.model or str(smollm2_path())
    env_id = {"textshop": "rl_agents/TextShop-v0", "alfworld": "rl_agents/ALFWorld-v0"}[args.env]
    env_kwargs = {"max_turns": args.max_turns}
    if args.env == "alfworld":
        env_kwargs |= {"data_dir": args.alfworld_data, "task_order": "interleaved"}
    probe = gym.make(env_id, split="train", **env_kwargs)
    tasks = make_tasks(probe.unwrapped.list_tasks("train")[:args.episodes])
    probe.close()
    cfg = RolloutConfig(env_id, num_envs=args.episodes, env_kwargs=env_kwargs,
                        sampling=SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens))
    engines, start = {}, {}
    for name, make in (("hf", lambda: HFEngine(model, dtype=args.dtype, num_threads=args.threads)),
                       ("vllm", lambda: VLLMEngine(model, dtype=args.dtype, device="cpu", enforce_eager=args.eager,
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
    out = {"env": env_id, "dtype": args.dtype, "model": model, "episodes": args.episodes,
           "max_turns": args.max_turns, "threads": args.threads, "eager": args.eager,
           "start_up_s": start, "median": med, "runs": runs,
           "ratio_vllm_over_hf": {k: med["vllm"][k] / med["hf"][k] for k in ("episodes_per_s", "tokens_per_s")},
           "same_actions": sum(a == b for a, b in zip(actions["hf"], actions["vllm"]))}
    print(json.dumps(out), flush=True)


def _child(args) -> None:
    """One engine start in this process: start-up seconds, then greedy tokens/s (JSON line)."""
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
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]  # a BatchEncoding in 5.x
    params = SamplingParams(temperature=0.0, max_new_tokens=48)
    engine.generate(prompts[:2], params)  # first call: warm-up, not timed
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        gens = engine.generate(prompts, params)
        rates.append(sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t0))
    print("CHILD " + json.dumps({"start_up_s": start_s, "tokens_per_s": statistics.median(rates)}), flush=True)


def startup(args) -> None:
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


def _vllm_processes() -> int:
    """vLLM engine-core and worker processes alive on this machine (vLLM titles them `VLLM::...`)."""
    import subprocess

    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return sum(line.startswith("VLLM::") for line in ps)


def group(args) -> None:
    from rl_agents.ray_utils import init_ray

    init_ray(num_cpus=2)
    import envs  # noqa: F401
    from rl_agents.evaluation import evaluate
    from rl_agents.models import smollm2_path
    from rl_agents.rollout_group import RolloutSection

    model, env_id = args.model or str(smollm2_path()), "rl_agents/TextShop-v0"
    runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
    outcomes: dict[str, dict] = {}
    for r in range(args.repeats):
        for name in (("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")):
            section = RolloutSection(engine=name, num_workers=2, num_cpus_per_worker=0.5, threads_per_worker=1,
                                     envs_per_worker=32, max_new_tokens=64,
                                     engine_kwargs={"enforce_eager": args.eager} if name == "vllm" else {})
            t0 = time.perf_counter()
            g = section.make_group(model, env_id, env_kwargs={"max_turns": 6}, split="test_seen", progress=False)
            run = {"start_s": time.perf_counter() - t0, "eval_s": []}
            try:
                for k in range(2):
                    if k:
                        t0 = time.perf_counter()
                        g.update_weights(model)
                        run["update_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    rep = evaluate(model, env_id, ["test_seen", "test_unseen"], n=args.eval_tasks, group=g,
                                   max_new_tokens=64, seed=0, verbose=False, progress=False)
                    run["eval_s"].append(time.perf_counter() - t0)
                    outcomes.setdefault(name, {s: m["per_task"] for s, m in rep["splits"].items()})
                    run["avg_reward"] = {s: m["avg_reward"] for s, m in rep["splits"].items()}
            finally:
                g.shutdown()
            time.sleep(2)
            run["vllm_processes_left"] = _vllm_processes()
            episodes = 2 * args.eval_tasks
            run["episodes_per_s"] = episodes / statistics.median(run["eval_s"])
            runs[name].append(run)
            print(f"{name} repeat {r}: start {run['start_s']:.1f} s, evaluations "
                  f"{', '.join(f'{x:.1f}' for x in run['eval_s'])} s ({run['episodes_per_s']:.3f} episodes/s), "
                  f"update {run['update_s']:.1f} s, avg reward {run['avg_reward']}, "
                  f"vLLM processes left after shutdown {run['vllm_processes_left']}", flush=True)
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("start_s", "update_s", "episodes_per_s")}
           for n, v in runs.items()}
    same = {s: sum(outcomes["hf"][s][t] == outcomes["vllm"][s].get(t) for t in outcomes["hf"][s])
            for s in outcomes["hf"]}
    # The demo: 2 group starts (exploration, evaluation), 3 weight updates, 40 explored + 4 x 40 evaluated episodes
    # (base: 10); exploration is sampled, so this is an estimate of its rollout minutes only.
    demo = {n: (2 * m["start_s"] + 3 * m["update_s"] + 170 / m["episodes_per_s"]) / 60 for n, m in med.items()}
    out = {"part": "group", "eval_tasks_per_split": args.eval_tasks, "eager": args.eager, "median": med, "runs": runs,
           "ratio_vllm_over_hf_episodes_per_s": med["vllm"]["episodes_per_s"] / med["hf"]["episodes_per_s"],
           "same_outcome_tasks": same, "demo_rollout_minutes_estimate": demo}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main()
