"""The papers' comparison at small scale: SFT, RFT, DPO, ETO, DMPO, StepAgent, PPO, Best-of-N.

    python benchmarks/learning.py                      # TextShop + ALFWorld, seeds 0,1: hours on 2 CPU cores
    python benchmarks/learning.py --smoke --envs textshop --seeds 0 --out /tmp/learning_smoke \\
        --results /tmp/learning_smoke/results.md      # tiny random Llama, 4 tasks, 1 epoch: every code path

Per env and seed: SFT of the base model on the expert trajectories of the first `--train-tasks`
train tasks; every other algorithm starts from that SFT policy and trains on the first
`--explore-tasks` train tasks. The SFT agent explores those tasks once (T = 0.7) and RFT, DPO, ETO
(its first iteration) and DMPO noisy/clean all read that one exploration (`rollout.explore_data`,
as `algorithms/demo.py` does), so they see identical samples; PPO and StepAgent sample their own.
Each policy is evaluated greedily on the first `--eval-tasks` tasks of test_seen and test_unseen
(same tasks for all) by its own rollout workers; oracle Best-of-N of the SFT agent (ETO §4.1) is a
reference row. Ray resources as the demo: 2 rollout actors × 0.5 CPU × 1 thread, 1 trainer worker
with `--threads` threads, `ray.init(num_cpus=threads)`.

`--report` runs nothing and writes the tables from the runs finished so far (e.g. while another
invocation is still running, or to record a partial benchmark). A run made from another SFT run than
the seed's current one is left out, unless `--earlier-sft`: then it is reported with a note naming
the SFT run it was made from (for a seed whose SFT weights were lost and redone, until its other
runs are redone from the new SFT).

Resumable: a finished run writes `<out>/<env>/seed<k>/<algo>/result.json` (atomically) and is
skipped next time. A run that crashes records its error there, the others still run, and the
next invocation retries it from scratch; a run whose SFT policy has changed since is redone.
`<out>/<env>/settings.json` pins the settings: re-running with others into the same --out stops.
An SFT run's result carries the sha256 of its weights: an SFT redone with identical weights (the
same seed on the same software reproduces them) keeps every result made from the earlier one.

Records: every finished run's result.json (and each seed's exploration summary) is also kept in
`--records` (default `benchmarks/results/learning`, in the repository: a few KB each, meant to be
committed), with the settings they were made with. `--out` holds the weights and lives on the
machine that ran them; the records are what the tables are made from when `--out` no longer has a
run (`--report` reads `--out` first, then the records), so a benchmark spread over several machines
still reports every finished run, and a fresh machine that redoes an SFT run to identical weights
skips what the records already hold for it. `--report` also copies what it finds in `--out` into
the records.
The records, digests and tables are `benchmarks/learning_report.py`.

Output: per env a markdown table (mean ± sample std over seeds), printed and written into
`--results` between markers (the rest of that file is kept), and a bar chart (`--chart`, default
`<out>/learning.png`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import shutil
import sys
import time
import traceback
import uuid
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning_report  # noqa: E402
from learning_report import (LABELS, SPLITS, bar_chart, env_table, explorations, explore_line,  # noqa: E402
                             keep_record, made_from, read_record, record_path, weights_sha256, with_digests,
                             write_section)
from rl_agents.trajectory import atomic_write_text  # noqa: E402

# ---- settings ------------------------------------------------------------------------------------
ENVS = {
    # The demo's TextShop sizes (explore 48 here, the demo 40 for its 30-min budget); experts need 4-5 turns.
    # Evaluation on the full test splits (200 / 200; ~17 min a policy here): at 20 tasks (before
    # 2026-12-02) one task was 5 points and no method separated from SFT.
    "textshop": dict(env_id="rl_agents/TextShop-v0", train_tasks=96, explore_tasks=48, eval_tasks=200,
                     max_turns=6, max_context=2048, envs_per_worker=32),
    # ALFWorld subset: the two shortest of the six task types (Pick & Place, Examine in Light: 200
    # train games here). On all six, SFT of the 135M model on 64 games solved 0 of 20 test games
    # (2026-11-22: it learned the format, not the game), so every method would start from 0. On the
    # subset, SFT on 64 of its games (8 steps) solved 0 of 20 too; on all 200 (24 steps, 40 min) 1 of 20.
    # ALFWorld's ids sort by task type, so the subsets use task_order="interleaved" (round robin over
    # the types; env_settings). ETO's released config allows 40 turns; 20 here for the CPU
    # budget. Context as examples/sft_alfworld.yaml.
    # micro_batch_size 1 (sequences of up to 3072 tokens): at SFT's 4 the trainer reached 15.3 GB
    # and Ray's memory monitor killed it on the 24 GB box (2026-11-22).
    "alfworld": dict(env_id="rl_agents/ALFWorld-v0", train_tasks=200, explore_tasks=32, eval_tasks=10,
                     max_turns=20, max_context=3072, envs_per_worker=16, micro_batch_size=1,
                     task_types=["pick_and_place_simple", "look_at_obj_in_light"]),
}
MAX_NEW_TOKENS = 64  # per agent turn (expert thought + action fit in ~45 tokens)
EXPLORE_T = 0.7  # the shared exploration, as the demo (the papers do not report it)
BEST_OF_T = 0.7  # Best-of-N sampling temperature (not reported; `evaluate`'s default)
BEST_OF_N = 10  # ETO §4.1 / DMPO §5.3: N = 10
LORA = {"enabled": True, "r": 32, "alpha": 64,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
DEEPSPEED = {"enabled": True, "zero_stage": 2, "bf16": True}

# The papers fine-tune 7B/8B models fully at lr 1e-5 (SFT), 1e-6 (ETO/DMPO), 5e-7 (StepAgent). On
# 2 CPU cores we train LoRA r=32 adapters of a 135M model for about one epoch, which needs ~100x
# larger rates: those of algorithms/demo.py and examples/*.yaml. `shared`: reads the SFT agent's
# exploration. `per_env`: algorithm fields that differ by env.
# Preference losses: the demo's lr 5e-5 and beta 0.5 (lr 2e-4 with beta 0.1 collapsed ETO on TextShop: README).
PREF_OPTIM = {"lr": 5e-5, "batch_size": 8, "micro_batch_size": 2, "epochs": 1}  # ETO §4.1: 1e-6, 32, 3 epochs
PREF_BETA = 0.5
HPARAMS = {
    # ETO §4.1: lr 1e-5, batch 64, 3 epochs (StepAgent: 4). CPU: 2 epochs (examples/sft_textshop.yaml).
    "sft": {"algo": "sft", "optim": {"lr": 1e-3, "batch_size": 16, "micro_batch_size": 4, "epochs": 2}},
    # ETO §4.1 baseline: SFT again on experts + own successes; no separate settings reported.
    # Continues from the SFT policy, so 1 epoch.
    "rft": {"algo": "rft", "shared": True, "optim": {"lr": 1e-3, "batch_size": 16, "micro_batch_size": 4, "epochs": 1}},
    # StepAgent §6.2 baseline: trajectory DPO on one fixed set of pairs; β as ETO.
    "dpo": {"algo": "dpo", "shared": True, "config": {"beta": PREF_BETA}, "optim": PREF_OPTIM},
    # ETO §4.1: β 0.1 (0.5 on ALFWorld; here 0.5 on both, PREF_BETA); 2 iterations on WebShop, 1 on
    # ALFWorld. We use 2 on both: with 1 iteration and the shared exploration, ETO is the DPO row.
    "eto": {"algo": "eto", "shared": True, "iterations": 2, "config": {"beta": PREF_BETA}, "optim": PREF_OPTIM},
    # DMPO §5.1 / released code: β 0.1 (here PREF_BETA, as ETO), γ 0.7, one round from the SFT agent's
    # trajectories; noisy keeps degenerate lose trajectories, clean drops them (§5). lr unreported: as ETO.
    "dmpo_noisy": {"algo": "dmpo", "shared": True, "config": {"beta": PREF_BETA, "gamma": 0.7, "setting": "noisy"},
                   "optim": PREF_OPTIM},
    "dmpo_clean": {"algo": "dmpo", "shared": True, "config": {"beta": PREF_BETA, "gamma": 0.7, "setting": "clean"},
                   "optim": PREF_OPTIM},
    # StepAgent §6.4: reflection lr 5e-7, batch 16, 1 epoch, up to 3 practice samples, ~3 iterations;
    # β unreported. CPU: 1 practice sample, 1 iteration; ALFWorld: the first 8 steps of each plan.
    "step_dpo": {"algo": "step_dpo", "config": {"beta": PREF_BETA, "practice_samples": 1},
                 "per_env": {"alfworld": {"max_steps_per_task": 8}}, "optim": PREF_OPTIM},
    # StepAgent-inverse: 7 iterations (Fig. 4a), up to 3 samples; PPO ε 0.2, λ 1e-3 (config defaults).
    # CPU: 2 iterations, 2 samples (the minimum for the per-prefix baseline), lr 1e-4 (examples/*.yaml).
    # Sampling at T = 1: the policy-gradient samples come from the policy itself.
    "step_gail": {"algo": "step_gail", "iterations": 2, "config": {"practice_samples": 2},
                  "per_env": {"alfworld": {"max_steps_per_task": 8}}, "rollout": {"temperature": 1.0},
                  "optim": {"lr": 1e-4, "batch_size": 16, "micro_batch_size": 2, "epochs": 1}},
    # No paper reports PPO settings (docs/papers.md): 4 samples per task (group baseline), ε 0.2,
    # λ 1e-3, T = 1, lr 1e-4 as examples/ppo_textshop.yaml; 2 iterations (the yaml: 3).
    "ppo": {"algo": "ppo", "iterations": 2, "rollout": {"temperature": 1.0, "samples_per_task": 4},
            "optim": {"lr": 1e-4, "batch_size": 16, "micro_batch_size": 2, "epochs": 1}},
}
ALGOS = list(LABELS)


def resolve_hparams(algo: str, env_name: str, smoke: bool) -> dict:
    hp = copy.deepcopy(HPARAMS[algo])
    hp.setdefault("iterations", 1)
    hp["config"] = {**hp.get("config", {}), **hp.pop("per_env", {}).get(env_name, {})}
    hp["rollout"] = {"temperature": EXPLORE_T, **hp.get("rollout", {})}
    hp["optim"] = dict(hp["optim"], **({"epochs": 1} if smoke else {}))
    hp.setdefault("shared", False)
    return hp


# ---- one run -------------------------------------------------------------------------------------
def _group(policy: str, env: dict):
    """Rollout workers outside an algorithm (shared exploration, Best-of-N): the demo's settings."""
    from rl_agents.engines.base import EngineSpec, SamplingParams
    from rl_agents.rollout import RolloutConfig
    from rl_agents.rollout_group import RolloutGroup

    rcfg = RolloutConfig(env_id=env["env_id"], split="train", env_kwargs={**env["env_kwargs"], "max_turns": env["max_turns"]},
                         num_envs=env["envs_per_worker"], max_context=env["max_context"],
                         sampling=SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS))
    return RolloutGroup(EngineSpec("hf", policy, kwargs={"num_threads": 1}), rcfg, 2, num_cpus=0.5, progress=True)


