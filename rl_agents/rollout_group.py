"""RolloutGroup: N `RolloutWorker` Ray actors, fault tolerant, streaming results.

    group = RolloutSection(num_workers=2).make_group("smollm2-135m", "rl_agents/TextShop-v0")
    trajs = group.run(make_tasks(task_ids, samples_per_task=4, seed=0))   # tqdm progress bar
    group.update_weights("runs/x/checkpoint")    # every engine, and every worker restarted later
    gap = group.check_weight_sync(trainer_model)  # max |engine - trainer| log-prob; ~0 if in sync

Scheduling: tasks go out in fixed chunks (default 2K tasks per call, K = envs per worker), round
robin, two chunks in flight per worker so an engine never waits for the driver; inside a call the
worker refills its K env slots as episodes end. Each call is a Ray streaming generator
(`RolloutWorker.iter_rollout`): every trajectory comes back the moment its episode ends, so
`iter_results` yields (and the progress bar ticks) per episode, not per chunk. A chunk's result
does not depend on which worker ran it (sampling seeds come from the tasks), so a run is
reproducible whatever the number of workers, for the same chunk size, K and weights, up to float
rounding (and unless a worker died: its lost tasks re-run one per chunk).

Fault tolerance: results are keyed by `(split, task_id, sample_index)`. When a worker dies
(killed, OOM, a segfaulting simulator) the episodes it had already returned are kept and the
rest of its in-flight chunks is lost; the group kills what is left of the actor, starts a new
one with the same resources (and the latest weights), and re-queues the lost tasks one per
chunk, so a task that keeps killing workers is isolated: after `max_task_attempts` deaths it is
recorded as an error trajectory (`metadata["error"]`) instead of looping. Nothing is lost,
nothing is counted twice. Application errors inside a worker (bugs) are not retried: they are
raised.

`RolloutSection` (the `rollout:` section of every algorithm config) holds the workers' settings
and makes every group of the library (`make_group`).

Resources: `num_cpus`/`num_gpus` per worker; `scheduling` (default 'SPREAD': over the cluster's
nodes); or `placement_strategy` ('PACK', 'STRICT_SPREAD', ...) reserves one bundle per worker in a
placement group first (GPU clusters).

On a cluster (`rl_agents.cluster`): every trajectory names its `worker`, `node_id` and
`weights_version`; new weights reach workers on other nodes through the object store (or by path
from shared storage); a worker whose node died is replaced where the cluster has room, else
retired, and the run goes on with the others (its lost tasks re-run on them).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rl_agents.cluster import Weights, is_alive, multi_node, node_id, unreadable_nodes
from rl_agents.config import ConfigError
from rl_agents.engines import EngineSpec, SamplingParams, logprob_diff, sync_probe_prompts
from rl_agents.ray_utils import init_ray
from rl_agents.rollout import RolloutConfig, RolloutTask, RolloutWorker
from rl_agents.trajectory import Trajectory

logger = logging.getLogger(__name__)

SHUTDOWN_CLOSE_S = 10.0
"""How long `RolloutGroup.shutdown` waits for the workers to close their envs and engines (a
worker busy with an episode closes after it) before it kills them all the same."""


class RolloutGroup:
    def __init__(self, engine: EngineSpec, config: RolloutConfig, num_workers: int = 1, *, num_cpus: float = 1,
                 num_gpus: float = 0, placement_strategy: str | None = None, scheduling: str = "SPREAD",
                 chunk_size: int | None = None, max_restarts: int = 10, max_task_attempts: int = 3,
                 object_store_weights_bytes: int = 2 * 2**30, progress: bool = True):
        import ray

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        init_ray()
        self.engine, self.config, self.num_workers = engine, config, num_workers
        self.num_cpus, self.num_gpus, self.scheduling = num_cpus, num_gpus, scheduling
        self.chunk_size = chunk_size or 2 * config.num_envs
        self.max_restarts, self.max_task_attempts, self.progress = max_restarts, max_task_attempts, progress
        self.object_store_weights_bytes = object_store_weights_bytes
        self.restarts = 0  # in the current `run`/`iter_results` call: `max_restarts` is a per-call limit
        self.total_restarts = 0
        self.retired: list[int] = []  # workers whose node died, with no room left for them elsewhere
        # The initial policy: shipped through the object store to nodes that may not read this disk.
        self.initial = self._publish(engine.model, 0) if Path(engine.model).is_dir() else None
        self.weights: Weights | None = None  # the latest update (restarted workers load it too)
        self._actor_cls = ray.remote(RolloutWorker)
        self.placement_group = None
        if placement_strategy:
            from ray.util.placement_group import placement_group

            bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
            self.placement_group = placement_group([bundle] * num_workers, strategy=placement_strategy)
            ray.get(self.placement_group.ready())
        self.workers = [self._spawn(i) for i in range(num_workers)]
        self.worker_info = ray.get([w.ready.remote() for w in self.workers])  # fail fast on a bad engine

    @property
    def weights_path(self) -> str | None:
        return self.weights.path if self.weights is not None else None

    def _publish(self, path: str | Path, version: int) -> Weights:
        """`Weights` for the workers; on a multi-node cluster a policy too big for the object store
        must be readable on every node, checked here (before any worker loads it)."""
        from rl_agents import storage

        weights = Weights.publish(path, version, self.object_store_weights_bytes)
        if not weights.shipped and not storage.is_uri(weights.path) and multi_node():
            missing = unreadable_nodes(weights.path)
            if missing:
                raise ConfigError(
                    f"rollout: the policy {weights.path} ({weights.nbytes / 2**20:.0f} MB) cannot reach the rollout "
                    f"workers: {len(missing)} node(s) of the cluster cannot read it (e.g. node {missing[0][:12]}) and "
                    f"it is over rollout.object_store_weights_mb={self.object_store_weights_bytes // 2**20}. Put "
                    "run_dir (and the model) on storage every node mounts (NFS, a mounted bucket), or raise "
                    "rollout.object_store_weights_mb (docs/cluster.md)")
        return weights

    def check_updates_reach(self, directory: str | Path, key: str = "run_dir") -> None:
        """At the start of a run whose new policies will be written under `directory` (`key` names
        the setting): on a multi-node cluster, policies the size of the current one that go by
        path (over `object_store_weights_bytes`) need `directory` readable on every node (a URI
        is: every node reaches it). Raise `ConfigError` now, not at the first update hours later."""
        from rl_agents import storage
        from rl_agents.cluster import dir_bytes
        from rl_agents.models import resolve_model

        if not multi_node() or storage.is_uri(directory):
            return
        size = self.initial.nbytes if self.initial is not None else dir_bytes(resolve_model(self.engine.model))
        if size <= self.object_store_weights_bytes:
            return
        Path(directory).mkdir(parents=True, exist_ok=True)
        missing = unreadable_nodes(directory)
        if missing:
            raise ConfigError(
                f"{key}: {directory} is not readable on {len(missing)} node(s) of the cluster (e.g. node "
                f"{missing[0][:12]}), and this run's policies ({size / 2**20:.0f} MB, over "
                f"rollout.object_store_weights_mb={self.object_store_weights_bytes // 2**20}) reach the rollout workers "
                f"by path: put {key} on storage every node mounts (NFS, a mounted bucket), or raise "
                "rollout.object_store_weights_mb (docs/cluster.md)")

    def _spawn(self, index: int):
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_restarts": 0}
        if self.placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=index)
        elif self.scheduling:
            opts["scheduling_strategy"] = self.scheduling
        return self._actor_cls.options(**opts).remote(self.engine, self.config, index, self.initial)

    def _restart(self, index: int) -> None:
        """Replace dead worker `index` and wait until it is up with the latest weights (at most
        `start_timeout_s`); retire it instead when its node died and no other node has room, or
        when the new one does not come up (its tasks then go to the surviving workers). The last
        worker is never retired: then the error is raised."""
        import ray

        self.restarts += 1
        self.total_restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"rollout workers died {self.restarts} times in one call (max_restarts={self.max_restarts})")
        ray.kill(self.workers[index], no_restart=True)
        node = self.worker_info[index].get("node_id")
        last = len(self.live()) == 1
        if self.placement_group is None and not last and not self._room_or_alive(node):
            self._retire(index, f"its node {(node or '?')[:12]} is gone and no node has room for it")
            return
        actor = self.workers[index] = self._spawn(index)
        calls = [actor.ready.remote()]
        if self.weights is not None:  # a restarted worker must not roll out with stale weights
            calls.append(actor.update_weights.remote(self.weights))
        try:
            self.worker_info[index] = ray.get(calls, timeout=self.start_timeout_s)[0]
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:
            ray.kill(actor, no_restart=True)
            if last:
                raise RuntimeError(f"rollout worker {index} could not be restarted: {type(e).__name__}: {e}") from None
            self._retire(index, f"its replacement did not start within {self.start_timeout_s:.0f} s "
                                f"({type(e).__name__})")

    def _retire(self, index: int, why: str) -> None:
        self.workers[index] = None
        self.retired.append(index)
        logger.warning("rollout worker %d: %s; going on with %d workers", index, why, len(self.live()))

    start_timeout_s = 900.0
    """How long a restarted worker may take to start (load its model, fetch its weights)."""
    node_check_s = 20.0
    """How long a worker death waits for the GCS to say whether the worker's node died with it
    (Ray's default health checks notice a lost node in ~15 s)."""

    def _room_or_alive(self, node: str | None) -> bool:
        """Whether to replace a dead worker (True) or retire it (False). The driver's node (or an
        unknown one): replace. Otherwise ask the worker's node (a zero-CPU task pinned to it): if it
        answers, the worker crashed on a healthy node: replace. If not, the node is lost: wait up to
        `node_check_s` for the GCS to declare it dead (its resources then leave the totals; until
        then a dead node's freed CPUs look like room), and replace only if the rest of the
        cluster has room; a node that neither answers nor is declared dead is treated as lost.

        Not "one node left: replace": when the GCS declares the node dead before the driver sees the
        worker's death, the cluster is down to one node by then, and a replacement with no room
        would wait `start_timeout_s` (900 s) for a CPU that never frees, holding up every task."""
        import time

        import ray

        if node is None or node == node_id() or (is_alive(node) and _node_answers(node, self.node_answer_s)):
            return True
        deadline = time.monotonic() + self.node_check_s
        while is_alive(node):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
        time.sleep(1)  # the dead node's resources leave the cluster's totals
        free = ray.available_resources()
        return free.get("CPU", 0) >= self.num_cpus and free.get("GPU", 0) >= self.num_gpus

    node_answer_s = 5.0
    """How long a worker death waits for its node to answer a zero-CPU task before it suspects the node."""

    def live(self) -> list[int]:
        """Indices of the workers in service."""
        return [i for i, w in enumerate(self.workers) if w is not None]

    # ---- verbs ------------------------------------------------------------------------------
    def list_tasks(self, split: str | None = None) -> list[str]:
        import ray

        return ray.get(self.workers[self.live()[0]].list_tasks.remote(split))

    def run(self, tasks: Sequence[RolloutTask], sampling: SamplingParams | None = None, *, desc: str = "rollout",
            on_result: Callable[[Trajectory], None] | None = None) -> list[Trajectory]:
        """All trajectories, in the order of `tasks`."""
        results = {}
        for traj in self.iter_results(tasks, sampling, desc=desc):
            results[_traj_key(traj)] = traj
            if on_result is not None:
                on_result(traj)
        return [results[self._key(t)] for t in tasks]

    def _key(self, task: RolloutTask) -> tuple[str, str, int]:
        """(split, task id, sample): one call may mix splits, whose task ids may coincide."""
        return (task.split or self.config.split, task.task_id, task.sample_index)

    def iter_results(self, tasks: Sequence[RolloutTask], sampling: SamplingParams | None = None, *,
                     desc: str = "rollout") -> Iterator[Trajectory]:
        """Yield each trajectory once, as soon as its episode ends (any order)."""
        import ray
        from ray.exceptions import ObjectLostError, RayActorError
        from tqdm import tqdm

        wanted = {self._key(t): t for t in tasks}
        self.restarts = 0
        if len(wanted) != len(tasks):
            raise ValueError("tasks must have unique (split, task_id, sample_index) keys")
        # Chunks no larger than an even share per worker, so a small call still keeps every worker busy.
        size = min(self.chunk_size, max(1, -(-len(tasks) // len(self.live()))))
        queue = deque(list(tasks[i : i + size]) for i in range(0, len(tasks), size))
        # One streaming call per chunk: generator -> (worker index, the chunk's tasks not yet returned).
        inflight: dict[Any, tuple[int, dict[tuple[str, str, int], RolloutTask]]] = {}
        attempts: dict[tuple[str, str, int], int] = defaultdict(int)
        seen: set[tuple[str, str, int]] = set()
        bar = tqdm(total=len(tasks), desc=desc, disable=not self.progress, dynamic_ncols=True)
        total_reward = 0.0

        def submit(index: int, depth: int = 2) -> None:
            while queue and sum(1 for w, _ in inflight.values() if w == index) < depth:
                chunk = queue.popleft()
                gen = self.workers[index].iter_rollout.options(num_returns="streaming").remote(chunk, sampling)
                inflight[gen] = (index, {self._key(t): t for t in chunk})

        try:
            for depth in (1, 2):  # round robin: every worker gets a first chunk before any gets a second
                for i in self.live():
                    submit(i, depth)
            while inflight:
                (gen,), _ = ray.wait(list(inflight), num_returns=1)
                index, pending = inflight[gen]
                try:
                    traj = ray.get(next(gen))
                except StopIteration:  # the chunk is done
                    del inflight[gen]
                    submit(index)
                    continue
                except (RayActorError, ObjectLostError) as e:
                    # The worker died (or its node, with results it had not handed over yet): what it had not returned yet, of this chunk and of its other one.
                    lost = [t for g, (w, p) in list(inflight.items()) if w == index for t in p.values()]
                    for g in [g for g, (w, _) in inflight.items() if w == index]:
                        del inflight[g]
                    self._restart(index)
                    for task in lost:
                        key = self._key(task)
                        attempts[key] += 1
                        if attempts[key] >= self.max_task_attempts:
                            seen.add(key)
                            bar.update(1)
                            yield _died(task, self.config, attempts[key], e)
                        else:
                            queue.appendleft([task])  # alone: a task that kills workers is isolated
                    bar.set_postfix(restarts=self.restarts)
                    for i in self.live():
                        submit(i)
                    continue
                key = _traj_key(traj)
                pending.pop(key, None)
                if key in wanted and key not in seen:
                    seen.add(key)
                    total_reward += traj.reward
                    bar.update(1)
                    bar.set_postfix(reward=f"{total_reward / len(seen):.3f}", restarts=self.restarts)
                    yield traj
        finally:
            bar.close()
        missing = set(wanted) - seen
        if missing:  # cannot happen unless a worker returned the wrong tasks
            raise RuntimeError(f"{len(missing)} tasks came back without a trajectory, e.g. {sorted(missing)[:3]}")

    def update_weights(self, path: str | Path) -> None:
        """Load a checkpoint dir or LoRA adapter dir into every engine (and into restarted ones): by
        path, or through the object store on a multi-node cluster (`rl_agents.cluster.Weights`)."""

        version = (self.weights.version if self.weights is not None else 0) + 1
        self.weights = self._publish(path, version)
        self._on_all(lambda w: w.update_weights.remote(self.weights))  # a restarted worker loads them too

    def release_cache(self) -> None:
        """Every engine frees what it keeps between calls (the HF prefix cache: up to K episodes x
        max_context of KV per worker). The algorithms call it before each training phase, while
        the actors stay up beside the trainer."""

        self._on_all(lambda w: w.release_cache.remote())

    def check_weight_sync(self, model, prompts: Sequence[Sequence[int]] | None = None,
                          max_new_tokens: int = 8) -> float:
        """Max |engine - trainer| log-prob over every worker's greedy generations on a few prompts.

        `model` is the trainer-side policy (an HF causal LM, possibly peft). ~1e-5 in fp32 when
        every engine runs the same weights; a stale engine shows up as a gap of ~1e-1 or more.
        """

        from rl_agents.models import load_tokenizer

        if prompts is None:
            prompts = sync_probe_prompts(load_tokenizer(self.engine.model))
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        gens = self._on_all(lambda w: w.generate.remote(prompts, params))
        return max(logprob_diff(model, prompts, g) for g in gens)

    def _on_all(self, call: Callable[[Any], Any]) -> list:
        """`call(worker)` -> ObjectRef on every live worker; the results. A worker that died meanwhile
        (its node lost while the trainer ran) is restarted or retired, then called again."""
        import ray
        from ray.exceptions import ObjectLostError, RayActorError

        refs = {i: call(self.workers[i]) for i in self.live()}
        results = {}
        for i, ref in refs.items():
            try:
                results[i] = ray.get(ref)
            except (RayActorError, ObjectLostError):
                self._restart(i)
                if self.workers[i] is not None:
                    results[i] = ray.get(call(self.workers[i]))
        return [results[i] for i in sorted(results)]

    def shutdown(self) -> None:
        """Close every worker's envs and engine, then kill the actors. The close comes first: a
        killed actor runs no finalizer, and what it started (vLLM's engine-core process, an env's
        JVM) does not all watch its parent."""
        import ray

        live = [self.workers[i] for i in self.live()]
        try:
            ray.get([w.close.remote() for w in live], timeout=SHUTDOWN_CLOSE_S)
        except Exception as e:  # a dead or stuck worker: killed below all the same
            logger.warning("rollout workers did not all close in %.0f s (%s); killing them", SHUTDOWN_CLOSE_S,
                           type(e).__name__)
        for w in live:
            ray.kill(w, no_restart=True)
        self.workers = []
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None

    def __enter__(self) -> RolloutGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _node_answers(node: str, timeout: float) -> bool:
    """Whether `node`'s raylet runs a zero-CPU task pinned to it within `timeout` seconds."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ref = ray.remote(num_cpus=0)(_pid).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
    try:
        ray.get(ref, timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 (timeout, or the node died meanwhile)
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001
            pass
        return False


def _pid() -> int:
    import os

    return os.getpid()


def _traj_key(traj: Trajectory) -> tuple[str, str, int]:
    return (traj.metadata["split"], traj.task_id, traj.metadata["sample_index"])


def _died(task: RolloutTask, config: RolloutConfig, attempts: int, exc: BaseException) -> Trajectory:
    """The record of a task that killed its worker `attempts` times."""
    return Trajectory(task_id=task.task_id, env_id=config.env_id, turns=[], reward=0.0,
                      success=False, id=f"{config.env_id}/{task.task_id}/{task.sample_index}",
                      metadata={"split": task.split or config.split, "seed": task.seed,
                                "sample_index": task.sample_index, "stop_reason": "error",
                                "error": f"rollout worker died {attempts} times running this task: "
                                         f"{type(exc).__name__}"})


@dataclass
class RolloutSection:
    """The rollout workers: how many, their resources, their engine and how they sample. Validated on
    creation (`ConfigError` naming `rollout.<field>`); `make_group` starts them.

        group = RolloutSection(num_workers=2, envs_per_worker=20).make_group("smollm2-135m", "rl_agents/TextShop-v0")
    """

    engine: Literal["hf", "vllm"] = "hf"
    """Generation engine of the rollout workers: Hugging Face generate (the CPU default) or vLLM (GPU,
    or CPU in the `.venv-vllm` environment: `make install-vllm`)."""
    num_workers: int = 1
    """Rollout actors."""
    envs_per_worker: int = 16
    """Episodes each actor advances together (one batched generate per turn)."""
    num_cpus_per_worker: float = 1
    """CPUs Ray reserves per rollout actor."""
    threads_per_worker: int | None = None
    """torch / OpenMP threads of each actor's engine (None = Ray's default for HF, the reserved CPUs;
    vLLM's own binding for vLLM)."""
    num_gpus_per_worker: float = 0
    placement: Literal["spread", "default"] = "spread"
    """Where Ray puts the workers: 'spread' over the cluster's nodes (Ray's SPREAD strategy: more
    nodes, more env CPUs; one lost node takes few workers), or Ray's 'default' (packs onto the
    driver's node first)."""
    object_store_weights_mb: int = 2048
    """On a multi-node cluster, policies up to this size reach the workers through Ray's object
    store (no shared disk needed); larger ones by path, which every node must read (shared
    storage; checked at start and at each update)."""
    temperature: float = 1.0
    """Exploration sampling temperature (evaluation is greedy)."""
    top_p: float = 1.0
    max_new_tokens: int = 96
    """Tokens per agent turn."""
    max_context: int = 2048
    """Prompt + generation budget; longer episodes end cleanly ('context')."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the engine: vLLM's `LLM(...)` (gpu_memory_utilization,
    tensor_parallel_size, max_model_len, enforce_eager, ...: checked by vLLM when the workers
    start) or the HF engine's (prefix_cache_mb, max_batch_size, logprobs_mode: checked here).
    model, dtype and device come from the fields above."""
    sync_check: Literal["auto", "always", "never"] = "auto"
    """After each weight update, compare the rollout engines' log-probs on probe prompts with the
    new policy's, computed on the driver in fp32 (metric `sync/max_logprob_diff`: ~0 when the
    weights arrived). 'auto': only for checkpoints under 2 GiB; a 7B/8B policy would need ~30 GiB
    of driver memory and minutes of CPU forward per update."""
    samples_per_task: int = 1
    """Exploration samples per train task."""
    explore_data: str | None = None
    """JSONL of trajectories that stand in for the first iteration's exploration (e.g. another
    run's `trajectories/explore_iter0.jsonl`), so that methods compared from one starting policy
    see the same samples (DMPO vs ETO's first iteration); trajectories of tasks outside the train
    tasks are ignored. None = sample with the current policy."""

    def __post_init__(self):
        _check(self.num_workers >= 1, "rollout.num_workers", "must be >= 1", self.num_workers)
        _check(self.envs_per_worker >= 1, "rollout.envs_per_worker", "must be >= 1", self.envs_per_worker)
        _check(self.num_cpus_per_worker > 0, "rollout.num_cpus_per_worker", "must be > 0", self.num_cpus_per_worker)
        _check(self.threads_per_worker is None or self.threads_per_worker >= 1, "rollout.threads_per_worker",
               "must be >= 1 or null", self.threads_per_worker)
        _check(self.num_gpus_per_worker >= 0, "rollout.num_gpus_per_worker", "must be >= 0", self.num_gpus_per_worker)
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "rollout.temperature",
               "must be a finite number >= 0", self.temperature)
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]", self.top_p)
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1", self.max_new_tokens)
        _check(self.max_context > self.max_new_tokens, "rollout.max_context",
               f"must be > rollout.max_new_tokens ({self.max_new_tokens})", self.max_context)
        _check(self.samples_per_task >= 1, "rollout.samples_per_task", "must be >= 1", self.samples_per_task)
        _check(self.placement in ("spread", "default"), "rollout.placement", "must be 'spread' or 'default'",
               self.placement)
        _check(self.object_store_weights_mb >= 0, "rollout.object_store_weights_mb", "must be >= 0",
               self.object_store_weights_mb)
        owned = {"model", "dtype", "device"} & set(self.engine_kwargs)
        if owned:
            raise ConfigError(f"rollout.engine_kwargs: {sorted(owned)} are set by rollout.dtype and the run "
                              "(model = the current policy, device from num_gpus_per_worker)")
        if self.engine == "hf":
            import inspect

            from rl_agents.engines.hf import HFEngine

            known = set(inspect.signature(HFEngine.__init__).parameters) - {"self", "model", "dtype", "device"}
            bad = sorted(set(self.engine_kwargs) - known)
            if bad:
                raise ConfigError(f"rollout.engine_kwargs: {bad} are not arguments of the hf engine; "
                                  f"valid: {', '.join(sorted(known))}")

    def engine_spec(self, policy: str | Path) -> EngineSpec:
        """The workers' engine: `engine` on `policy`, with `engine_kwargs` on top of the threads."""
        threads = {"num_threads": self.threads_per_worker} if self.threads_per_worker else {}
        return EngineSpec(kind=self.engine, model=str(policy), dtype=self.dtype,
                          device="cuda" if self.num_gpus_per_worker else "cpu", kwargs={**threads, **self.engine_kwargs})

    def make_group(self, policy: str | Path | EngineSpec, env_id: str, *, env_kwargs: dict | None = None,
                   split: str = "train", progress: bool = True) -> RolloutGroup:
        """Start `num_workers` rollout workers running `policy` (a checkpoint dir or alias, or an
        `EngineSpec`) on `env_id` (constructor arguments `env_kwargs`): every group of the library
        (an algorithm's, evaluation's, the demo's, the benchmarks') is made here."""
        spec = policy if isinstance(policy, EngineSpec) else self.engine_spec(policy)
        config = RolloutConfig(env_id=env_id, split=split, env_kwargs=dict(env_kwargs or {}),
                               num_envs=self.envs_per_worker, max_context=self.max_context,
                               sampling=SamplingParams(temperature=0.0, max_new_tokens=self.max_new_tokens))
        return RolloutGroup(spec, config, self.num_workers, num_cpus=self.num_cpus_per_worker,
                            num_gpus=self.num_gpus_per_worker, scheduling=self.placement.upper(),
                            object_store_weights_bytes=self.object_store_weights_mb * 2**20, progress=progress)


def _check(ok: bool, key: str, msg: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}, got {value!r}")
