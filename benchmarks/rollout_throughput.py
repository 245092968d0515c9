"""Rollout throughput: what batching buys one worker, and what a second worker buys.

    python benchmarks/rollout_throughput.py                 # both parts, ~10 min on 2 CPU cores
    python benchmarks/rollout_throughput.py --part batching --episodes 16 --max-turns 4

1. batching (model-bound): SmolLM2-135M-Instruct (HF engine, CPU) on the built-in TextShop env.
   One `RolloutWorker` runs the same `--episodes` tasks (greedy) with K = episodes env slots (one
   batched engine call per turn) and with K = 1 (one episode at a time). Reports episodes/s,
   generated tokens/s, the speed-up (goal >= 5x at 16 episodes), how many trajectories both runs
   produced identically, and where the batched rollout's time goes (engine prefill vs decode, envs, the
   worker's own bookkeeping; cProfile's top entries).
2. workers (env-bound): a `RolloutGroup` of 1 vs 2 Ray workers (1 CPU each, K = 1 env each) with
   a scripted policy (no model) on ScienceWorld (real Java simulator; falls back to TextShop if
   ScienceWorld cannot start). Reports episodes/s and the speed-up (goal >= 1.6x on 2 cores), next
   to the machine's parallelism at that moment (2 busy-loop processes / 1): on a box shared with
   other jobs, "2 cores" may not be 2 free cores. Each worker first runs `--warmup` untimed
   episodes: a fresh ScienceWorld JVM keeps its C2 JIT compiler busy on a second core for ~15 s
   of stepping, and until then one env alone uses ~1.7 of the 2 cores (measured with top -H).
3. prefix cache budget (`--part prefix_cache`, not in `all`): the same `--cache-episodes` greedy
   episodes of a long-context env (default ALFWorld, from $ALFWORLD_DATA or ../shared/data/alfworld)
   in one worker with K = episodes, once with the old fixed 1 GiB budget and once with the
   automatic one (K x max_context of KV). Reports prompt tokens that had to be prefilled (exact,
   noise-free), cache hits, wall and CPU time, and whether both produced identical trajectories.
       python benchmarks/rollout_throughput.py --part prefix_cache --threads 1
4. engines (`--part engines`, not in `all`): vLLM vs HF as the rollout engine on the same episodes.
   vLLM on CPU lives in `.venv-vllm` (`make install-vllm`), so this part runs
   `benchmarks/vllm_engines.py` there (its docstring has the details) with this part's
   `--episodes`, `--max-turns`, `--threads`, `--dtype` and `--env` (TextShop or ALFWorld), and
   prints its final JSON line.

On a shared machine wall time depends on the neighbours: part 1 also reports CPU time (with
`--threads 1` a fair measure of the work done) and every run records the load average.
The last line of output is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rl_agents.engines import EngineSpec, SamplingParams  # noqa: E402
from rl_agents.rollout import RolloutConfig, RolloutWorker, make_tasks  # noqa: E402


def _timed_rollout(worker: RolloutWorker, tasks, profile: bool = False):
    for k in worker.stats:
        worker.stats[k] = 0 * worker.stats[k]
    prof = cProfile.Profile() if profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    trajs = worker.rollout(tasks)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(t.metadata["generated_tokens"] for t in trajs)
    return trajs, wall, cpu, tokens, dict(worker.stats), prof


class _ForwardTimer:
    """Wall time of the model's forward passes, split into prefill (> 1 new token) and decode (1)."""

    def __init__(self, model):
        self.times = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_calls": 0, "decode_calls": 0}
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.kind = "prefill" if ids is not None and ids.shape[1] > 1 else "decode"
        self.t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        self.times[f"{self.kind}_s"] += time.perf_counter() - self.t0
        self.times[f"{self.kind}_calls"] += 1

    def close(self) -> dict:
        for h in self.handles:
            h.remove()
        return self.times


def _top(prof: cProfile.Profile, n: int = 12) -> list[str]:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(n)
    return [line.strip() for line in out.getvalue().splitlines() if line.strip() and "/" in line][:n]


