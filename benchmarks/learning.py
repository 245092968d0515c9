"""The papers' comparison at small scale: SFT, RFT, DPO, ETO, DMPO, StepAgent, PPO, Best-of-N.

    python benchmarks/learning.py                      # TextShop + ALFWorld, seeds 0,1: hours on 2 CPU cores
    python benchmarks/learning.py --report             # run nothing: tables of the runs finished so far
    python benchmarks/learning.py --smoke --envs textshop --seeds 0 --out /tmp/learning_smoke \\
        --results /tmp/learning_smoke/results.md      # tiny random Llama, 4 tasks, 1 epoch: every code path

(From a git worktree other than the installed one: `python -m benchmarks.learning` in its root.)

Per env and seed: SFT of the base model on the expert trajectories of the first `--train-tasks` train
tasks; every other algorithm starts from that SFT policy and trains on the first `--explore-tasks`.
RFT, DPO, ETO (its first iteration) and DMPO read one exploration of those tasks by the SFT agent
(T = 0.7, `rollout.explore_data`), so they see identical samples; PPO and StepAgent sample their own.
Each run is `Algorithm.fit`: its iterations, then a greedy evaluation on the first `--eval-tasks` tasks
of test_seen and test_unseen. Oracle Best-of-N of the SFT agent (ETO §4.1) is a reference row. Ray as
the demo: 2 rollout actors × 0.5 CPU × 1 thread, 1 trainer worker with `--threads` threads.

Resumable: a finished run writes `<out>/<env>/seed<k>/<algo>/result.json` (atomically) and is skipped
next time; a crashed one writes its error there and is retried. `<out>/<env>/settings.json` pins the
settings: re-running with others into the same --out stops.

Records: every finished result (and each seed's exploration summary) is also copied into `--records`
(default `benchmarks/results/learning`: small JSON files to commit), pinned to its settings as --out
is. A run that --out lacks but the records have is not run again, except SFT when the others need its
weights. An SFT result carries the sha256 of its weights (`policy_sha256`), and every run made from it that
digest (`sft_policy_sha256`): an SFT run redone to identical weights (SFT is deterministic on CPU: the same
seed gives the same bytes) keeps every result made from the run it replaced. `--report` runs nothing (no
Ray, no env, no settings check): tables from --out, then the records.

Rollouts use the HF engine; `--engine vllm` (run from `.venv-vllm`) plays them with vLLM instead (fp32, the
same greedy actions as HF on TextShop and ALFWorld: docs/benchmarks.md), ~3x the episodes per second on
ALFWorld; each result records its engine and the table notes the vLLM ones.

Output: per env a table (`algorithms.results.results_table`: mean [95% interval] over tasks and seeds,
each row against SFT) written into `--results` between markers (the rest of that file is kept), and a
bar chart (`--chart`, default `<out>/learning.png`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import traceback
import uuid
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from algorithms.results import results_chart, results_table  # noqa: E402
from rl_agents.fileio import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# ---- settings ------------------------------------------------------------------------------------
ENVS = {
    # The demo's TextShop (explore 48 here, 40 there); experts need 4-5 turns. The full test splits: at 20
    # tasks (before 2026-12-02) one task was 5 points and no method separated from SFT.
    "textshop": dict(env_id="rl_agents/TextShop-v0", train_tasks=96, explore_tasks=48, eval_tasks=200,
                     max_turns=6, max_context=2048, envs_per_worker=32),
    # ALFWorld's two shortest task types (200 train games): on all six, SFT of the 135M model solved 0 of
    # 20 test games (2026-11-22), so every method would start from 0. ETO allows 40 turns; 20 here for
    # CPU. micro_batch_size 1: at 4 the trainer reached 15.3 GB and Ray's memory monitor killed it.
    "alfworld": dict(env_id="rl_agents/ALFWorld-v0", train_tasks=200, explore_tasks=32, eval_tasks=10,
                     max_turns=20, max_context=3072, envs_per_worker=16, micro_batch_size=1,
                     task_types=["pick_and_place_simple", "look_at_obj_in_light"]),
}
MAX_NEW_TOKENS = 64  # per agent turn (expert thought + action fit in ~45 tokens)
EXPLORE_T = 0.7  # the shared exploration, as the demo (the papers do not report it)
BEST_OF_T, BEST_OF_N = 0.7, 10  # ETO §4.1 / DMPO §5.3: N = 10; T not reported (`evaluate`'s default)
LORA = {"enabled": True, "r": 32, "alpha": 64,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
DEEPSPEED = {"enabled": True, "zero_stage": 2, "bf16": True}

# The papers fine-tune 7B/8B models fully at lr 1e-5 (SFT), 1e-6 (ETO/DMPO), 5e-7 (StepAgent); LoRA r=32
# on a 135M model for about one epoch needs ~100x larger rates: those of algorithms/demo.py and
# examples/*.yaml. `config`: the algorithm's config fields; `per_env`: those that differ by env;
# `shared`: reads the SFT agent's exploration. Preference losses: the demo's lr 5e-5 and β 0.5 (lr 2e-4
# with β 0.1 collapsed ETO on TextShop: README).
PREF_OPTIM = {"lr": 5e-5, "batch_size": 8, "micro_batch_size": 2, "epochs": 1}  # ETO §4.1: 1e-6, 32, 3 epochs
PREF_LOSS = {"beta": 0.5}
HPARAMS = {
    # ETO §4.1: lr 1e-5, batch 64, 3 epochs (StepAgent: 4); here 2 epochs (examples/sft_textshop.yaml).
    "sft": {"algo": "sft", "optim": {"lr": 1e-3, "batch_size": 16, "micro_batch_size": 4, "epochs": 2}},
    # ETO §4.1 baseline: SFT again on experts + own successes (no settings reported); from SFT, so 1 epoch.
    "rft": {"algo": "rft", "shared": True, "optim": {"lr": 1e-3, "batch_size": 16, "micro_batch_size": 4, "epochs": 1}},
    # StepAgent §6.2 baseline: trajectory DPO on one fixed set of pairs; β as ETO.
    "dpo": {"algo": "dpo", "shared": True, "config": {"loss": PREF_LOSS}, "optim": PREF_OPTIM},
    # ETO §4.1: β 0.1 (ALFWorld 0.5); 2 iterations (ALFWorld 1: with 1 and the shared exploration, ETO is DPO).
    "eto": {"algo": "eto", "shared": True, "iterations": 2, "config": {"loss": PREF_LOSS}, "optim": PREF_OPTIM},
    # DMPO §5.1 / released code: β 0.1 (here as ETO), γ 0.7, one round; noisy keeps degenerate lose
    # trajectories, clean drops them (§5). lr unreported: as ETO.
    "dmpo_noisy": {"algo": "dmpo", "shared": True, "optim": PREF_OPTIM,
                   "config": {"loss": {**PREF_LOSS, "gamma": 0.7}, "setting": "noisy"}},
    "dmpo_clean": {"algo": "dmpo", "shared": True, "optim": PREF_OPTIM,
                   "config": {"loss": {**PREF_LOSS, "gamma": 0.7}, "setting": "clean"}},
    # StepAgent §6.4: lr 5e-7, batch 16, 1 epoch, up to 3 practice samples, ~3 iterations, β unreported.
    # Here 1 sample, 1 iteration; ALFWorld: the first 8 steps of each plan.
    "step_dpo": {"algo": "step_dpo", "config": {"loss": PREF_LOSS, "practice_samples": 1},
                 "per_env": {"alfworld": {"max_steps_per_task": 8}}, "optim": PREF_OPTIM},
    # StepAgent-inverse: 7 iterations (Fig. 4a), up to 3 samples; here 2 and 2 (the per-prefix baseline's
    # minimum), lr 1e-4 (examples/*.yaml), T = 1 (policy-gradient samples come from the policy itself).
    "step_gail": {"algo": "step_gail", "iterations": 2, "config": {"practice_samples": 2},
                  "per_env": {"alfworld": {"max_steps_per_task": 8}}, "rollout": {"temperature": 1.0},
                  "optim": {"lr": 1e-4, "batch_size": 16, "micro_batch_size": 2, "epochs": 1}},
    # StepAgent-inverse with a trainable discriminator (#20): a LoRA adapter on D's backbone trains with
    # its head (the frozen one learned the action's verb, not the state: docs/results.md).
    "step_gail_lora": {"algo": "step_gail", "iterations": 2,
                       "config": {"practice_samples": 2,  # 1 epoch over 384-token windows: ~15 min an iteration
                                  "discriminator": {"backbone": "lora", "epochs": 1, "max_tokens": 384}},
                       "per_env": {"alfworld": {"max_steps_per_task": 8}}, "rollout": {"temperature": 1.0},
                       "optim": {"lr": 1e-4, "batch_size": 16, "micro_batch_size": 2, "epochs": 1}},
    # No paper reports PPO settings (docs/papers.md): examples/ppo_textshop.yaml's, 2 iterations (there 3).
    "ppo": {"algo": "ppo", "iterations": 2, "rollout": {"temperature": 1.0, "samples_per_task": 4},
            "optim": {"lr": 1e-4, "batch_size": 16, "micro_batch_size": 2, "epochs": 1}},
    # GRPO (DeepSeekMath §4.1) and GiGPO (Feng et al. 2025): as PPO (G = 4 episodes per task, 2 iterations,
    # T = 1), with their own advantages and loss aggregation (examples/{grpo,gigpo}_textshop.yaml).
    "grpo": {"algo": "grpo", "iterations": 2, "rollout": {"temperature": 1.0, "samples_per_task": 4},
             "optim": {"lr": 1e-4, "batch_size": 16, "micro_batch_size": 2, "epochs": 1}},
    "gigpo": {"algo": "gigpo", "iterations": 2, "rollout": {"temperature": 1.0, "samples_per_task": 4},
              "optim": {"lr": 1e-4, "batch_size": 16, "micro_batch_size": 2, "epochs": 1}},
}
LABELS = {"sft": "SFT", "rft": "RFT", "dpo": "DPO (fixed pairs)", "eto": "ETO", "dmpo_noisy": "DMPO (noisy)",
          "dmpo_clean": "DMPO (clean)", "step_dpo": "StepAgent-implicit", "step_gail": "StepAgent-inverse",
          "step_gail_lora": "StepAgent-inverse (LoRA D)", "ppo": "PPO", "grpo": "GRPO", "gigpo": "GiGPO",
          "best_of_n": "Best-of-N of SFT (oracle)"}
ALGOS = list(LABELS)
SPLITS = ("test_seen", "test_unseen")
MARK_START, MARK_END = "<!-- learning-benchmark:start -->", "<!-- learning-benchmark:end -->"


def resolve_hparams(algo: str, env_name: str, smoke: bool) -> dict:
    hp = {"iterations": 1, "shared": False, **copy.deepcopy(HPARAMS[algo])}
    hp["config"] = {**hp.get("config", {}), **hp.pop("per_env", {}).get(env_name, {})}
    hp["rollout"] = {"temperature": EXPLORE_T, **hp.get("rollout", {})}
    hp["optim"] = dict(hp["optim"], **({"epochs": 1} if smoke else {}))
    return hp


def env_settings(name: str, args) -> dict:
    env = dict(ENVS[name], name=name, env_kwargs={}, engine=args.engine)  # engine: not pinned (`settings`)
    for key in ("train_tasks", "explore_tasks", "eval_tasks"):
        env[key] = getattr(args, key) or (4 if args.smoke else env[key])
    env["max_turns"] = min(env["max_turns"], 4) if args.smoke else env["max_turns"]
    if name == "alfworld":  # type-balanced subsets: in ALFWorld's sorted order the first N tasks are one type
        env["env_kwargs"] = {"data_dir": str(Path(args.alfworld_data).expanduser()), "task_order": "interleaved",
                             "task_types": env["task_types"]}
    return env


def settings(env: dict, args) -> dict:
    """What a result depends on, as JSON reads it back."""
    return json.loads(json.dumps({
        "model": args.model, "best_of": args.best_of, "explore_temperature": EXPLORE_T,
        "max_new_tokens": MAX_NEW_TOKENS, "lora": LORA, "deepspeed": DEEPSPEED,
        "env": {k: v for k, v in env.items() if k not in ("env_kwargs", "engine")},
        "hparams": {a: resolve_hparams(a, env["name"], args.smoke) for a in HPARAMS}}))


def pin_settings(env: dict, args) -> None:
    """Write `<out>/<env>/settings.json` and the records' copy, or stop if one holds other settings."""
    current = settings(env, args)
    for path in (Path(args.out), *([Path(args.records)] if args.records else [])):
        path = path / env["name"] / "settings.json"
        if not path.exists():
            save(current, path)
        elif (old := json.loads(path.read_text())) != current:
            if _only_added_algorithms(old, current):  # a new algorithm's row: the old ones still hold
                save(current, path)
                continue
            diff = sorted(k for k in old.keys() | current.keys() if old.get(k) != current.get(k))
            sys.exit(f"{path}: results there were made with other settings (differs in {diff}); "
                     "use another --out / --records or delete that directory")