def shared_exploration(env: dict, seed: int, seed_dir: Path, sft: dict) -> str:
    """The SFT agent's one exploration of the first `explore_tasks` train tasks (cached per SFT run)."""
    from rl_agents.evaluation import explore, summarize

    path, meta = seed_dir / "explore" / "explore.jsonl", seed_dir / "explore" / "summary.json"
    if meta.exists() and path.exists() and json.loads(meta.read_text()).get("sft_run_id") == sft["run_id"]:
        return str(path)
    t0 = time.perf_counter()
    with _group(sft["policy"], env) as g:
        trajs = explore(sft["policy"], env["env_id"], "train", n=env["explore_tasks"], out_path=path, group=g,
                        temperature=EXPLORE_T, max_new_tokens=MAX_NEW_TOKENS, seed=seed, verbose=False)
    summary = {k: v for k, v in summarize(trajs).items() if k != "stop_reasons"}
    print(f"  shared exploration: {summary['num_tasks']} episodes, success {summary['success_rate']:.1%}", flush=True)
    summary = {"sft_run_id": sft["run_id"], "sft_policy_sha256": sft.get("policy_sha256"),
               "seconds": time.perf_counter() - t0, **summary}
    atomic_write_text(meta, json.dumps(summary))
    keep_record(env["name"], seed, "explore", summary)
    return str(path)