def bench_batching(args) -> dict:
    import torch

    from rl_agents.engines.hf import HFEngine
    from rl_agents.models import resolve_model

    torch.set_num_threads(args.threads)
    engine = HFEngine(resolve_model(args.model), dtype=args.dtype, prefix_cache_mb=args.prefix_cache_mb)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    cfg = dict(env_id=args.env, split="train", env_kwargs={"max_turns": args.max_turns}, max_context=4096,
               sampling=sampling)
    batched = RolloutWorker(engine, RolloutConfig(num_envs=args.episodes, **cfg))
    single = RolloutWorker(engine, RolloutConfig(num_envs=1, **cfg))
    tasks = make_tasks(batched.list_tasks("train")[: args.episodes])
    engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=2))  # warm-up
    print(f"[batching] {args.episodes} episodes of {args.env}, <= {args.max_turns} turns, "
          f"<= {args.max_new_tokens} new tokens/turn, {args.model} {args.dtype}, {args.threads} threads", flush=True)
    timer = _ForwardTimer(engine.model)
    b_trajs, b_wall, b_cpu, b_tok, b_stats, prof = _timed_rollout(batched, tasks, profile=True)
    b_forward = timer.close()
    print(f"  batched (K={args.episodes}): {b_wall:.1f} s wall, {b_cpu:.1f} s CPU, {b_tok} tokens", flush=True)
    timer = _ForwardTimer(engine.model)
    s_trajs, s_wall, s_cpu, s_tok, s_stats, _ = _timed_rollout(single, tasks)
    s_forward = timer.close()
    print(f"  one at a time (K=1): {s_wall:.1f} s wall, {s_cpu:.1f} s CPU, {s_tok} tokens", flush=True)
    # Greedy ids agree exactly in fp32; in bf16, batch shapes change rounding and can flip near-ties.
    seq_ids = {t.task_id: [x.token_ids for x in t.turns] for t in s_trajs}
    same = sum(seq_ids[t.task_id] == [x.token_ids for x in t.turns] for t in b_trajs)
    lengths = [len(t.turns[0].token_ids + t.turns[1].token_ids) for t in b_trajs]
    res = {
        "episodes": args.episodes, "model": args.model, "dtype": args.dtype, "env": args.env,
        "max_turns": args.max_turns, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
        "batched_episodes_per_s": args.episodes / b_wall, "sequential_episodes_per_s": args.episodes / s_wall,
        "speedup": s_wall / b_wall, "speedup_cpu_time": s_cpu / b_cpu,
        "batched_cpu_s": b_cpu, "sequential_cpu_s": s_cpu,
        "prefix_cache_hits": engine.prefix_cache.hits if engine.prefix_cache else 0,
        "batched_tokens_per_s": b_tok / b_wall, "sequential_tokens_per_s": s_tok / s_wall,
        "identical_trajectories": f"{same}/{len(b_trajs)}",
        "mean_turns": sum(t.num_steps for t in b_trajs) / len(b_trajs),
        "first_prompt_tokens_mean": sum(lengths) / len(lengths),
        "final_context_tokens_mean": sum(len(x.token_ids) for t in b_trajs for x in t.turns) / len(b_trajs),
        "profile_batched": {"wall_s": b_wall, "engine_s": b_stats["engine_s"], "env_s": b_stats["env_s"],
                            "worker_other_s": b_wall - b_stats["engine_s"] - b_stats["env_s"],
                            "engine_calls": b_stats["engine_calls"],
                            **b_forward, "top_cumulative": _top(prof)},
        "profile_sequential": {"wall_s": s_wall, "engine_s": s_stats["engine_s"], "env_s": s_stats["env_s"],
                               "engine_calls": s_stats["engine_calls"], **s_forward},
    }
    return res