def _only_added_algorithms(old: dict, current: dict) -> bool:
    """`current` is `old` plus the hyperparameters of algorithms `old` did not have."""
    rest = lambda d: {k: v for k, v in d.items() if k != "hparams"}  # noqa: E731
    return rest(old) == rest(current) and all(current["hparams"].get(a) == hp for a, hp in old["hparams"].items())


def rollout(env: dict, **fields) -> dict:
    """The demo's rollout workers (`RolloutSection` fields): 2 actors × 0.5 CPU × 1 thread, `env["engine"]`."""
    return dict(num_workers=2, num_cpus_per_worker=0.5, threads_per_worker=1, envs_per_worker=env["envs_per_worker"],
                max_new_tokens=MAX_NEW_TOKENS, max_context=env["max_context"], engine=env["engine"], **fields)


def spec(hp: dict, env: dict, seed: int, run_dir: Path, model: str, threads: int, explore_data: str | None) -> dict:
    """The algorithm's config: `hp`'s iterations, evaluated once, after the last."""
    optim = {**hp["optim"], **({"micro_batch_size": env["micro_batch_size"]} if "micro_batch_size" in env else {})}
    return {"model": model, "run_dir": str(run_dir), "seed": seed, "iterations": hp["iterations"], "evaluate_every": 0,
            **hp["config"],
            "env": {"env_id": env["env_id"], "env_kwargs": env["env_kwargs"], "max_turns": env["max_turns"],
                    "train_tasks": env["train_tasks" if hp["algo"] == "sft" else "explore_tasks"],
                    "eval_splits": list(SPLITS), "eval_tasks": env["eval_tasks"]},
            "rollout": rollout(env, explore_data=explore_data, **hp["rollout"]),
            # The trainer's seed is train.seed + seed (`Algorithm.train_config`): LoRA init, data order.
            "train": {"num_workers": 1, "threads_per_worker": threads, "seed": seed, "deepspeed": DEEPSPEED,
                      "lora": LORA, "optim": optim}}