def run_algorithm(hp: dict, env: dict, seed: int, run_dir: Path, model: str, threads: int,
                  explore_data: str | None) -> dict:
    """Train from `model` for hp's iterations, then evaluate greedily with the run's own workers."""
    from algorithms.runner import get_algorithm
    from rl_agents.config import from_dict

    spec = {"model": model, "run_dir": str(run_dir), "seed": seed, "iterations": hp["iterations"], **hp["config"],
            "env": {"env_id": env["env_id"], "env_kwargs": env["env_kwargs"], "max_turns": env["max_turns"],
                    "train_tasks": env["train_tasks" if hp["algo"] == "sft" else "explore_tasks"],
                    "eval_splits": list(SPLITS), "eval_tasks": env["eval_tasks"]},
            "rollout": {"num_workers": 2, "num_cpus_per_worker": 0.5, "threads_per_worker": 1,
                        "envs_per_worker": env["envs_per_worker"], "max_new_tokens": MAX_NEW_TOKENS,
                        "max_context": env["max_context"], "explore_data": explore_data, **hp["rollout"]},
            # train.seed is set here: AlgorithmConfig.seed does not reach it (LoRA init, data order).
            "train": {"num_workers": 1, "threads_per_worker": threads, "seed": seed, "deepspeed": DEEPSPEED,
                      "lora": LORA, "optim": {**hp["optim"], **({"micro_batch_size": env["micro_batch_size"]}
                                                               if env.get("micro_batch_size") else {})}}}
    algo = from_dict(get_algorithm(hp["algo"]).config_class, spec).build()
    history = []
    try:
        t0 = time.perf_counter()
        for _ in range(algo.config.iterations):
            history.append({k: v for k, v in algo.train().items() if isinstance(v, (int, float))})
        t1 = time.perf_counter()
        metrics = {k: v for k, v in algo.evaluate().items() if not k.endswith("/per_task")}  # per_task: below
        t2 = time.perf_counter()
    finally:
        algo.stop()
    report = json.loads((algo.run_dir / f"eval_iter{algo.iteration}.json").read_text())
    return {"policy": algo.policy, "metrics": metrics, "history": history, "train_s": t1 - t0, "eval_s": t2 - t1,
            "num_tasks": {s: m["num_tasks"] for s, m in report["splits"].items()},
            "per_task": {s: m["per_task"] for s, m in report["splits"].items()}}