def bench_prefix_cache(args) -> dict:
    import torch

    from rl_agents.engines.hf import HFEngine
    from rl_agents.models import resolve_model

    torch.set_num_threads(args.threads)
    env_kwargs = {"max_turns": args.cache_turns}
    if "ALFWorld" in args.cache_env:
        data = os.environ.get("ALFWORLD_DATA") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                               "shared", "data", "alfworld")
        env_kwargs.update(data_dir=data, task_order="interleaved")
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    cfg = RolloutConfig(env_id=args.cache_env, split="train", env_kwargs=env_kwargs, num_envs=args.cache_episodes,
                        max_context=args.cache_context, sampling=sampling)
    print(f"[prefix_cache] {args.cache_episodes} episodes of {args.cache_env}, <= {args.cache_turns} turns, "
          f"context {args.cache_context}, {args.model} float32, {args.threads} threads", flush=True)
    out, trajs = {}, {}
    for name, mb in (("fixed_1GiB", 1024), ("automatic", None)):
        engine = HFEngine(resolve_model(args.model), dtype="float32", prefix_cache_mb=mb)
        worker = RolloutWorker(engine, cfg)
        tasks = make_tasks(worker.list_tasks("train")[: args.cache_episodes])
        trajs[name], wall, cpu, tok, stats, _ = _timed_rollout(worker, tasks)
        pc = engine.prefix_cache
        out[name] = {"budget_mib": pc.max_bytes / 2**20, "prompt_tokens": engine.prompt_tokens,
                     "prefilled_tokens": engine.prompt_tokens - pc.reused_tokens, "hits": pc.hits,
                     "engine_calls": stats["engine_calls"], "wall_s": wall, "cpu_s": cpu, "generated_tokens": tok}
        print(f"  {name}: budget {out[name]['budget_mib']:.0f} MiB, prefilled {out[name]['prefilled_tokens']} of "
              f"{engine.prompt_tokens} prompt tokens, {pc.hits} hits / {stats['engine_calls']} calls, "
              f"{wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
        worker.close()
    ids = {name: {t.task_id: [x.token_ids for x in t.turns] for t in ts} for name, ts in trajs.items()}
    same = sum(ids["fixed_1GiB"][k] == ids["automatic"][k] for k in ids["automatic"])
    a, f = out["automatic"], out["fixed_1GiB"]
    out.update(env=args.cache_env, episodes=args.cache_episodes, identical_trajectories=f"{same}/{len(ids['automatic'])}",
               mean_final_context_tokens=sum(len(x.token_ids) for t in trajs["automatic"] for x in t.turns)
               / len(trajs["automatic"]),
               prefill_ratio=f["prefilled_tokens"] / max(1, a["prefilled_tokens"]),
               wall_speedup=f["wall_s"] / a["wall_s"], cpu_speedup=f["cpu_s"] / a["cpu_s"])
    return out


def bench_workers(args) -> dict:
    import ray

    from rl_agents.models import smollm2_path
    from rl_agents.rollout_group import RolloutGroup

    env, split, kwargs = args.env_bound, "train", {"max_turns": args.env_bound_turns}
    spec = EngineSpec("scripted", str(smollm2_path()), kwargs={"end_of_turn": "<|im_end|>"})
    if "ScienceWorld" in env:
        spec = EngineSpec("scripted", str(smollm2_path()), kwargs={
            "end_of_turn": "<|im_end|>", "policy": "benchmarks.rollout_throughput:sciworld_policy"})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # actors import this file's policy
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}})
    out = {"env": env, "episodes": args.env_bound_episodes, "turns_per_episode_max": args.env_bound_turns,
           "runs": []}
    try:
        for rep in range(args.repeats):  # alternate 1 and 2 workers: neighbours' load hits both alike
            for n in (1, 2):
                cfg = RolloutConfig(env, split=split, env_kwargs=kwargs, num_envs=1,
                                    sampling=SamplingParams(temperature=0.0, max_new_tokens=32))
                with RolloutGroup(spec, cfg, num_workers=n, num_cpus=1, chunk_size=1, progress=False) as group:
                    task_ids = group.list_tasks(split)[::3]  # a mix of task types
                    warm = n * args.warmup  # start every worker's env and let the JVM's JIT warm up
                    group.run(make_tasks(task_ids[:warm], seed=99), desc="warm-up")
                    tasks = make_tasks(task_ids[warm : warm + args.env_bound_episodes])
                    t0 = time.perf_counter()
                    trajs = group.run(tasks, desc=f"{n} worker(s)")
                    wall = time.perf_counter() - t0
                steps = sum(t.num_steps for t in trajs)
                out["runs"].append({"workers": n, "wall_s": wall, "episodes_per_s": len(trajs) / wall,
                                    "env_steps_per_s": steps / wall,
                                    "errors": sum("error" in t.metadata for t in trajs), "load_avg": os.getloadavg()})
                print(f"[workers] run {rep}: {n} worker(s): {len(trajs)} episodes, {steps} steps in {wall:.1f} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
            out["runs"].append({"machine_parallelism": machine_parallelism()})
            print(f"[workers] run {rep}: machine parallelism now (2 busy processes / 1): "
                  f"{out['runs'][-1]['machine_parallelism']:.2f}x", flush=True)
    finally:
        ray.shutdown()
    for n in (1, 2):  # the least-disturbed run of each
        out[f"workers_{n}"] = max((r for r in out["runs"] if r.get("workers") == n), key=lambda r: r["episodes_per_s"])
    out["machine_parallelism"] = max(r["machine_parallelism"] for r in out["runs"] if "machine_parallelism" in r)
    out["speedup"] = out["workers_2"]["episodes_per_s"] / out["workers_1"]["episodes_per_s"]
    return out


def _busy(n: int = 3_000_000) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def machine_parallelism() -> float:
    """Throughput of 2 processes / 1 process on a pure-Python busy loop, right now: the ceiling
    for any 2-worker speed-up on this machine (2.0 on two free cores; ~1 when neighbours use them)."""
    from multiprocessing import get_context

    with get_context("spawn").Pool(2) as pool:
        pool.map(_busy, [10, 10])  # start both processes
        t0 = time.perf_counter()
        pool.apply(_busy)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        pool.map(_busy, [3_000_000] * 2, chunksize=1)
        two = time.perf_counter() - t0
    return 2 * one / two


def bench_engines(args) -> None:
    """Part 4: `benchmarks/vllm_engines.py` in the vLLM environment (it holds both engines)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    python = root / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        sys.exit(f"{python} not found: `make install-vllm` first (vLLM on CPU has its own environment)")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    names = {"rl_agents/TextShop-v0": "textshop", "rl_agents/ALFWorld-v0": "alfworld"}
    if args.env not in names:
        sys.exit(f"--part engines: --env must be one of {sorted(names)}")
    cmd = [str(python), str(root / "benchmarks" / "vllm_engines.py"), "--episodes", str(args.episodes),
           "--max-turns", str(args.max_turns), "--threads", str(args.threads), "--env", names[args.env],
           "--dtype", args.dtype]
    sys.exit(subprocess.run(cmd, env=env, cwd=root).returncode)


def sciworld_policy(prompt: str) -> str:
    """A scripted ScienceWorld agent: cycles through a few always-valid actions (no model cost)."""
    acts = ["look around", "inventory", "teleport to kitchen", "look around", "open door to hallway", "wait1"]
    return f"Thought: explore.\nAction: {acts[prompt.count('<|im_start|>assistant') % len(acts)]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "batching", "workers", "prefix_cache", "engines"], default="all")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2, help="torch threads of the in-process worker (part 1)")
    p.add_argument("--prefix-cache-mb", type=int, default=None,
                   help="HF engine prefix cache budget in MiB (default: automatic, every episode at full context; 0 = off)")
    p.add_argument("--env", default="rl_agents/TextShop-v0")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cache-env", default="rl_agents/ALFWorld-v0")
    p.add_argument("--cache-episodes", type=int, default=16)
    p.add_argument("--cache-turns", type=int, default=20)
    p.add_argument("--cache-context", type=int, default=3072)
    p.add_argument("--env-bound", default="rl_agents/ScienceWorld-v0")
    p.add_argument("--env-bound-episodes", type=int, default=96)
    p.add_argument("--env-bound-turns", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="alternating 1- and 2-worker runs (part 2)")
    p.add_argument("--warmup", type=int, default=120,
                   help="untimed episodes per worker first: ScienceWorld's JVM spends its first ~15 s of stepping "
                        "JIT-compiling on a second core (C2), so a cold env is not a one-core load")
    args = p.parse_args()
    if args.part == "engines":
        return bench_engines(args)
    import envs  # noqa: F401

    result: dict = {"benchmark": "rollout_throughput", "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    if args.part in ("all", "batching"):
        result["batching"] = bench_batching(args)
        b = result["batching"]
        print(f"  -> {b['batched_episodes_per_s']:.3f} vs {b['sequential_episodes_per_s']:.3f} episodes/s: "
              f"{b['speedup']:.2f}x (CPU time: {b['speedup_cpu_time']:.2f}x); "
              f"{b['batched_tokens_per_s']:.1f} vs {b['sequential_tokens_per_s']:.1f} tokens/s; "
              f"identical trajectories: {b['identical_trajectories']}", flush=True)
    if args.part in ("all", "workers"):
        try:
            result["workers"] = bench_workers(args)
        except Exception as e:  # no Java / ScienceWorld: measure the same thing on TextShop
            print(f"[workers] {args.env_bound} unavailable ({type(e).__name__}: {e}); using {args.env}", flush=True)
            args.env_bound = args.env
            result["workers"] = bench_workers(args)
        print(f"  -> 2 workers / 1 worker: {result['workers']['speedup']:.2f}x (machine ceiling now: "
              f"{result['workers']['machine_parallelism']:.2f}x)", flush=True)
    if args.part == "prefix_cache":
        result["prefix_cache"] = c = bench_prefix_cache(args)
        print(f"  -> automatic budget prefills {c['prefill_ratio']:.2f}x fewer tokens; wall {c['wall_speedup']:.2f}x, "
              f"CPU {c['cpu_speedup']:.2f}x faster; identical trajectories: {c['identical_trajectories']}", flush=True)
    result["load_avg_end"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
