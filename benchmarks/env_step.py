"""Step time of our ScienceWorld and ALFWorld envs vs the raw simulators and ETO-style wrappers.

    python benchmarks/env_step.py [--repeats 3] [--sciworld-tasks 4] [--alfworld-tasks 4]
                                  [--alfworld-data DIR] [--skip sciworld|alfworld]

Contenders replay the same expert action sequences (our `expert_steps`: ScienceWorld gold
paths, ALFWorld gt_traj.json) side by side: at every step each contender steps once, in an
order that rotates from step to step, so machine noise hits all of them alike. Only `step` is
timed (resets are not).

ScienceWorld (one JVM each):
  raw          the simulator itself: `server.step(a)` + `getScore()` + `getCompleted()`, the
               least any wrapper must ask; default JVM
  raw-det      the same on a JVM started with our determinism options (-XX:hashCode=2)
  ours-fast    ScienceWorldEnv(deterministic=False): same JVM as `raw`
  ours         ScienceWorldEnv() (default: deterministic JVM)
  eto-style    scienceworld's own `ScienceWorldEnv.step`, as ETO's released env calls it: it also
               builds the valid-action list, look, inventory and task texts at every step
ALFWorld:
  raw          textworld's PDDL engine (`PddlEnv.step`), ALFWorld's names
  ours         ALFWorldEnv
  eto-style    a `textworld.gym` env requesting admissible commands at every step, built as
               ALFWorld's `AlfredTWEnv.init_env` (which ETO uses) builds it

Prints a table per env, then one JSON line with mean and median ms and their ratios (the machine
these run on is shared: means carry its hiccups, medians less so).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ---- ScienceWorld contenders ---------------------------------------------------------------
class SciRaw:
    def __init__(self, deterministic: bool):
        from envs.sciworld import start_simulator

        self.sim = start_simulator(deterministic)

    def reset(self, task_id: str) -> None:
        from envs.sciworld import ETO_SIMPLIFICATIONS, parse_task_id, task_simplifications

        name, variation = parse_task_id(task_id)
        self.sim.load(name, variation, task_simplifications(ETO_SIMPLIFICATIONS, name))  # as our env
        self.sim.server.step("look around")

    def step(self, action: str) -> bool:
        server = self.sim.server
        server.step(action)
        score = server.getScore()
        return bool(server.getCompleted()) or score < 0

    def close(self) -> None:
        self.sim.close()
        self.sim._gateway.java_process.wait(timeout=10)
        self.sim.close = lambda: None


class SciETO(SciRaw):
    def __init__(self):
        super().__init__(deterministic=False)

    def reset(self, task_id: str) -> None:
        from envs.sciworld import parse_task_id

        name, variation = parse_task_id(task_id)
        self.sim.load(name, variation, "easy")  # ETO's eval_agent, verbatim
        self.sim.reset()

    def step(self, action: str) -> bool:
        _, _, done, info = self.sim.step(action)
        assert info["valid"]  # the list ETO-style wrappers ask for at every step
        return done


class Ours:
    def __init__(self, env):
        self.env = env

    def reset(self, task_id: str) -> None:
        self.env.reset(options={"task_id": task_id})

    def step(self, action: str) -> bool:
        _, _, term, trunc, _ = self.env.step(action)
        return term or trunc

    def close(self) -> None:
        self.env.close()


# ---- ALFWorld contenders -------------------------------------------------------------------
class AlfRaw:
    def __init__(self, data_dir: Path):
        import textworld
        from textworld.envs.pddl import PddlEnv

        self.json_dir = data_dir / "json_2.1.1"
        self.env = PddlEnv(textworld.EnvInfos(won=True))
        self.loaded = None

    def reset(self, task_id: str) -> None:
        from envs.alfworld import demangle_names

        if self.loaded != task_id:
            self.env.load(str(self.json_dir / task_id / "game.tw-pddl"))
            demangle_names(self.env._entity_infos)
            self.loaded = task_id
        self.env.reset()

    def step(self, action: str) -> bool:
        _, _, done = self.env.step(action)
        return done

    def close(self) -> None:
        self.env.close()


class AlfETO:
    """`AlfredTWEnv.init_env`: textworld.gym, admissible commands requested, demangling wrapper."""

    def __init__(self, data_dir: Path):
        self.json_dir = data_dir / "json_2.1.1"
        self.env = None

    def reset(self, task_id: str) -> None:
        import textworld
        import textworld.gym

        from envs.alfworld import demangle_names

        class AlfredDemangler(textworld.core.Wrapper):
            def load(self, *args, **kwargs):
                super().load(*args, **kwargs)
                demangle_names(self._entity_infos)

        if self.env is not None:
            self.env.close()
        infos = textworld.EnvInfos(won=True, admissible_commands=True)
        env_id = textworld.gym.register_games([str(self.json_dir / task_id / "game.tw-pddl")], infos,
                                              batch_size=1, asynchronous=True, max_episode_steps=10_000,
                                              wrappers=[AlfredDemangler])
        self.env = textworld.gym.make(env_id)
        self.env.reset()

    def step(self, action: str) -> bool:
        _, _, dones, infos = self.env.step([action])
        assert infos["admissible_commands"][0]
        return dones[0]

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


# ---- the measurement -----------------------------------------------------------------------
def side_by_side(contenders: dict, episodes: list[tuple[str, list[str]]], repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each contender, stepping the same actions in rotating order."""
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    k = 0
    for _ in range(repeats):
        for task_id, actions in episodes:
            for n in names:
                contenders[n].reset(task_id)
            live = set(names)
            for action in actions:
                order = names[k % len(names):] + names[:k % len(names)]
                k += 1
                for n in order:
                    if n not in live:
                        continue
                    t0 = time.perf_counter()
                    done = contenders[n].step(action)
                    times[n].append(time.perf_counter() - t0)
                    if done:
                        live.discard(n)
    return times