# ---- one run -------------------------------------------------------------------------------------
def workers(env: dict, seed: int) -> dict:
    """`evaluate`/`explore` arguments outside an algorithm: the demo's workers on the env, turns capped."""
    from rl_agents.rollout_group import RolloutSection

    return dict(rollout=RolloutSection(**rollout(env)), env_kwargs={**env["env_kwargs"], "max_turns": env["max_turns"]},
                max_new_tokens=MAX_NEW_TOKENS, seed=seed, verbose=False)


def shared_exploration(env: dict, seed: int, seed_dir: Path, policy: str, args) -> str:
    """The SFT agent's one exploration of the first `explore_tasks` train tasks (kept until SFT runs again)."""
    from rl_agents.evaluation import explore, summarize

    path, summary_path = seed_dir / "explore" / "explore.jsonl", seed_dir / "explore" / "summary.json"
    if not summary_path.exists():  # written after explore.jsonl
        t0 = time.perf_counter()
        trajs = explore(policy, env["env_id"], "train", n=env["explore_tasks"], temperature=EXPLORE_T, out_path=path,
                        **workers(env, seed))
        summary = {**summarize(trajs), "seconds": time.perf_counter() - t0}
        print(f"  shared exploration: success {summary['success_rate']:.1%}", flush=True)
        save(summary, summary_path, record(args, env["name"], seed, "explore"))
    return str(path)