def run_best_of_n(env: dict, seed: int, run_dir: Path, sft: dict, n: int) -> dict:
    from rl_agents.evaluation import evaluate

    with _group(sft["policy"], env) as g:
        report = evaluate(sft["policy"], env["env_id"], list(SPLITS), n=env["eval_tasks"], best_of=n, group=g,
                          temperature=BEST_OF_T, max_new_tokens=MAX_NEW_TOKENS, seed=seed, verbose=False,
                          out_path=run_dir / "eval.json", trajectories_path=run_dir / "eval.jsonl")
    return {"policy": sft["policy"], "metrics": report["metrics"],
            "num_tasks": {s: m["num_tasks"] for s, m in report["splits"].items()},
            "per_task": {s: m["per_task"] for s, m in report["splits"].items()}}


# ---- one result: stored or run (the records: learning_report.py) -----------------------------------
def ensure(algo: str, env: dict, seed: int, seed_dir: Path, sft: dict | None, args, explored: dict) -> dict | None:
    """The stored result of (env, seed, algo) if finished and current; else run it and store it.

    A run that --out lacks is taken from the records when it was made from this SFT run or from
    identical weights (the SFT run itself only with --report: the others need its weights). A run
    that --out has is copied to the records."""
    run_dir, path = seed_dir / algo, seed_dir / algo / "result.json"
    old = json.loads(path.read_text()) if path.exists() else None
    if made_from(old, algo, sft):
        old = with_digests(old, algo, sft, path)
        keep_record(env["name"], seed, algo, old)
        print(f"  {algo}: done before, skipped", flush=True)
        return old
    kept = read_record(env["name"], seed, algo)
    if made_from(kept, algo, sft) and (args.report or algo != "sft"):
        print(f"  {algo}: done before, skipped (from the records)", flush=True)
        return kept
    if args.report:
        earlier = [r for r in (old, kept) if r and not r.get("error") and r.get("sft_run_id")]
        if args.earlier_sft and algo != "sft" and earlier:
            print(f"  {algo}: made from an earlier SFT run ({earlier[0]['sft_run_id']})", flush=True)
            return {**earlier[0], "earlier_sft": earlier[0]["sft_run_id"]}
        print(f"  {algo}: not run (--report)", flush=True)
        return None
    if algo != "sft" and sft is None:
        print(f"  {algo}: skipped, no SFT policy", flush=True)
        return None
    shutil.rmtree(run_dir, ignore_errors=True)  # a crashed or outdated attempt: start clean
    print(f"  {algo}: running", flush=True)
    t0 = time.perf_counter()
    try:
        if algo == "best_of_n":
            result = run_best_of_n(env, seed, run_dir, sft, args.best_of)
        else:
            hp = resolve_hparams(algo, env["name"], args.smoke)
            data = None
            if hp["shared"]:  # one attempt per (env, seed); a failure is every reader's error
                if seed_dir not in explored:
                    try:
                        explored[seed_dir] = shared_exploration(env, seed, seed_dir, sft)
                    except Exception as e:
                        traceback.print_exc()
                        explored[seed_dir] = RuntimeError(f"shared exploration failed: {type(e).__name__}: {e}")
                if isinstance(explored[seed_dir], Exception):
                    raise explored[seed_dir]
                data = explored[seed_dir]
            model = args.model if algo == "sft" else sft["policy"]
            result = run_algorithm(hp, env, seed, run_dir, model, args.threads, data)
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result.update(env=env["name"], seed=seed, algo=algo, wall_s=time.perf_counter() - t0, run_id=uuid.uuid4().hex,
                  sft_run_id=sft["run_id"] if sft else None, sft_policy_sha256=sft.get("policy_sha256") if sft else None,
                  finished=datetime.now().isoformat(timespec="seconds"))
    if algo == "sft" and not result.get("error"):
        result["policy_sha256"] = weights_sha256(result["policy"])
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
    if result.get("error"):  # not recorded: the records hold finished runs only
        print(f"  {algo}: FAILED ({result['error'].splitlines()[0][:200]})", flush=True)
    else:
        keep_record(env["name"], seed, algo, result)
        print(f"  {algo}: " + ", ".join(f"{s} reward {result['metrics'][f'eval/{s}/avg_reward']:.3f} success "
                                        f"{result['metrics'][f'eval/{s}/success_rate']:.1%}" for s in SPLITS)
              + f" ({result['wall_s'] / 60:.1f} min)", flush=True)
    return result