def report(title: str, times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Print the table; return mean and median ms per contender."""
    stats = {n: {"mean": statistics.fmean(t) * 1000, "median": statistics.median(t) * 1000} for n, t in times.items()}
    base = stats[baseline]
    print(f"\n{title}: ms per step (same actions, interleaved)")
    print(f"  {'contender':<12}{'mean':>9}{'median':>9}{'p90':>9}{'steps':>7}"
          f"{'mean/' + baseline:>10}{'med/' + baseline:>10}")
    for n, t in times.items():
        ms = sorted(x * 1000 for x in t)
        print(f"  {n:<12}{stats[n]['mean']:>9.2f}{stats[n]['median']:>9.2f}{ms[int(0.9 * (len(ms) - 1))]:>9.2f}"
              f"{len(ms):>7}{stats[n]['mean'] / base['mean']:>10.2f}{stats[n]['median'] / base['median']:>10.2f}")
    return stats


def ratios(stats: dict, pairs: dict[str, tuple[str, str]]) -> dict[str, dict[str, float]]:
    return {key: {s: stats[a][s] / stats[b][s] for s in ("mean", "median")} for key, (a, b) in pairs.items()}


def bench_sciworld(n_tasks: int, repeats: int) -> dict:
    from envs.sciworld import ScienceWorldEnv

    tasks = ["task-1-boil:4", "task-5-chemistry-mix:0", "task-2a-test-conductivity:412", "task-3-find-animal:0",
             "task-10-use-thermometer:45", "task-4-grow-plant:29"][:n_tasks]
    contenders = {}
    try:
        contenders["raw"] = SciRaw(deterministic=False)
        contenders["raw-det"] = SciRaw(deterministic=True)
        contenders["ours-fast"] = Ours(ScienceWorldEnv(deterministic=False))
        contenders["ours"] = Ours(ScienceWorldEnv())
        contenders["eto-style"] = SciETO()
        episodes = [(t, [s.action for s in contenders["ours"].env.expert_steps(t)]) for t in tasks]
        side_by_side(contenders, episodes[:1], 1)  # warm-up: JIT, class loading
        stats = report("ScienceWorld", side_by_side(contenders, episodes, repeats), "raw")
    finally:
        for c in contenders.values():
            c.close()
    return {"ms": stats, **ratios(stats, {
        "ours_fast_over_raw": ("ours-fast", "raw"), "ours_over_raw_det": ("ours", "raw-det"),
        "ours_over_raw": ("ours", "raw"), "eto_over_ours": ("eto-style", "ours"),
        "eto_over_ours_fast": ("eto-style", "ours-fast")})}


def bench_alfworld(data_dir: Path, n_tasks: int, repeats: int) -> dict:
    from envs.alfworld import ALFWorldEnv, task_type

    ours = ALFWorldEnv(data_dir=data_dir)
    by_type: dict[str, str] = {}
    for t in ours.list_tasks("train"):
        by_type.setdefault(task_type(t), t)
    tasks = list(by_type.values())[:n_tasks]
    contenders = {"raw": AlfRaw(data_dir), "ours": Ours(ours), "eto-style": AlfETO(data_dir)}
    try:
        episodes = [(t, [s.action for s in ours.expert_steps(t)]) for t in tasks]
        stats = report("ALFWorld", side_by_side(contenders, episodes, repeats), "raw")
    finally:
        for c in contenders.values():
            c.close()
    return {"ms": stats, **ratios(stats, {"ours_over_raw": ("ours", "raw"), "eto_over_ours": ("eto-style", "ours")})}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sciworld-tasks", type=int, default=4)
    parser.add_argument("--alfworld-tasks", type=int, default=4)
    parser.add_argument("--alfworld-data", type=Path,
                        default=os.environ.get("ALFWORLD_DATA") or REPO.parent / "shared" / "data" / "alfworld")
    parser.add_argument("--skip", choices=["sciworld", "alfworld"], action="append", default=[])
    args = parser.parse_args(argv)
    results = {}
    if "sciworld" not in args.skip:
        results["sciworld"] = bench_sciworld(args.sciworld_tasks, args.repeats)
    if "alfworld" not in args.skip:
        if (args.alfworld_data / "json_2.1.1").is_dir():
            results["alfworld"] = bench_alfworld(args.alfworld_data, args.alfworld_tasks, args.repeats)
        else:
            print(f"\nALFWorld: skipped, no games at {args.alfworld_data} (set ALFWORLD_DATA)", file=sys.stderr)
    print(json.dumps({"benchmark": "env_step", **_rounded(results)}))


def _rounded(x):
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return round(x, 3) if isinstance(x, float) else x


if __name__ == "__main__":
    main()
