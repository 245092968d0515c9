"""StepAgent-implicit (Deng et al., WWW'25, Alg. 1 with the implicit reward): Step-DPO.

Inspection (`inspect_steps`, shared with StepAgent-inverse in `algorithms.step_gail`): cut each
expert trajectory before every action (`algorithms.data.step_prefixes`) and let the agent produce
its own action for that expert prefix (1–3 practice samples per step).
Reflection: where the agent's action differs from the expert's, train step DPO (eq. 6) with the
expert action as chosen and the agent's as rejected, same prefix, against the reference = the
policy at the start of the iteration. Iterate.

Agent actions are kept token-exact (the ids the engine generated); the prefix is the expert's
context encoded exactly as a rollout would have built it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from algorithms.base import Algorithm, AlgorithmConfig, check_positive, register_algorithm
from algorithms.data import StepPrompt, step_prefixes
from algorithms.imitation import _fit_batch
from rl_agents.config import ConfigError
from rl_agents.prompting import parse_action
from rl_agents.train.config import OptimConfig, TrainConfig
from rl_agents.trajectory import Trajectory, atomic_write_text


def _reflection_train() -> TrainConfig:
    # StepAgent §4.1: reflection lr 5e-7, batch 16, 1 epoch.
    return TrainConfig(num_workers=1, optim=OptimConfig(lr=5e-7, batch_size=16, epochs=1, warmup_ratio=0.03))


@dataclass
class StepDPOConfig(AlgorithmConfig):
    beta: float = 0.1
    """Step-DPO β. StepAgent gives none; ETO App. C found step-level DPO stable only with a
    larger β (0.5) and lower lr (1e-7) — raise β if training collapses."""
    practice_samples: int = 1
    """Agent actions sampled per inspected step (StepAgent: up to 3)."""
    max_steps_per_task: int | None = None
    """Inspect at most this many steps of each expert trajectory (None = all)."""
    train: TrainConfig = field(default_factory=_reflection_train)
    """Paper defaults (StepAgent reflection): lr 5e-7, batch 16, 1 epoch."""
    algo = "step_dpo"

    def __post_init__(self):
        super().__post_init__()
        check_positive(self.beta, "beta")
        if self.practice_samples < 1:
            raise ConfigError(f"practice_samples: must be >= 1, got {self.practice_samples}")


class Practice(NamedTuple):
    """One practice sample of the inspection stage: the agent's own action at an expert prefix."""

    expert: Trajectory
    prompt: StepPrompt
    action_ids: list[int]
    """The ids the engine generated (token-exact; may lack the end-of-turn at max_new_tokens)."""


def inspect_steps(algo: Algorithm, practice_samples: int, max_steps_per_task: int | None) -> list[Practice]:
    """StepAgent inspection (§4.1, eq. 4-5, Alg. 1 line 7), shared by the implicit and inverse variants:
    cut every expert trajectory before each action (at most `max_steps_per_task` per task) and let
    the current policy sample `practice_samples` actions per prefix on the rollout workers.

    Scheduling: all prefixes of one expert trajectory go to one rollout worker, in waves by step
    (wave k: prefix k of each of its tasks, x practice_samples), submitted in order. Prefix k + 1
    extends prefix k, so the HF engine's prefix cache feeds each later wave only its new tokens
    (about one expert turn) instead of the whole context. Practices come back in task, step,
    sample order whatever the scheduling."""
    import ray
    from tqdm import tqdm

    from rl_agents.engines.base import SamplingParams
    from rl_agents.tokenization import tokenize_rollout_turns

    seg, r = algo.segmenter(), algo.config.rollout
    workers = algo.group().workers
    waves: list[list[list[tuple[int, Trajectory, StepPrompt, list[int]]]]] = [[] for _ in workers]
    index = 0
    for t, expert in enumerate(algo.experts().values()):
        mine = waves[t % len(workers)]
        for k, sp in enumerate(step_prefixes(expert)[:max_steps_per_task]):
            prompt = [i for ids in tokenize_rollout_turns(sp.prefix.turns, seg) for i in ids]
            if len(mine) <= k:
                mine.append([])
            for _ in range(practice_samples):
                mine[k].append((index, expert, sp, prompt))
                index += 1
    seed = algo.config.seed + algo.iteration
    calls = {}
    for w, (worker, mine) in enumerate(zip(workers, waves)):
        for k, wave in enumerate(mine):  # one actor runs its calls in submission order
            params = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                    seed=(seed * 1_000_003 + w * 1009 + k) % 2**31,
                                    stop_token_ids=tuple(seg.stop_token_ids))
            calls[worker.generate.remote([p for *_, p in wave], params)] = wave
    out: list[tuple[int, Practice]] = []
    with tqdm(total=index, desc="inspect steps", dynamic_ncols=True, disable=not index) as bar:
        pending = list(calls)
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            wave = calls[ref]
            out += [(i, Practice(e, sp, list(g.token_ids))) for (i, e, sp, _), g in zip(wave, ray.get(ref), strict=True)]
            bar.update(len(wave))
    return [p for _, p in sorted(out, key=lambda x: x[0])]