def run(algo: str, env: dict, seed: int, seed_dir: Path, sft: dict | None, args) -> dict:
    """Run (env, seed, algo) from scratch: its result (or error) goes to result.json, a finished one to the records."""
    from algorithms.runner import get_algorithm
    from rl_agents.config import from_dict
    from rl_agents.evaluation import evaluate

    run_dir = seed_dir / algo
    shutil.rmtree(run_dir, ignore_errors=True)  # a crashed attempt
    if algo == "sft":
        shutil.rmtree(seed_dir / "explore", ignore_errors=True)  # made by an earlier SFT policy
    print(f"  {algo}: running", flush=True)
    t0 = time.perf_counter()
    try:
        if algo == "best_of_n":
            report = evaluate(sft["policy"], env["env_id"], list(SPLITS), n=env["eval_tasks"], best_of=args.best_of,
                              temperature=BEST_OF_T, out_path=run_dir / "eval.json",
                              trajectories_path=run_dir / "eval.jsonl", **workers(env, seed))
            result = {"policy": sft["policy"], "metrics": report["metrics"],
                      "per_task": {s: m["per_task"] for s, m in report["splits"].items()}}
        else:
            hp = resolve_hparams(algo, env["name"], args.smoke)
            data = shared_exploration(env, seed, seed_dir, sft["policy"], args) if hp["shared"] else None
            model = args.model if algo == "sft" else sft["policy"]
            trainer = from_dict(get_algorithm(hp["algo"]).config_class,
                                spec(hp, env, seed, run_dir, model, args.threads, data)).build()
            try:
                row = trainer.fit()[-1]  # its iterations, then one evaluation (evaluate_every 0)
            finally:
                trainer.stop()
            numbers = lambda d: {k: v for k, v in d.items() if isinstance(v, (int, float))}  # noqa: E731
            result = {"policy": trainer.policy, "metrics": numbers(row),
                      "per_task": {s: row[f"eval/{s}/per_task"] for s in SPLITS},
                      "history": [numbers(m) for m in trainer.history]}
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    # Provenance: which SFT run a result starts from (`sft_run_id`), so that results of another SFT
    # policy of the same seed are never mixed in silently (`seed_results`).
    result.update(env=env["name"], seed=seed, algo=algo, wall_s=time.perf_counter() - t0, run_id=uuid.uuid4().hex,
                  sft_run_id=None if algo == "sft" else sft.get("run_id"), engine=env["engine"],
                  finished=datetime.now().isoformat(timespec="seconds"))
    if algo == "sft" and not result.get("error"):
        result["policy_sha256"] = weights_sha256(result["policy"])
    elif algo != "sft":
        result["sft_policy_sha256"] = sft_digest(sft)
    save(result, run_dir / "result.json", None if result.get("error") else record(args, env["name"], seed, algo))
    print(f"  {algo}: " + (f"FAILED ({result['error'].splitlines()[0][:200]})" if result.get("error") else ", ".join(
        f"{s} success {result['metrics'][f'eval/{s}/success_rate']:.1%}" for s in SPLITS)), flush=True)
    return result


