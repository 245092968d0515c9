"""A killed `rl-agents train` resumes when the same command runs again (the README's promise).

The command is the README's, on `examples/sft_textshop.yaml` with the tiny model: 8 optimizer
steps, a checkpoint after every step. It is stopped twice mid-training — Ctrl-C (exit 130 and a
message saying how to resume), then SIGKILL — and run a third time to the end. Afterwards the
update's metrics.jsonl has each step 0..7 exactly once, the second and third attempts started
at the step after a checkpoint (never at 0), and the start evaluation ran once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl_agents.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=tiny-llama", "env.train_tasks=16", "env.eval_tasks=2", "env.max_turns=2", "rollout.envs_per_worker=4",
        "rollout.max_new_tokens=8", "train.optim.batch_size=4", "train.optim.micro_batch_size=2",
        "train.optim.epochs=2", "train.lora.r=4", "train.lora.alpha=8", "train.checkpoint_every=1"]


def _update_metrics(run_dir: Path) -> list[dict]:
    dirs = sorted((run_dir / "train").glob("iter0-sft-*"))
    return read_metrics(dirs[0] / "metrics.jsonl") if dirs else []


def _start(run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "algorithms.cli", "train", "examples/sft_textshop.yaml", *TINY, f"run_dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})


def _stop_after_steps(proc: subprocess.Popen, run_dir: Path, steps: int, sig: int, timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    while len(_update_metrics(run_dir)) < steps:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "training did not reach the step"
        time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return out


@pytest.mark.slow
def test_killed_train_resumes_at_the_next_step_without_duplicate_metrics(tmp_path):
    run_dir = tmp_path / "run"
    out = _stop_after_steps(_start(run_dir), run_dir, 3, signal.SIGINT)
    assert "interrupted: " in out and "re-run the same command to resume" in out, out[-3000:]
    start_eval = (run_dir / "eval_iter0.json").stat().st_mtime_ns

    proc = _start(run_dir)
    out = _stop_after_steps(proc, run_dir, 6, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert "resuming " in out and "start evaluation done" in out, out[-3000:]

    proc = _start(run_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming " in out

    rows = _update_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(8))
    attempts = [r["step"] for r in rows if "perf/reference_s" in r]  # logged on each attempt's first step
    assert attempts[0] == 0 and len(attempts) == 3 and 0 < attempts[1] < attempts[2] < 8, attempts
    assert (run_dir / "eval_iter0.json").stat().st_mtime_ns == start_eval  # the start evaluation ran once
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["stage"] for r in results] == ["start", "sft iter 1"]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["iteration"] == 1 and len(state["history"]) == 1
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # one row per finished iteration, none repeated