def agrees_with_expert(segmenter, practice: Practice) -> bool:
    """The agent's parsed action equals the expert's at this step (case-insensitive)."""
    agent_text = segmenter.tokenizer.decode(practice.action_ids, skip_special_tokens=True)
    return parse_action(agent_text).lower() == parse_action(practice.prompt.expert_turn.text).lower()


def write_inspection(algo: Algorithm, samples: list[Practice], agrees: list[bool], **columns: list) -> Path:
    """The iteration's practice samples as `<run_dir>/trajectories/inspect_iter<k>.jsonl` (atomically):
    per sample the task, the step, the expert's and the agent's turn text, whether their actions agree,
    and each of `columns` (one value per sample: what the algorithm made of it, e.g. its reward)."""
    decode = algo.segmenter().tokenizer.decode
    rows = [{"task_id": p.expert.task_id, "step": p.prompt.step, "expert": p.prompt.expert_turn.text,
             "agent": decode(p.action_ids, skip_special_tokens=True), "agrees": a,
             **{k: v[i] for k, v in columns.items()}} for i, (p, a) in enumerate(zip(samples, agrees, strict=True))]
    path = algo.run_dir / "trajectories" / f"inspect_iter{algo.iteration}.jsonl"
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


@register_algorithm
class StepDPO(Algorithm):
    config_class = StepDPOConfig

    def inspect(self) -> list[Practice]:
        """(expert trajectory, step prompt, agent action ids) for every practice sample."""
        return inspect_steps(self, self.config.practice_samples, self.config.max_steps_per_task)

    def training_step(self) -> dict[str, Any]:
        from algorithms.data import context_length, step_source, within_context
        from rl_agents.tokenization import encode_step

        seg = self.segmenter()
        samples = self.inspect()
        data, agrees, paired = [], [], []
        for practice in samples:
            expert, sp, agent_ids = practice
            agrees.append(agrees_with_expert(seg, practice))  # if so, nothing to contrast
            paired.append(not agrees[-1] and bool(agent_ids))
            if paired[-1]:
                data.append((encode_step(expert, sp.step, sp.expert_turn.text, seg),
                             encode_step(expert, sp.step, agent_ids, seg)))
        pos = [i for i, ok in enumerate(paired) if ok]  # data[j] came from samples[pos[j]]
        keep = within_context(data, [step_source(samples[i].expert, samples[i].prompt.step) for i in pos],
                              context_length(self.policy), what="step pairs")  # drops (and names) the too long
        kept = {pos[j] for j in keep}
        data, paired = [data[j] for j in keep], [i in kept for i in range(len(samples))]
        write_inspection(self, samples, agrees, paired=paired)
        metrics: dict[str, Any] = {"inspect/steps": len(samples),
                                   "inspect/expert_agreement": sum(agrees) / max(len(samples), 1), "data/pairs": len(data)}
        if data:
            self.config.train.loss.beta = self.config.beta
            metrics.update(self.update("step_dpo", _fit_batch(self, data)))
        return metrics