# ---- envs ----------------------------------------------------------------------------------------
def env_settings(name: str, args) -> tuple[dict | None, str | None]:
    """(settings, None) or (None, why the env is skipped)."""
    env = dict(ENVS[name], name=name, env_kwargs={})
    for key in ("train_tasks", "explore_tasks", "eval_tasks"):
        if getattr(args, key) is not None:
            env[key] = getattr(args, key)
        elif args.smoke:
            env[key] = 4
    if args.smoke:
        env["max_turns"] = min(env["max_turns"], 4)
    if name == "alfworld":
        data = Path(args.alfworld_data).expanduser()
        if not (data / "json_2.1.1").is_dir():
            return None, (f"no ALFWorld games at {data} (set ALFWORLD_DATA or --alfworld-data to the directory "
                          "holding json_2.1.1/)")
        # Type-balanced subsets: the first N tasks in ALFWorld's sorted order are all one task type.
        env["env_kwargs"] = {"data_dir": str(data), "task_order": "interleaved", "task_types": env["task_types"]}
    try:  # fail here, not in every run: missing textworld, unreadable games
        import gymnasium as gym

        import envs  # noqa: F401

        probe = gym.make(env["env_id"], **env["env_kwargs"])
        n_train = len(probe.unwrapped.list_tasks("train"))
        probe.close()
    except Exception as e:
        return None, f"{env['env_id']} does not start: {type(e).__name__}: {e}"
    if n_train < env["train_tasks"]:
        return None, f"{env['env_id']} has {n_train} train tasks, fewer than --train-tasks {env['train_tasks']}"
    return env, None


def pin_settings(env: dict, args) -> dict:
    """Write `<out>/<env>/settings.json`, or stop if it holds other settings (mixed results)."""
    settings = {"model": args.model, "best_of": args.best_of, "explore_temperature": EXPLORE_T,
                "max_new_tokens": MAX_NEW_TOKENS, "lora": LORA, "deepspeed": DEEPSPEED,
                "env": {k: v for k, v in env.items() if k != "env_kwargs"},
                "hparams": {a: resolve_hparams(a, env["name"], args.smoke) for a in HPARAMS}}
    paths = [Path(args.out) / env["name"] / "settings.json"] + ([p] if (p := record_path(env["name"], None, "settings")) else [])
    for path in paths:
        if path.exists():
            old = json.loads(path.read_text())
            if old != json.loads(json.dumps(settings)):
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != json.loads(json.dumps(settings.get(k))))
                sys.exit(f"{path}: results there were made with other settings (differs in {diff}); "
                         "use another --out / --records or delete that directory")
        else:
            atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
    return settings


