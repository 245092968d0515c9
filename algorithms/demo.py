"""`make demo`: the main job on the embedded default env, SmolLM2-135M-Instruct on TextShop.

    base model --SFT on expert trajectories--> SFT agent --explore the train tasks once-->
        ETO (trajectory DPO, expert success vs the agent's failure of the same task)
        DMPO (the DMPO loss on the same pairs: expert = win, SFT agent's trajectory = lose)

then every agent is evaluated greedily on the same `test_seen` and `test_unseen` tasks and the
run prints a table like the papers' (average reward, success rate) and writes
`<out>/results.{md,json}` and `<out>/results.png`. Each stage is a real run of the
library (`algorithms.*Config(...).build().train()`: Ray rollout actors, a Ray Train + DeepSpeed
update, LoRA merged into safetensors), with its own run directory under `<out>/`.

Budget (2 CPU cores, no GPU), measured with the defaults on a quiet machine (25.0 min
in all): SFT of 96 expert trajectories 4.9 min (8 LoRA/bf16 steps of 12 trajectories); exploring
40 tasks 2.8 min (two 1-thread rollout actors, 20 episodes batched each); a DPO/DMPO step of 8
pairs ~1 min (4 steps each); greedy evaluation of one agent on 20 + 20 tasks 2.5 min (both splits
batched together). Agents act for at most `max_turns` = 6 turns (the expert needs 4-5). ETO runs
one explore-train iteration here (the paper's ETO uses 2 on WebShop: see
`examples/eto_textshop.yaml`); DMPO reuses that iteration's exploration, as the DMPO paper builds
its pairs from the SFT agent's trajectories, so the two losses see identical data and the same
optimiser settings.

Preference settings: LoRA lr 5e-5 and beta 0.5. With lr 2e-4 and beta 0.1 (ETO's beta, with an
lr scaled for LoRA) ETO collapsed: 23 of 60 lose trajectories ended with the same `click[Buy Now]` turn
as their expert, DPO pushed that shared turn down and the agent stopped buying (docs/benchmarks.md, "The demo").
"""

from __future__ import annotations

import json
import time
from datetime import date
from pathlib import Path

