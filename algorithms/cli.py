"""`rl-agents` command line (also `python -m algorithms.cli`, what `ray job submit` runs).

    rl-agents env list
    rl-agents env check ENV_ID [--actions N] [--experts K]
    rl-agents env play ENV_ID [--split S] [--task ID]
    rl-agents data experts ENV_ID --split train --limit N --out FILE.jsonl [--format rl_agents|conversation]
    rl-agents data convert IN OUT --to rl_agents|conversation    (trajectories, or preference pairs: ETO's format)
    rl-agents train CONFIG.yaml [key=value ...]
    rl-agents eval --model PATH --env ENV_ID --split test_seen [--n N] [--best-of K]
    rl-agents explore --model PATH --env ENV_ID --split train --n N --out FILE.jsonl
    rl-agents demo
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym

import envs  # noqa: F401  (registers the built-in envs)
from envs.base import TaskIdError
from rl_agents.config import ConfigError
from rl_agents.fileio import WriteError
from rl_agents.trajectory import TrajectoryFormatError


def _env_kwargs(args) -> dict:
    kwargs = {}
    for item in getattr(args, "env_arg", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--env-arg expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def _make(env_id: str, **kwargs) -> gym.Env:
    """`gym.make`, accepting Gymnasium's `module:EnvId` form (imports the module that registers it)."""
    if ":" in env_id:
        return gym.make(env_id, **kwargs)
    if env_id not in gym.registry:
        known = sorted(k for k in gym.registry if k.startswith("rl_agents/"))
        raise SystemExit(f"unknown env {env_id!r}; registered rl_agents envs: {known}")
    return gym.make(env_id, **kwargs)