# ---- stored results: --out, then the records ------------------------------------------------------
def record(args, env_name: str, seed: int, name: str) -> Path | None:
    return Path(args.records) / env_name / f"seed{seed}" / f"{name}.json" if args.records else None


def save(data: dict, *paths: Path | None) -> None:
    for path in paths:
        if path is not None:
            atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def stored(*paths: Path | None) -> dict | None:
    """The first finished result among `paths` (other fields a record carries, e.g. digests: ignored)."""
    for path in paths:
        if path is not None and path.exists() and not (result := json.loads(path.read_text())).get("error"):
            return result
    return None


def weights_sha256(policy: str | os.PathLike) -> str | None:
    """Digest of a local policy's weights: its *.safetensors files, by name, in name order (None if none)."""
    files = sorted(Path(policy).glob("*.safetensors")) if "://" not in str(policy) else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def sft_digest(sft: dict | None) -> str | None:
    """The SFT result's weight digest: recorded, else computed from its weights where they are (older results)."""
    if not sft or sft.get("error"):
        return None
    if "policy_sha256" not in sft and sft.get("policy"):
        sft["policy_sha256"] = weights_sha256(sft["policy"])
    return sft.get("policy_sha256")


def other_sft(result: dict | None, sft: dict | None) -> str | None:
    """The id of the SFT run `result` was made from, when that is not `sft` (the SFT of its seed now) and
    `sft`'s weights are not byte-identical to the ones `result` started from."""
    made_from = (result or {}).get("sft_run_id")
    if not (made_from and sft and sft.get("run_id") and made_from != sft["run_id"]):
        return None
    digest = result.get("sft_policy_sha256")
    return None if digest and digest == sft_digest(sft) else made_from


