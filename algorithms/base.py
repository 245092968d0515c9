"""Algorithm API in the style RLlib users know, without RLlib's runtime.

    algo = DMPOConfig(loss=DMPOObjective(beta=0.1, gamma=0.7), env=EnvSection("rl_agents/TextShop-v0")).build()
    rows = algo.fit()               # the driver loop: iterations, evaluations; one row per evaluation
    metrics = algo.train()          # or one iteration: explore -> build data -> Ray Train update
    report = algo.evaluate()        # greedy, per eval split
    path = algo.save(); algo = DMPO.restore(path)

The driver is straight-line code: a `RolloutGroup` of Ray actors collects trajectories, a data
builder (`algorithms.data`) turns them into examples, `rl_agents.train.train` runs the update on
Ray Train workers, and the new weights go back to the rollout engines (with a log-prob check
that they really arrived). `Algorithm.as_trainable()` makes any algorithm a Ray Tune function
trainable, so a β × γ sweep is one `tune.Tuner` call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar

from rl_agents import storage
from rl_agents.config import ConfigError, from_dict, to_dict
from rl_agents.rollout_group import RolloutSection
from rl_agents.train.config import TrainConfig
from rl_agents.train.objective import Objective
from rl_agents.trajectory import Trajectory, atomic_write_text, read_jsonl, write_jsonl


@dataclass
class EnvSection:
    env_id: str = "rl_agents/TextShop-v0"
    """Gymnasium id of the env (or `module:Id`)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments (e.g. ALFWorld's data_dir)."""
    max_turns: int | None = None
    """Turn budget of the agent's episodes (None = the env's own, per task). Experts are replayed
    with the env's own budget."""
    train_tasks: int | None = None
    """Use the first N tasks of the train split (None = all)."""
    eval_splits: list[str] = field(default_factory=lambda: ["test_seen", "test_unseen"])
    """Splits `evaluate()` reports."""
    eval_tasks: int | None = None
    """Evaluate on the first N tasks of each split (None = all)."""
    expert_data: str | None = None
    """JSONL of expert trajectories (rl_agents or ETO/FastChat format); None = replay the env's expert."""

    def __post_init__(self):
        _check(isinstance(self.env_id, str) and self.env_id.strip() != "", "env.env_id", "must be a non-empty id",
               self.env_id)
        for name in ("max_turns", "train_tasks", "eval_tasks"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"env.{name}", "must be >= 1 or null (null = all)", value)
        _check(bool(self.eval_splits) and all(isinstance(s, str) and s for s in self.eval_splits), "env.eval_splits",
               "must be a non-empty list of split names", self.eval_splits)
        _check(self.expert_data is None or self.expert_data != "", "env.expert_data", "must be a file or null",
               self.expert_data)


@dataclass
class AlgorithmConfig:
    """Every algorithm's config: these sections, plus `loss` (the algorithm's `Objective`, whose fields
    are the loss's hyperparameters: `loss.beta`, ...) and the algorithm's own fields."""

    model: str = "smollm2-135m"
    """Starting policy: an HF checkpoint dir or an alias (`smollm2-135m`, `tiny-llama`)."""
    env: EnvSection = field(default_factory=EnvSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(num_workers=1))
    """Ray Train + DeepSpeed settings of each update (optimizer, LoRA, ZeRO, workers)."""
    iterations: int = 1
    """`train()` calls a full run makes (`rl-agents train`, Tune)."""
    evaluate_every: int = 1
    """Evaluate after every N iterations in a full run (0 = only at the end)."""
    run_dir: str = "runs/run"
    """Where the run writes config, metrics, checkpoints, trajectories, results."""
    seed: int = 0

    algo: ClassVar[str] = ""
    moved_keys: ClassVar[dict[str, str]] = {k: f"loss.{k}" for k in
                                             ("beta", "gamma", "end_of_turn", "clip_eps", "entropy_coef", "kl_coef")}
    """Keys that moved (an older config's): an unknown-key error names where they live now."""

    def __post_init__(self):
        _check(isinstance(self.model, str) and self.model.strip() != "", "model", "must be a checkpoint dir or alias",
               self.model)
        _check(self.iterations >= 1, "iterations", "must be >= 1", self.iterations)
        _check(self.evaluate_every >= 0, "evaluate_every", "must be >= 0 (0 = only at the end)", self.evaluate_every)
        _check(isinstance(self.run_dir, str) and self.run_dir.strip() != "", "run_dir", "must be a directory path",
               self.run_dir)

    def build(self) -> Algorithm:
        return ALGORITHMS[self.algo](self)


def _check(ok: bool, key: str, msg: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}, got {value!r}")


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHMS[cls.config_class.algo] = cls
    return cls


class Algorithm:
    """One instance = one run: a current policy, its rollout workers, its history."""

    config_class: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig

    def __init__(self, config: AlgorithmConfig):
        from rl_agents.models import resolve_model

        self.config = config
        self.run_dir = Path(config.run_dir).resolve()
        model = storage.follow_pointer(config.model)  # runs/x/policy may stand for the URI in runs/x/policy.uri
        local = str(Path(resolve_model(model)).resolve())  # a URI: checked, and this node's copy made
        self.policy = model if storage.is_uri(model) else local  # other nodes copy a URI themselves
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self._group = None
        self._experts: dict[str, Trajectory] | None = None
        self._segmenter = None
        self.resuming = False
        """Set by `rl-agents train` when it continues a run in its run_dir: an interrupted
        iteration's exploration file is then reused, not sampled again."""

    # ---- the one thing subclasses write ------------------------------------------------------
    def training_step(self) -> dict[str, Any]:
        raise NotImplementedError

    # ---- public API ----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """One iteration; returns its metrics (also appended to `<run_dir>/metrics.jsonl`)."""
        start = time.perf_counter()
        metrics = self.training_step()
        self.iteration += 1
        metrics.update({"iteration": self.iteration, "perf/iteration_s": time.perf_counter() - start,
                        "policy": self.policy})
        self.history.append(metrics)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        self.save()
        return metrics

    def fit(self, rows: list[dict[str, Any]] | None = None, *, evaluate: bool = True, evaluate_start: bool = False,
            label: str | None = None, on_row: Callable[[list[dict[str, Any]]], None] | None = None,
            on_iteration: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """The driver loop: train from `self.iteration` to `config.iterations`, evaluating after every
        `evaluate_every`-th iteration and after the last (`evaluate=False`: never). Every caller runs
        this loop: `rl-agents train`, Ray Tune (`as_trainable`), the demo and the learning benchmark.

        rows: the result rows so far (a resumed run's), appended to in place and returned: one per
        evaluation, {"stage", "iteration", the iteration's explore/ and data/ metrics, eval/...}.
        evaluate_start: first evaluate the starting policy (stage "start"), unless `rows` has it.
        on_row(rows): after each row is added (e.g. write the results table).
        on_iteration(metrics): after each iteration, with its metrics (and its evaluation's).
        An evaluation lost to an interruption after its iteration trained is made up here."""
        cfg = self.config
        rows = rows if rows is not None else []
        name = label or cfg.algo

        def add(row: dict[str, Any]) -> dict[str, Any]:
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            return row

        def evaluated(iteration: int, metrics: dict[str, Any]) -> dict[str, Any]:
            return add({"stage": f"{name} iter {iteration}", "iteration": iteration,
                        **{k: v for k, v in metrics.items() if k.startswith(("explore/", "data/"))}, **self.evaluate()})

        if evaluate and evaluate_start and self.iteration == 0 and not any(r.get("stage") == "start" for r in rows):
            add({"stage": "start", "iteration": 0, **self.evaluate()})
        if evaluate and self.iteration and self.history and not any(r.get("iteration") == self.iteration for r in rows) \
                and self._evaluates_after(self.iteration):
            evaluated(self.iteration, self.history[-1])  # trained, then interrupted before its evaluation
        for i in range(self.iteration, cfg.iterations):
            metrics = self.train()
            if evaluate and self._evaluates_after(i + 1):
                metrics = {**metrics, **evaluated(i + 1, metrics)}
            if on_iteration is not None:
                on_iteration(metrics)
        return rows

    def _evaluates_after(self, iteration: int) -> bool:
        every = self.config.evaluate_every
        return iteration == self.config.iterations or bool(every and iteration % every == 0)

    def evaluate(self, splits: list[str] | None = None, n: int | None = None) -> dict[str, Any]:
        """Greedy evaluation of the current policy: `eval/<split>/{avg_reward,success_rate,mean_turns}`,
        and `eval/<split>/per_task` (task id -> [reward, success]: what the tables' intervals and paired
        comparisons are made from; not a number, so metric loggers skip it)."""
        from rl_agents.evaluation import evaluate

        env = self.config.env
        report = evaluate(self.policy, env.env_id, splits or env.eval_splits, n=n or env.eval_tasks,
                          group=self.group(), seed=self.config.seed, max_new_tokens=self.config.rollout.max_new_tokens,
                          out_path=self.run_dir / f"eval_iter{self.iteration}.json", verbose=False,
                          trajectories_path=self.run_dir / "trajectories" / f"eval_iter{self.iteration}.jsonl")
        return {**report["metrics"], **{f"eval/{s}/per_task": m["per_task"] for s, m in report["splits"].items()}}

    def save(self, path: str | Path | None = None) -> str:
        """Write `state.json` (iteration, policy checkpoint, history, config); return its directory."""
        out = Path(path) if path else self.run_dir
        state = {"algo": self.config.algo, "iteration": self.iteration, "policy": self.policy,
                 "history": self.history, "config": to_dict(self.config)}
        atomic_write_text(out / "state.json", json.dumps(state, indent=2))
        return str(out)

    @classmethod
    def restore(cls, path: str | Path) -> Algorithm:
        """Rebuild an algorithm from `save()`'s directory: same config, policy and iteration."""
        state = json.loads((Path(path) / "state.json").read_text())
        algo_cls = ALGORITHMS[state["algo"]]
        algo = algo_cls(from_dict(algo_cls.config_class, state["config"]))
        algo.load_state(path)
        return algo

    def load_state(self, path: str | Path) -> None:
        """Continue from `save()`'s directory: iteration, policy and history (config as it is)."""
        state = json.loads((Path(path) / "state.json").read_text())
        if state["algo"] != self.config.algo:
            raise ConfigError(f"{path}/state.json is a {state['algo']} run, not {self.config.algo}")
        self.iteration, self.policy, self.history = state["iteration"], state["policy"], state["history"]
        self._restored(Path(path))

    def _restored(self, path: Path) -> None:
        """Hook: load a subclass's extra state saved next to `state.json` (e.g. a discriminator)."""

    def stop(self) -> None:
        if self._group is not None:
            self._group.shutdown()
            self._group = None

    @classmethod
    def as_trainable(cls, base: AlgorithmConfig | None = None):
        """A Ray Tune function trainable: `param_space` holds dotted overrides of `base`
        (e.g. {"loss.beta": tune.grid_search([0.1, 0.5]), "loss.gamma": ...}); one report per iteration
        (`fit`)."""
        from ray import tune

        from rl_agents.config import apply_overrides

        base_cfg = base or cls.config_class()
        base_dict = to_dict(base_cfg)

        def trainable(params: dict[str, Any]) -> None:
            from ray import tune

            cfg = from_dict(cls.config_class, apply_overrides(base_dict, [f"{k}={json.dumps(v)}" for k, v in params.items()]))
            trial_dir = tune.get_context().get_trial_dir() if hasattr(tune, "get_context") else None
            if trial_dir:
                cfg.run_dir = str(Path(trial_dir) / "run")
            algo = cls(cfg)
            try:
                algo.fit(on_iteration=lambda m: tune.report({k: v for k, v in m.items() if isinstance(v, (int, float))}))
            finally:
                algo.stop()

        # The trial reserves its driver and its rollout actors (Tune captures them in the trial's
        # placement group); the Ray Train V2 controller schedules its own training workers.
        r = base_cfg.rollout
        worker = {"CPU": r.num_cpus_per_worker, **({"GPU": r.num_gpus_per_worker} if r.num_gpus_per_worker else {})}
        return tune.with_resources(trainable, tune.PlacementGroupFactory([{"CPU": 1}] + [worker] * r.num_workers))

    # ---- shared pieces of the loops ------------------------------------------------------------
    def group(self):
        """The rollout workers (created once; their weights follow `self.policy`)."""
        if self._group is None:
            env = self.config.env
            kwargs = {**env.env_kwargs, **({"max_turns": env.max_turns} if env.max_turns else {})}
            self._group = self.config.rollout.make_group(self.policy, env.env_id, env_kwargs=kwargs)
            self._group.check_updates_reach(self.store)  # multi-node: fail now, not at the first update
        return self._group

    def segmenter(self):
        if self._segmenter is None:
            from rl_agents.models import load_tokenizer
            from rl_agents.tokenization import ChatSegmenter

            self._segmenter = ChatSegmenter(load_tokenizer(self.policy))
        return self._segmenter

    def experts(self) -> dict[str, Trajectory]:
        """Expert trajectory per train task (from `env.expert_data`, else replayed in the env)."""
        if self._experts is None:
            env = self.config.env
            # The replayed experts are cached per what made them (env, its arguments, the train tasks).
            key = json.dumps({"env_id": env.env_id, "env_kwargs": env.env_kwargs, "train_tasks": env.train_tasks},
                             sort_keys=True, default=str)
            cache = self.run_dir / f"experts-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"
            if env.expert_data:
                # Either format; fails here, before any work, naming file:line (no agent turn: nothing to train on).
                trajs = load_expert_file(env.expert_data, env.env_id)
            elif cache.exists():
                trajs = read_jsonl(cache)
            else:
                from rl_agents.experts import iter_expert_trajectories

                trajs = [t for t in iter_expert_trajectories(env.env_id, "train", env.train_tasks, env_kwargs=env.env_kwargs)
                         if t.reward > 0]
                write_jsonl(cache, trajs)
            self._experts = {t.task_id: t for t in trajs}
        return self._experts

    def explore(self) -> list[Trajectory]:
        """Sample the current policy on the train tasks (ETO's exploration phase)."""
        from rl_agents.engines.base import SamplingParams
        from rl_agents.rollout import make_tasks

        r = self.config.rollout
        if r.explore_data and self.iteration == 0:
            experts = self.experts()
            trajs = [t for t in load_expert_file(r.explore_data, self.config.env.env_id, need_agent_turns=False,
                                               record_source=False)
                     if t.task_id in experts]
            if not trajs:
                raise ValueError(f"rollout.explore_data: {r.explore_data} has no trajectory of this run's train tasks")
            write_jsonl(self.run_dir / "trajectories" / f"explore_iter{self.iteration}.jsonl", trajs)
            return trajs
        path = self.run_dir / "trajectories" / f"explore_iter{self.iteration}.jsonl"
        if self.resuming and path.exists():  # an interrupted iteration: train on what it explored
            return read_jsonl(path)
        tasks = make_tasks(list(self.experts()), r.samples_per_task, seed=self.config.seed * 1000 + self.iteration, split="train")
        sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                  seed=self.config.seed + self.iteration)
        trajs = self.group().run(tasks, sampling, desc=f"explore iter {self.iteration}")
        write_jsonl(self.run_dir / "trajectories" / f"explore_iter{self.iteration}.jsonl", trajs)
        return trajs

    @property
    def store(self) -> str:
        """Where the updates' Ray Train runs (`train/`) and the policies go: `run_dir`, or, when
        `train.storage_path` is a URI (`s3://...`; every node then reads the policies from there,
        `rl_agents.storage`), `<train.storage_path>/<run_dir's name>-<random id>`: the id is drawn
        when the run starts and kept in `run_dir/store.uri`, so that a resumed run finds its own
        checkpoints and no two runs (Tune trials, seeds, a fresh run_dir) ever share them. A path
        in `train.storage_path` is not used: the trainer's runs go in `run_dir/train`."""
        uri = self.config.train.storage_path
        if not storage.is_uri(uri):
            return str(self.run_dir)
        pointer = self.run_dir / "store.uri"
        if pointer.is_file():
            return pointer.read_text(encoding="utf-8").strip()
        import secrets

        store = storage.join(uri, f"{self.run_dir.name}-{secrets.token_hex(4)}")
        atomic_write_text(pointer, store + "\n")
        return store

    def train_config(self, data: list, objective: Objective) -> TrainConfig:
        """This update's `TrainConfig`, a new value (`self.config.train` is never changed): the current
        policy, the run's storage, a name that resumes this very update (iteration, objective, data
        digest), the run's seed, and the global batch shrunk to the data when there is less data than
        one batch (small runs)."""
        tc = self.config.train
        optim = tc.optim
        step = optim.micro_batch_size * tc.num_workers
        if len(data) < optim.batch_size:
            if len(data) < step:
                raise ValueError(f"{len(data)} examples are fewer than one micro-batch per worker ({step})")
            optim = dataclasses.replace(optim, batch_size=len(data) // step * step)
        return dataclasses.replace(tc, model=dataclasses.replace(tc.model, path=self.policy), optim=optim,
                                   storage_path=storage.join(self.store, "train"),
                                   name=f"iter{self.iteration}-{objective.name}-{data_digest(data)[:10]}",
                                   seed=tc.seed + self.config.seed)  # the run seed reaches the trainer

    def update(self, data: list, objective: Objective | None = None, **kw) -> dict[str, Any]:
        """Train the current policy on `data` with `objective` (default: the config's `loss`) on Ray Train;
        the result becomes the policy (LoRA adapters are merged into full weights) and reaches the
        rollout workers."""
        from rl_agents.train import train

        objective = objective or self.config.loss
        cfg = self.train_config(data, objective)
        if self._group is not None:
            self._group.release_cache()  # the rollout actors stay up beside the trainer: give it their cache
        result = train(objective, data, cfg, **kw)
        new_policy = result.checkpoint_path
        if cfg.lora.enabled:
            adapter = storage.local_copy(result.checkpoint_path, skip=("trainer",))
            if storage.is_uri(self.store):  # the merged policy goes where every node reads it
                import tempfile

                with tempfile.TemporaryDirectory(prefix="rl_agents_merge_") as tmp:
                    merged = merge_lora(self.policy, adapter, Path(tmp) / "policy")
                    new_policy = storage.join(self.store, "policies", f"iter{self.iteration}")
                    storage.upload_policy(merged, new_policy)
            else:
                new_policy = merge_lora(self.policy, adapter, self.run_dir / "policies" / f"iter{self.iteration}")
        self.policy = str(new_policy)
        if storage.is_uri(self.policy):
            atomic_write_text(self.run_dir / "policy.uri", self.policy + "\n")
        else:
            _link(self.run_dir / "policy", self.policy)
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        if self._group is not None:
            self._group.update_weights(self.policy)
            if should_check_sync(self.policy, self.config.rollout.sync_check):
                metrics["sync/max_logprob_diff"] = self._weight_sync_diff()
        return metrics

    def _weight_sync_diff(self) -> float:
        from rl_agents.models import load_model

        return float(self._group.check_weight_sync(load_model(self.policy)))


def load_expert_file(path: str, env_id: str, *, need_agent_turns: bool = True,
                     record_source: bool = True) -> list[Trajectory]:
    """Trajectories of a data file (`env.expert_data`, `rollout.explore_data`) in either format,
    checked before any work: format errors, trajectories without an agent turn and task ids no
    env could have (NUL, surrogates, huge) raise `TrajectoryFormatError` naming file:line.
    `record_source`: keep each trajectory's `metadata["source_line"]` (off where the trajectories
    are written out again as they came, e.g. `rollout.explore_data`)."""
    from envs.base import TaskIdError, check_task_id
    from rl_agents.trajectory import TrajectoryFormatError, read_trajectories, require_agent_turns, source_of

    trajs = read_trajectories(path, env_id=env_id)
    if need_agent_turns:
        trajs = require_agent_turns(trajs, path)
    for t in trajs:
        try:
            check_task_id(t.task_id)
        except TaskIdError as e:
            raise TrajectoryFormatError(f"{source_of(t)}: field 'task_id': {e}") from None
    if not record_source:
        for t in trajs:
            t.metadata.pop("source_line", None)
    return trajs


def data_digest(data: list) -> str:
    """sha256 of an update's training data. It names the update's Ray Train run, so that a re-run
    on the same data (a resumed `rl-agents train`) continues that run from its last checkpoint, and
    a run on other data never resumes a checkpoint that is not its own."""
    import hashlib

    h = hashlib.sha256()
    for example in data:
        h.update(repr(example).encode())
    return h.hexdigest()


SYNC_CHECK_MAX_BYTES = 2 * 2**30


def should_check_sync(policy: str | Path, mode: str) -> bool:
    """`rollout.sync_check`: 'auto' checks policies whose safetensors total under 2 GiB."""
    if mode != "auto":
        return mode == "always"
    sizes = storage.file_sizes(policy)  # a path or a URI
    return sum(v for k, v in sizes.items() if "/" not in k and k.endswith(".safetensors")) < SYNC_CHECK_MAX_BYTES


def _link(link: Path, target: str) -> None:
    """Point `link` at `target` atomically (a stable path to the latest policy of a run)."""
    import os

    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def merge_lora(base: str, adapter: str, out: str | Path) -> str:
    """Merge a peft adapter into its base model; save full safetensors in HF layout.

    Built in a temporary sibling directory and swapped in atomically (`fileio.replace_dir`): a
    failure leaves the old `out` (if any) and no temporary directory behind."""
    from peft import PeftModel

    from rl_agents.fileio import fix_modes, make_tmp_dir, replace_dir, write_error
    from rl_agents.models import load_model, load_tokenizer

    out = Path(out)
    tmp = make_tmp_dir(out.parent, out.name)
    try:
        merged = PeftModel.from_pretrained(load_model(base), adapter).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(base).save_pretrained(tmp)
        fix_modes(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return str(out)


def explore_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    n = max(len(trajs), 1)
    return {"explore/avg_reward": sum(t.reward for t in trajs) / n,
            "explore/success_rate": sum(t.success for t in trajs) / n,
            "explore/errors": sum(bool(t.metadata.get("error")) for t in trajs)}