def settings_table(env: dict, args, algos: list[str]) -> str:
    lines = ["| algorithm | lr | batch | epochs | iterations | other |", "|---|---|---|---|---|---|"]
    for algo in algos:
        if algo == "best_of_n":
            lines.append(f"| {LABELS[algo]} | — | — | — | — | N = {args.best_of}, T = {BEST_OF_T} |")
            continue
        hp = resolve_hparams(algo, env["name"], args.smoke)
        o = hp["optim"]
        other = [f"{k} {v}" for k, v in hp["config"].items()]
        other += [f"{k} {v}" for k, v in hp["rollout"].items() if k != "temperature" or algo not in ("sft",)]
        other += ["shared exploration"] if hp["shared"] else []
        lines.append(f"| {LABELS[algo]} | {o['lr']:g} | {o['batch_size']} | {o['epochs']} | {hp['iterations']} "
                     f"| {', '.join(other)} |")
    return "\n".join(lines) + "\n"


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", default="textshop,alfworld", help=f"comma list of {', '.join(ENVS)}")
    p.add_argument("--algos", default=",".join(ALGOS), help=f"comma list of {', '.join(ALGOS)} (sft always runs: "
                   "everything starts from it)")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds")
    p.add_argument("--train-tasks", type=int, help="SFT's expert trajectories: the first N train tasks "
                   "(default per env: " + ", ".join(f"{k} {v['train_tasks']}" for k, v in ENVS.items()) + ")")
    p.add_argument("--explore-tasks", type=int, help="the first N train tasks every other algorithm trains on "
                   "(default: " + ", ".join(f"{k} {v['explore_tasks']}" for k, v in ENVS.items()) + ")")
    p.add_argument("--eval-tasks", type=int, help="first N tasks of test_seen and of test_unseen "
                   "(default: " + ", ".join(f"{k} {v['eval_tasks']}" for k, v in ENVS.items()) + ")")
    p.add_argument("--best-of", type=int, default=BEST_OF_N, help=f"N of the Best-of-N row (default {BEST_OF_N})")
    p.add_argument("--out", default="runs/learning", help="run directories and result.json files")
    p.add_argument("--results", default="docs/results.md", help="markdown file the tables are written into")
    p.add_argument("--chart", help="bar chart PNG (default <out>/learning.png)")
    p.add_argument("--records", help="where finished results are kept as small JSON files to commit, the tables' "
                   "source when --out lacks a run (default benchmarks/results/learning; with --smoke <out>/records); "
                   "'' for none")
    p.add_argument("--model", default="smollm2-135m", help="base model: alias or local HF checkpoint dir")
    p.add_argument("--threads", type=int, default=2, help="CPU cores: Ray CPUs and the trainer's torch threads")
    p.add_argument("--alfworld-data", default=os.environ.get("ALFWORLD_DATA") or REPO.parent / "shared" / "data" / "alfworld",
                   help="directory holding ALFWorld's json_2.1.1/ (default $ALFWORLD_DATA, else ../shared/data/alfworld)")
    p.add_argument("--report", action="store_true", help="run nothing: write the tables and chart from the runs "
                   "finished so far (the rest show as 'not run')")
    p.add_argument("--earlier-sft", action="store_true", help="with --report: a seed's recorded run made from an "
                   "earlier SFT run of that seed (same settings; e.g. its weights were lost and the SFT redone) is "
                   "reported, marked as such, until a run from the current SFT replaces it (default: left out)")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, 4 tasks, 1 epoch, Best-of-2, "
                   "at most 4 turns: every code path in minutes (numbers meaningless)")
    args = p.parse_args(argv)
    if args.records is None:  # smoke numbers are meaningless: never mixed into the committed records
        args.records = str(Path(args.out) / "records") if args.smoke else str(REPO / "benchmarks" / "results" / "learning")
    if args.smoke:
        args.model = "tiny-llama" if args.model == "smollm2-135m" else args.model
        args.best_of = 2 if args.best_of == BEST_OF_N else args.best_of
    if args.threads < 2:  # the rollout actors (1 CPU) stay up while the trainer (1 CPU) runs
        p.error("--threads: at least 2 (Ray CPUs for the rollout actors and the trainer)")
    args.envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    args.algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for name, given, valid in (("--envs", args.envs, ENVS), ("--algos", args.algos, ALGOS)):
        bad = [x for x in given if x not in valid]
        if bad:
            p.error(f"{name}: unknown {bad}; valid: {', '.join(valid)}")
    args.algos = [a for a in ALGOS if a == "sft" or a in args.algos]  # the table's order
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    learning_report.RECORDS = Path(args.records) if args.records else None
    import ray

    start, out = time.perf_counter(), Path(args.out)
    chart = Path(args.chart) if args.chart else out / "learning.png"
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    from rl_agents.ray_utils import init_ray

    if not args.report:
        init_ray(num_cpus=args.threads)
    sections, per_env, explored_summaries = [], {}, {}
    try:
        for name in args.envs:
            env, why = env_settings(name, args)
            if env is None:
                print(f"\n=== {name}: SKIPPED — {why}", flush=True)
                sections.append(f"### {name}\n\nSkipped: {why}.\n")
                continue
            pin_settings(env, args)
            results, explored = {}, {}
            for seed in args.seeds:
                seed_dir = out / name / f"seed{seed}"
                print(f"\n=== {name} ({env['env_id']}), seed {seed} (t = {(time.perf_counter() - start) / 60:.1f} min)",
                      flush=True)
                sft = ensure("sft", env, seed, seed_dir, None, args, explored)
                results[(seed, "sft")] = sft
                base = sft if sft and not sft.get("error") else None
                for algo in args.algos[1:]:
                    results[(seed, algo)] = ensure(algo, env, seed, seed_dir, base, args, explored)
            per_env[name] = results
            explored_summaries[name] = explorations(name, args.seeds, out, results)
            sections.append(
                f"### {name} (`{env['env_id']}`)\n\n{env_table(env, results, args.seeds, args.algos)}\n"
                + (f"Task types: {', '.join(env['task_types'])} (ALFWorld's `task_types`).\n" if env.get("task_types") else "")
                + f"Tasks: SFT on the expert trajectories of the first {env['train_tasks']} train tasks; every other "
                f"algorithm from the SFT policy on the first {env['explore_tasks']}. Greedy evaluation on the first "
                f"{env['eval_tasks']} tasks of test_seen and test_unseen, at most {env['max_turns']} agent turns of "
                f"{MAX_NEW_TOKENS} new tokens, context {env['max_context']}. Seeds {', '.join(map(str, args.seeds))}: "
                f"intervals as said above the table (cells without per-task records and wall: mean ± sample std over "
                f"seeds); wall = train + evaluation of one run.\n"
                f"{explore_line(explored_summaries[name], EXPLORE_T)}\n{settings_table(env, args, args.algos)}")
    finally:
        if not args.report:  # --report starts no Ray (and leaves a caller's session alone)
            ray.shutdown()
    if per_env:
        bar_chart(per_env, args.seeds, args.algos, chart)
    run_s = sum(r["wall_s"] for res in per_env.values() for r in res.values() if r) + sum(
        f["seconds"] for found in explored_summaries.values() for f in found)
    machine = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores (os.cpu_count()), "
               f"{args.threads} used, no GPU")
    text = (f"## Learning benchmark\n\n"
            f"`benchmarks/learning.py`{' (SMOKE: tiny random model, numbers meaningless)' if args.smoke else ''}: "
            f"every algorithm from one SFT agent per seed, LoRA r={LORA['r']} on all linear layers, bf16 DeepSpeed "
            f"ZeRO-2 on Ray Train, model `{args.model}`.\n\n"
            f"- command: `{command}`\n- date: {datetime.now().isoformat(timespec='minutes')}\n- machine: {machine}\n"
            f"- time: {run_s / 3600:.2f} h summed over the runs in these tables (any invocation), "
            f"{(time.perf_counter() - start) / 60:.1f} min this invocation"
            + (f"; chart: `{chart}`" if per_env else "") + "\n\n" + "\n".join(sections))
    print("\n" + text)
    write_section(Path(args.results), text)
    print(f"wrote {args.results}" + (f", {chart}" if per_env else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