# ---- env ------------------------------------------------------------------------------------
def cmd_env_list(args) -> int:
    rows = []
    for env_id in sorted(k for k in gym.registry if k.startswith("rl_agents/")):
        spec = gym.registry[env_id]
        status = "ok"
        try:
            mod, _, cls = str(spec.entry_point).partition(":")
            obj = getattr(__import__(mod, fromlist=[cls]), cls)
            doc = (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""
        except ImportError as e:  # an optional extra is missing
            doc, status = "", f"unavailable: {e}"
        rows.append((env_id, str(spec.entry_point), status, doc))
    width = max(len(r[0]) for r in rows)
    for env_id, entry, status, doc in rows:
        print(f"{env_id:<{width}}  {entry:<32}  {status:<6}  {doc}")
    return 0


def cmd_env_check(args) -> int:
    from envs.checker import check_text_env

    _make(args.env_id).close()  # fail fast on an unknown id
    report = check_text_env(args.env_id, n_actions=args.actions, n_experts=args.experts, seed=args.seed,
                            env_kwargs=_env_kwargs(args), progress=True)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_env_play(args, input_fn: Callable[[str], str] = input) -> int:
    """A human plays the env. `:expert` shows the expert's next action, `:quit` leaves."""
    env = _make(args.env_id, split=args.split, **_env_kwargs(args))
    base = env.unwrapped
    try:
        obs, info = env.reset(seed=args.seed, options={"task_id": args.task} if args.task else None)
        print(f"task {info['task_id']} ({args.split}), turn budget {info.get('max_turns')}")
        print(f"actions: {base.action_help}" if base.action_help else "")
        print(f"\n{obs}")
        expert: list = []
        try:
            expert = [s.action for s in base.expert_steps(info["task_id"])]
        except NotImplementedError:
            pass
        history: list[str] = []
        while True:
            try:
                action = input_fn("\n> ")
            except EOFError:
                break
            if action.strip() == ":quit":
                break
            if action.strip() == ":expert":
                # The expert's plan from the start; valid while the player followed it.
                nxt = expert[len(history)] if len(history) < len(expert) and expert[:len(history)] == history else None
                print(f"expert next: {nxt}" if nxt else "expert: no suggestion from this state")
                continue
            history.append(action)
            obs, reward, terminated, truncated, info = env.step(action)
            print(f"\n{obs}\n[reward {reward:+.3f} | total {info['reward_total']:.3f} | score {info['score']}]")
            if terminated or truncated:
                print(f"episode {'ended' if terminated else 'truncated'}: final reward {info['reward_total']:.3f}, "
                      f"{'won' if info['won'] else 'not won'}")
                break
    finally:
        env.close()
    return 0


# ---- data -----------------------------------------------------------------------------------
def cmd_data_experts(args) -> int:
    from rl_agents.experts import iter_expert_trajectories
    from rl_agents.trajectory import write_conversations, write_jsonl

    _make(args.env_id).close()
    trajs = list(iter_expert_trajectories(args.env_id, args.split, args.limit, env_kwargs=_env_kwargs(args)))
    (write_conversations if args.format == "conversation" else write_jsonl)(args.out, trajs)
    full = sum(t.reward >= 1.0 - 1e-9 for t in trajs)
    print(f"wrote {len(trajs)} expert trajectories to {args.out}: {full}/{len(trajs)} reach reward 1.0, "
          f"mean turns {sum(t.num_steps for t in trajs) / max(len(trajs), 1):.1f}")
    return 0 if full == len(trajs) else 1


def cmd_data_convert(args) -> int:
    from rl_agents.trajectory import (is_pairs_file, read_pairs, read_trajectories, write_conversations,
                                      write_eto_pairs, write_jsonl, write_pairs)

    # Errors (file:line, field) come before any write.
    if is_pairs_file(args.inp):
        pairs = read_pairs(args.inp, env_id=args.env_id or "")
        if args.to == "conversation":
            write_eto_pairs(args.out, pairs)  # a pair it cannot hold is an error naming its file:line
        else:
            for traj in (t for pair in pairs for t in pair):
                traj.metadata.pop("source_line", None)
            write_pairs(args.out, pairs)
        print(f"wrote {len(pairs)} preference pairs to {args.out} "
              f"({'ETO pair format' if args.to == 'conversation' else 'rl_agents'})")
        return 0
    trajs = read_trajectories(args.inp, env_id=args.env_id or "", record_source=False)
    (write_conversations if args.to == "conversation" else write_jsonl)(args.out, trajs)
    print(f"wrote {len(trajs)} trajectories to {args.out} ({args.to})")
    return 0


def cmd_train(args) -> int:
    from algorithms.runner import load_algorithm_config, preflight, run
    from rl_agents.config import ConfigError

    try:
        cfg = load_algorithm_config(args.config, args.overrides)
        preflight(cfg)
    except ConfigError as e:  # before any work starts
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        rows = run(cfg, evaluate_base=not args.no_start_eval)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {_where_stopped(cfg)}; re-run the same command to resume", file=sys.stderr)
        return 130
    except ConfigError as e:  # found while resuming: a run_dir holding another config, a bad state.json
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((Path(cfg.run_dir) / "results.md").read_text() if rows else "no results")
    return 0


def _where_stopped(cfg) -> str:
    """'runs/x stopped in iteration 2 of 3 (1 finished, kept in runs/x/state.json)'."""
    state = Path(cfg.run_dir) / "state.json"
    try:
        done = json.loads(state.read_text())["iteration"]
    except (OSError, ValueError, KeyError):
        done = 0
    if done >= cfg.iterations:
        return f"{cfg.run_dir} stopped after its {done} iterations, in the final evaluation"
    kept = f", kept in {state}" if done else ""
    return (f"{cfg.run_dir} stopped in iteration {done + 1} of {cfg.iterations} ({done} finished{kept}; "
            f"its training resumes from its last checkpoint, every train.checkpoint_every="
            f"{cfg.train.checkpoint_every} steps)")


def _rollout(args):
    """`eval`/`explore`'s workers; a bad value's error names the flag the user gave."""
    from rl_agents.config import ConfigError
    from rl_agents.rollout_group import RolloutSection

    try:
        return RolloutSection(num_workers=args.workers, envs_per_worker=args.envs_per_worker,
                              max_new_tokens=args.max_new_tokens)
    except ConfigError as e:
        flags = {"rollout.num_workers": "--workers", "rollout.envs_per_worker": "--envs-per-worker",
                 "rollout.max_new_tokens": "--max-new-tokens"}
        key, _, rest = str(e).partition(":")
        if key == "rollout.max_context":
            raise ConfigError(f"--max-new-tokens: must be < the episodes' context (2048 tokens), "
                              f"got {args.max_new_tokens}") from None
        raise ConfigError(f"{flags.get(key, key)}:{rest}") from None


def cmd_eval(args) -> int:
    from rl_agents.evaluation import evaluate

    evaluate(args.model, args.env, args.split, n=args.n, best_of=args.best_of, rollout=_rollout(args),
             max_new_tokens=args.max_new_tokens, seed=args.seed, out_path=args.out,
             trajectories_path=args.trajectories, env_kwargs=_env_kwargs(args))
    return 0


def cmd_explore(args) -> int:
    from rl_agents.evaluation import explore

    explore(args.model, args.env, args.split, n=args.n, out_path=args.out, samples_per_task=args.samples,
            temperature=args.temperature, rollout=_rollout(args), max_new_tokens=args.max_new_tokens,
            seed=args.seed, env_kwargs=_env_kwargs(args))
    return 0


def cmd_demo(args) -> int:
    from algorithms.demo import main as demo_main

    return demo_main(args)


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rl-agents", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    env_p = sub.add_parser("env", help="list, check and play environments").add_subparsers(dest="env_cmd", required=True)
    env_p.add_parser("list", help="registered environments").set_defaults(func=cmd_env_list)
    c = env_p.add_parser("check", help="gymnasium check_env + our text-env checks")
    c.add_argument("env_id")
    c.add_argument("--actions", type=int, default=10_000, help="random/adversarial actions to try")
    c.add_argument("--experts", type=int, default=5, help="train tasks whose expert must reach reward 1.0")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_env_check)
    pl = env_p.add_parser("play", help="play an env in the terminal (:expert for a hint, :quit to leave)")
    pl.add_argument("env_id")
    pl.add_argument("--split", default="train")
    pl.add_argument("--task", default=None, help="task id (default: drawn with --seed)")
    pl.add_argument("--seed", type=int, default=None)
    pl.set_defaults(func=cmd_env_play)
    for sp in (c, pl):
        sp.add_argument("--env-arg", action="append", metavar="KEY=VALUE", help="constructor argument (repeatable)")

    data_p = sub.add_parser("data", help="expert data and format conversion").add_subparsers(dest="data_cmd", required=True)
    e = data_p.add_parser("experts", help="write expert trajectories (replayed in the env) to JSONL")
    e.add_argument("env_id")
    e.add_argument("--split", default="train")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--out", required=True)
    e.add_argument("--format", choices=["rl_agents", "conversation"], default="rl_agents",
                   help="rl_agents JSONL, or ETO/FastChat conversations")
    e.add_argument("--env-arg", action="append", metavar="KEY=VALUE", help="constructor argument (repeatable)")
    e.set_defaults(func=cmd_data_experts)
    cv = data_p.add_parser("convert", help="convert trajectories between rl_agents JSONL and ETO/FastChat "
                                            "conversations, or preference pairs between ours and ETO's pair format")
    cv.add_argument("inp")
    cv.add_argument("out")
    cv.add_argument("--to", choices=["rl_agents", "conversation"], required=True,
                    help="conversation: ETO/FastChat conversations (trajectories) or ETO's prompt/chosen/rejected (pairs)")
    cv.add_argument("--env-id", default=None, help="env id to record when importing conversations")
    cv.set_defaults(func=cmd_data_convert)

    t = sub.add_parser("train", help="run an algorithm from a YAML config "
                                     "(algo: sft|rft|eto|dmpo|dpo|step_dpo|step_gail|ppo)")
    t.add_argument("config")
    t.add_argument("--no-start-eval", action="store_true",
                   help="skip evaluating the starting policy (the table's 'start' row) before iteration 1")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.optim.lr=1e-6")
    t.set_defaults(func=cmd_train)
    for name, fn, helptext in (("eval", cmd_eval, "evaluate a model (greedy, or oracle Best-of-N)"),
                               ("explore", cmd_explore, "sample trajectories with a model, write JSONL")):
        ev = sub.add_parser(name, help=helptext)
        ev.add_argument("--model", required=True, help="HF checkpoint dir or alias (smollm2-135m, tiny-llama)")
        ev.add_argument("--env", required=True)
        ev.add_argument("--split", default="test_seen" if name == "eval" else "train",
                        help="split(s), comma-separated" if name == "eval" else "split")
        ev.add_argument("--n", type=int, default=None, help="first N tasks per split")
        ev.add_argument("--workers", type=int, default=1)
        ev.add_argument("--envs-per-worker", type=int, default=8)
        ev.add_argument("--max-new-tokens", type=int, default=128)
        ev.add_argument("--seed", type=int, default=0)
        ev.add_argument("--env-arg", action="append", metavar="KEY=VALUE", help="env constructor argument")
        if name == "eval":
            ev.add_argument("--best-of", type=int, default=1, help="oracle Best-of-N (sampled at temperature 0.7)")
            ev.add_argument("--out", default=None, help="JSON report path")
            ev.add_argument("--trajectories", default=None, help="also write the trajectories (JSONL)")
        else:
            ev.add_argument("--out", required=True)
            ev.add_argument("--samples", type=int, default=1, help="samples per task")
            ev.add_argument("--temperature", type=float, default=1.0)
        ev.set_defaults(func=fn)

    d = sub.add_parser("demo", help="the main job: SmolLM2 on TextShop, SFT then ETO and DMPO, evaluated")
    from algorithms.demo import add_arguments

    add_arguments(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `train CONFIG --flag k=v`: argparse ends the overrides list at the flag; take the rest back
        if getattr(args, "func", None) is cmd_train and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (TrajectoryFormatError, TaskIdError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
