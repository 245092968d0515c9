"""StepAgent (Deng et al., WWW'25): what its two variants share, the inspection stage.

Inspection (§4.1, eq. 4-5, Alg. 1 line 7): cut each expert trajectory before every action
(`algorithms.data.step_prefixes`) and let the agent produce its own action for that expert prefix
(1–3 practice samples per step). StepAgent-implicit (`algorithms.step_dpo`) then contrasts the
expert's action with the agent's by step DPO; StepAgent-inverse (`algorithms.step_gail`) trains a
discriminator on them and optimises log D with PPO. Both train with StepAgent's reflection settings
(`reflection_train`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from algorithms.base import Algorithm
from algorithms.data import StepPrompt, step_prefixes
from rl_agents.prompting import parse_action
from rl_agents.train.config import OptimConfig, TrainConfig
from rl_agents.trajectory import Trajectory, atomic_write_text


def reflection_train() -> TrainConfig:
    """StepAgent §4.1: reflection lr 5e-7, batch 16, 1 epoch."""
    return TrainConfig(num_workers=1, optim=OptimConfig(lr=5e-7, batch_size=16, epochs=1, warmup_ratio=0.03))


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
    workers = [w for w in algo.group().workers if w is not None]  # not the retired ones (their node died)
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