def seed_results(env: dict, seed: int, args) -> dict[str, dict | None]:
    """Each algorithm's result for (env, seed): stored, else run now (not with --report). A stored result
    made from another SFT run than the seed's current one is run again; with --report it is shown,
    marked (`earlier_sft`)."""
    seed_dir = Path(args.out) / env["name"] / f"seed{seed}"
    results = {a: stored(seed_dir / a / "result.json", record(args, env["name"], seed, a)) for a in args.algos}
    for algo, result in results.items():
        if other_sft(result, results.get("sft")):
            results[algo] = {**result, "earlier_sft": result["sft_run_id"]} if args.report else None
    todo = [a for a in args.algos if results[a] is None]
    if todo and "sft" not in todo and not args.report and not stored(seed_dir / "sft" / "result.json"):
        todo.insert(0, "sft")  # recorded, but the others start from its weights
    for algo in args.algos:
        if not args.report and algo != "sft" and other_sft(results[algo], results["sft"]):  # the SFT run just replaced
            results[algo] = None
            todo.append(algo)
        if algo not in todo or args.report:
            print(f"  {algo}: " + ("not run" if algo in todo else "done before, skipped"), flush=True)
        elif algo != "sft" and (results["sft"] is None or results["sft"].get("error")):
            print(f"  {algo}: skipped, no SFT policy", flush=True)
        else:
            results[algo] = run(algo, env, seed, seed_dir, results["sft"], args)
    return results


# ---- report --------------------------------------------------------------------------------------
def mean_std(xs: list[float], fmt: str) -> str:
    if len(xs) < 2:
        return f"{xs[0]:{fmt}}" if xs else "-"
    return f"{statistics.fmean(xs):{fmt}} ± {statistics.stdev(xs):{fmt}}"


def per_task(result: dict, split: str) -> dict | list | None:
    """A result's per-task [reward, success]. Records made before those were kept (2026-12-02) hold rates
    only: 0/1 outcomes (reward = success, as ALFWorld's) are rebuilt from them, without task ids."""
    if (result.get("per_task") or {}).get(split):
        return result["per_task"][split]
    m, n = result["metrics"], result.get("num_tasks", {}).get(split)
    rate = m[f"eval/{split}/success_rate"]
    if not n or m[f"eval/{split}/avg_reward"] != rate or abs(rate * n - round(rate * n)) > 1e-6:
        return None
    return [[1.0, 1.0]] * round(rate * n) + [[0.0, 0.0]] * (n - round(rate * n))


def table_rows(results: dict, seeds: list[int], algos: list[str]) -> list[dict]:
    """results[(seed, algo)] -> one row per algorithm over its finished seeds, as `results_table` takes them."""
    rows = []
    for algo in algos:
        ok = {s: r for s in seeds if (r := results.get((s, algo))) and not r.get("error")}
        row = {"stage": LABELS[algo], "seeds": list(ok), "columns": {
            "seeds": f"{len(ok)}/{len(seeds)}", "wall (min)": mean_std([r["wall_s"] / 60 for r in ok.values()], ".1f")}}
        for split in SPLITS:
            found = [per_task(r, split) for r in ok.values()]
            if found and all(found):
                row[f"eval/{split}/per_task"] = found
            for key in ("avg_reward", "success_rate"):
                row[f"eval/{split}/{key}"] = [r["metrics"][f"eval/{split}/{key}"] for r in ok.values()]
        rows.append(row)
    return rows