ENV_ID = "rl_agents/TextShop-v0"
LORA = {"enabled": True, "r": 32, "alpha": 64,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _common(args, run_dir: Path, model: str) -> dict:
    """Config sections shared by every stage (as a dict for `from_dict`: validated like a YAML)."""
    return {
        "model": model, "run_dir": str(run_dir), "seed": args.seed,
        "env": {"env_id": ENV_ID, "train_tasks": args.explore_tasks, "max_turns": args.max_turns,
                "eval_tasks": args.eval_tasks},
        # Two 1-thread actors: small decode steps scale badly across threads (OpenMP barriers), two
        # processes do not. They reserve half a CPU each: they sit idle while the update runs.
        "rollout": {"engine": args.engine, "num_workers": 2, "num_cpus_per_worker": 0.5, "threads_per_worker": 1,
                    "envs_per_worker": args.envs, "max_new_tokens": 64, "temperature": args.temperature},
        "train": {"num_workers": 1, "threads_per_worker": args.threads,
                  "deepspeed": {"enabled": True, "zero_stage": 2, "bf16": True}, "lora": LORA},
    }


def _stage(name: str, start: float) -> None:
    print(f"\n=== {name} (t = {(time.perf_counter() - start) / 60:.1f} min) ===", flush=True)


def _train(config_cls, spec: dict):
    """Build, run the driver loop without evaluation (`Algorithm.fit`), stop; return (policy dir, last metrics)."""
    from rl_agents.config import from_dict

    algo = from_dict(config_cls, spec).build()
    try:
        algo.fit(evaluate=False)
    finally:
        algo.stop()
    return algo.policy, algo.history[-1]


def _evaluate(policies: dict[str, str], args, out: Path) -> list[dict]:
    """Greedy evaluation of every policy on the same tasks, one rollout group (weights swapped)."""
    from rl_agents.config import from_dict
    from rl_agents.evaluation import evaluate
    from rl_agents.rollout_group import RolloutSection

    first = next(iter(policies.values()))
    rollout = from_dict(RolloutSection, _common(args, out, first)["rollout"])
    rows = []
    with rollout.make_group(first, ENV_ID, env_kwargs={"max_turns": args.max_turns}, split="test_seen") as group:
        for stage, policy in policies.items():
            if policy != first or rows:
                group.update_weights(policy)
            n = args.base_eval_tasks if stage == "base" else args.eval_tasks
            report = evaluate(policy, ENV_ID, ["test_seen", "test_unseen"], n=n, group=group,
                              max_new_tokens=64, seed=args.seed, verbose=False,
                              out_path=out / "eval" / f"{stage}.json",
                              trajectories_path=out / "eval" / f"{stage}.jsonl")
            rows.append({"stage": stage, "policy": policy, **report["metrics"],
                         **{f"eval/{s}/num_tasks": m["num_tasks"] for s, m in report["splits"].items()},
                         **{f"eval/{s}/per_task": m["per_task"] for s, m in report["splits"].items()}})
            print(f"{stage:>6}: " + ", ".join(f"{s} reward {m['avg_reward']:.3f} success {m['success_rate']:.1%}"
                                              for s, m in report["splits"].items()), flush=True)
    return rows


def main(args) -> int:
    import ray

    from rl_agents.ray_utils import init_ray

    started = init_ray(num_cpus=args.threads)
    try:
        return _run(args)
    finally:
        if started:
            ray.shutdown()


def _run(args) -> int:
    from algorithms.preference import DMPOConfig, ETOConfig
    from algorithms.imitation import SFTConfig
    from algorithms.results import results_table, write_results
    from envs.checker import check_text_env
    from rl_agents.models import resolve_model
    from rl_agents.trajectory import atomic_write_text

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0

    _stage(f"0/4 check the env, load {args.model}", start)
    t0 = time.perf_counter()
    print(check_text_env(ENV_ID, n_actions=1_000).summary())
    base = resolve_model(args.model)
    lap("setup", t0)

    _stage(f"1/4 SFT on {args.sft_tasks} expert trajectories", start)
    t0 = time.perf_counter()
    sft_spec = _common(args, out / "sft", base)
    sft_spec["env"]["train_tasks"] = args.sft_tasks
    sft_spec["train"]["optim"] = {"lr": 1e-3, "batch_size": 12, "micro_batch_size": 4, "epochs": args.sft_epochs}
    sft_policy, _ = _train(SFTConfig, sft_spec)
    lap("sft", t0)

    pref_optim = {"lr": args.pref_lr, "batch_size": 8, "micro_batch_size": 2, "epochs": args.pref_epochs}
    _stage("2/4 ETO: explore the train tasks with the SFT agent, pair failures with experts, DPO", start)
    t0 = time.perf_counter()
    eto_spec = _common(args, out / "eto", sft_policy)
    eto_spec.update(loss={"beta": args.beta}, iterations=args.eto_iterations)
    eto_spec["train"]["optim"] = dict(pref_optim)
    eto_policy, eto_metrics = _train(ETOConfig, eto_spec)
    lap("eto", t0)

    _stage("3/4 DMPO on the same exploration (noisy setting, gamma 0.7)", start)
    t0 = time.perf_counter()
    dmpo_spec = _common(args, out / "dmpo", sft_policy)
    dmpo_spec.update(loss={"beta": args.beta, "gamma": 0.7}, setting="noisy", iterations=1)
    dmpo_spec["rollout"]["explore_data"] = str(out / "eto" / "trajectories" / "explore_iter0.jsonl")
    dmpo_spec["train"]["optim"] = dict(pref_optim)
    dmpo_policy, _ = _train(DMPOConfig, dmpo_spec)
    lap("dmpo", t0)

    _stage(f"4/4 evaluate SFT / ETO / DMPO on {args.eval_tasks} test_seen + {args.eval_tasks} test_unseen tasks "
           f"(base: {args.base_eval_tasks} + {args.base_eval_tasks})", start)
    t0 = time.perf_counter()
    rows = _evaluate({"base": base, "SFT": sft_policy, "ETO": eto_policy, "DMPO": dmpo_policy}, args, out)
    lap("eval", t0)

    total = time.perf_counter() - start
    table = results_table(rows, baseline="SFT")
    explored = {k: v for k, v in eto_metrics.items() if k.startswith(("explore/", "data/"))}
    details = (f"SmolLM2-135M-Instruct on {ENV_ID}, LoRA r=32, bf16 DeepSpeed ZeRO-2 on Ray Train, "
               f"{args.engine} rollout engine; "
               f"{args.sft_tasks} train tasks, greedy eval with at most {args.max_turns} turns, seed {args.seed}.\n"
               f"SFT agent's exploration (T={args.temperature}): " +
               ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in explored.items()) + "\n"
               "time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) +
               f"; total {total / 60:.1f} min ({date.today().isoformat()})\n")
    write_results(out, rows, title="rl_agents demo: base / SFT / ETO / DMPO", baseline="SFT", note="\n" + details)
    atomic_write_text(out / "results.json", json.dumps({"rows": rows, "timings_s": timings, "total_s": total,
                                                        "exploration": explored, "args": vars(args) | {"func": None}},
                                                       indent=2, default=str))
    print("\n" + table + "\n" + details)
    print(f"wrote {out / 'results.md'}, {out / 'results.png'}; per-stage run dirs under {out}/")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--model", default="smollm2-135m", help="base model: an alias or an HF checkpoint dir")
    parser.add_argument("--sft-tasks", type=int, default=96, help="train tasks whose expert trajectories SFT learns")
    parser.add_argument("--sft-epochs", type=int, default=1)
    parser.add_argument("--explore-tasks", type=int, default=40,
                        help="the first N of those the SFT agent explores (ETO/DMPO pairs)")
    parser.add_argument("--eval-tasks", type=int, default=20, help="tasks per test split")
    parser.add_argument("--base-eval-tasks", type=int, default=5,
                        help="tasks per test split for the base model (it never follows the format: "
                             "every episode runs to the turn limit)")
    parser.add_argument("--eto-iterations", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.5,
                        help="DPO/DMPO beta: 0.5 keeps the agent near the SFT policy (0.1 collapsed ETO here)")
    parser.add_argument("--pref-lr", type=float, default=5e-5,
                        help="ETO/DMPO learning rate (LoRA; 2e-4 collapsed ETO here, see README)")
    parser.add_argument("--pref-epochs", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.7, help="exploration temperature")
    parser.add_argument("--max-turns", type=int, default=6, help="agent turns per episode (the expert needs 4-5)")
    parser.add_argument("--envs", type=int, default=32, help="episodes batched per generate call")
    parser.add_argument("--threads", type=int, default=2, help="CPU cores to use (Ray CPUs, trainer threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="rollout engine: hf, or vllm (CPU: run the demo in .venv-vllm, `make install-vllm`: "
                             ".venv-vllm/bin/python -m algorithms.cli demo --engine vllm)")