def env_section(env: dict, rows: list[dict], results: dict, explored: list[dict], args) -> str:
    notes = [f"- {LABELS[a]}, seed {s}: " + ("not run" if r is None else f"failed: {r['error'].splitlines()[0][:300]}")
             for a in args.algos for s in args.seeds if (r := results.get((s, a))) is None or r.get("error")]
    notes += [f"- {LABELS[a]}, seed {s}: made from an earlier SFT run of seed {s} (`{r['earlier_sft']}`), not from "
              "the one in the SFT row (same settings)" for a in args.algos for s in args.seeds
              if (r := results.get((s, a))) and r.get("earlier_sft")]
    notes += [f"- {LABELS[a]}, seed {s}: rollouts (exploration and evaluation) with the vLLM engine" for a in args.algos
              for s in args.seeds if (r := results.get((s, a))) and not r.get("error") and r.get("engine") == "vllm"]
    text = f"### {env['name']} (`{env['env_id']}`)\n\n{results_table(rows, baseline='SFT')}\n"
    text += "\n".join(notes) + "\n\n" if notes else ""
    text += f"Task types: {', '.join(env['task_types'])} (ALFWorld's `task_types`).\n" if env.get("task_types") else ""
    text += (f"Tasks: SFT on the expert trajectories of the first {env['train_tasks']} train tasks; every other "
             f"algorithm from the SFT policy on the first {env['explore_tasks']}. Greedy evaluation on the first "
             f"{env['eval_tasks']} tasks of test_seen and test_unseen, at most {env['max_turns']} agent turns of "
             f"{MAX_NEW_TOKENS} new tokens, context {env['max_context']}. Seeds {', '.join(map(str, args.seeds))}; "
             f"wall = train + evaluation of one run (mean ± sample std over seeds).\n")
    if explored:
        text += (f"SFT agent's shared exploration (T = {EXPLORE_T}): success "
                 f"{mean_std([f['success_rate'] * 100 for f in explored], '.1f')}%, avg reward "
                 f"{mean_std([f['avg_reward'] for f in explored], '.3f')} over {len(explored)} seed(s), "
                 f"{mean_std([f['seconds'] / 60 for f in explored], '.1f')} min each.\n")
    lines = ["", "| algorithm | lr | batch | epochs | iterations | other |", "|---|---|---|---|---|---|"]
    for algo in args.algos:
        if algo == "best_of_n":
            lines.append(f"| {LABELS[algo]} | — | — | — | — | N = {args.best_of}, T = {BEST_OF_T} |")
            continue
        hp, other = resolve_hparams(algo, env["name"], args.smoke), []
        for k, v in {**hp["config"], **(hp["rollout"] if algo != "sft" else {})}.items():
            other += [f"{k}.{kk} {vv}" for kk, vv in v.items()] if isinstance(v, dict) else [f"{k} {v}"]
        o = hp["optim"]
        lines.append(f"| {LABELS[algo]} | {o['lr']:g} | {o['batch_size']} | {o['epochs']} | {hp['iterations']} | "
                     + ", ".join(other + ["shared exploration"] * hp["shared"]) + " |")
    return text + "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Put `text` between the markers in `path` (kept: the rest of the file; created if missing)."""
    block = f"{MARK_START}\n{text.rstrip()}\n{MARK_END}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if MARK_START in old and MARK_END in old:
        head, rest = old.split(MARK_START, 1)
        tail = rest.split(MARK_END, 1)[1].strip("\n")
        new = head + block + (f"\n{tail}\n" if tail else "")
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    atomic_write_text(path, new)


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", default="textshop,alfworld", help=f"comma list of {', '.join(ENVS)}")
    p.add_argument("--algos", default=",".join(ALGOS), help=f"comma list of {', '.join(ALGOS)} (sft always included)")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds")
    p.add_argument("--train-tasks", type=int, help="SFT's expert trajectories: first N train tasks (default per env)")
    p.add_argument("--explore-tasks", type=int, help="the first N train tasks the others train on (default per env)")
    p.add_argument("--eval-tasks", type=int, help="first N tasks of test_seen and of test_unseen (default per env)")
    p.add_argument("--best-of", type=int, default=BEST_OF_N, help=f"N of the Best-of-N row (default {BEST_OF_N})")
    p.add_argument("--out", default="runs/learning", help="run directories and result.json files")
    p.add_argument("--results", help="markdown file the tables are written into, between its markers (default "
                   "<out>/results.md; docs/results.md only when named: a run of some envs or algos would "
                   "replace its full tables with a partial one)")
    p.add_argument("--chart", help="bar chart PNG (default <out>/learning.png)")
    p.add_argument("--records", help="finished results as small JSON files to commit (default benchmarks/results/"
                   "learning; with --smoke <out>/records; '' for none)")
    p.add_argument("--model", default="smollm2-135m", help="base model: alias or local HF checkpoint dir")
    p.add_argument("--engine", default="hf", choices=("hf", "vllm"), help="rollout engine (vllm: run from "
                   ".venv-vllm; a result records its engine)")
    p.add_argument("--threads", type=int, default=2, help="CPU cores: Ray CPUs and the trainer's torch threads")
    p.add_argument("--alfworld-data", default=os.environ.get("ALFWORLD_DATA") or REPO.parent / "shared/data/alfworld",
                   help="the directory holding ALFWorld's json_2.1.1/ (default $ALFWORLD_DATA, else that)")
    p.add_argument("--report", action="store_true", help="run nothing: the tables and chart of the runs finished "
                   "so far, in --out or the records")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, 4 tasks, 1 epoch, Best-of-2, at most 4 "
                   "turns: every code path in minutes (numbers meaningless)")
    args = p.parse_args(argv)
    if args.records is None:  # smoke numbers are meaningless: never mixed into the committed records
        args.records = str(Path(args.out) / "records") if args.smoke else str(REPO / "benchmarks/results/learning")
    if args.smoke:
        args.model = "tiny-llama" if args.model == "smollm2-135m" else args.model
        args.best_of = 2 if args.best_of == BEST_OF_N else args.best_of
    if args.threads < 2:  # the rollout actors (1 CPU) stay up while the trainer (1 CPU) runs
        p.error("--threads: at least 2 (Ray CPUs for the rollout actors and the trainer)")
    args.envs, args.algos = [e for e in args.envs.split(",") if e], [a for a in args.algos.split(",") if a]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for name, given, valid in (("--envs", args.envs, ENVS), ("--algos", args.algos, ALGOS)):
        if bad := [x for x in given if x not in valid]:
            p.error(f"{name}: unknown {bad}; valid: {', '.join(valid)}")
    args.algos = [a for a in ALGOS if a == "sft" or a in args.algos]  # the table's order
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start, out = time.perf_counter(), Path(args.out)
    chart = Path(args.chart) if args.chart else out / "learning.png"
    if not args.report:
        from rl_agents.ray_utils import init_ray

        init_ray(num_cpus=args.threads)
    sections, tables, run_s = [], {}, 0.0
    try:
        for name in args.envs:
            env = env_settings(name, args)
            if not args.report:
                pin_settings(env, args)
            results, explored = {}, []
            for seed in args.seeds:
                print(f"\n=== {name}, seed {seed} (t = {(time.perf_counter() - start) / 60:.1f} min)", flush=True)
                results |= {(seed, a): r for a, r in seed_results(env, seed, args).items()}
                summary = out / name / f"seed{seed}" / "explore" / "summary.json"
                explored += [found] if (found := stored(summary, record(args, name, seed, "explore"))) else []
            run_s += sum(r["wall_s"] for r in results.values() if r) + sum(f["seconds"] for f in explored)
            tables[name] = table_rows(results, args.seeds, args.algos)
            sections.append(env_section(env, tables[name], results, explored, args))
    finally:
        if not args.report:  # --report starts no Ray (and leaves a caller's session alone)
            import ray

            ray.shutdown()
    results_chart(tables, chart)
    smoke = " (SMOKE: numbers meaningless)" if args.smoke else ""
    text = (f"## Learning benchmark\n\n`benchmarks/learning.py`{smoke}: every "
            f"algorithm from one SFT agent per seed, LoRA r={LORA['r']} on all linear layers, bf16 DeepSpeed "
            f"ZeRO-2 on Ray Train, model `{args.model}`.\n\n"
            f"- command: `{shlex.join(getattr(sys, 'orig_argv', sys.argv))}` ({datetime.now():%Y-%m-%d %H:%M}, "
            f"{platform.machine()}, {os.cpu_count()} CPU cores, {args.threads} used, no GPU)\n"
            f"- time: {run_s / 3600:.2f} h summed over the runs in these tables, "
            f"{(time.perf_counter() - start) / 60:.1f} min this invocation; chart: `{chart}`\n\n" + "\n".join(sections))
    print("\n" + text)
    markdown = Path(args.results) if args.results else out / "results.md"
    write_section(markdown, text)
    print(f"wrote {markdown}, {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
