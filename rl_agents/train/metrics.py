"""Per-step training metrics: reduced over micro-batches and ranks, written by rank 0.

Keys are `group/name` (`loss/dpo`, `reward/margin`, `kl/chosen`, `train/lr`, `perf/tokens_per_s`).
Rank 0 appends one JSON object per optimizer step to `<run_dir>/metrics.jsonl` (one `write` of a
whole line on an O_APPEND file, flushed: readers never see half a line), mirrors the scalars to
TensorBoard (`<run_dir>/tensorboard/`) and drives a tqdm bar. At the start of every attempt rank 0
first rewrites the file (atomically) keeping only the rows of the steps before the one it starts at:
after a resume from a checkpoint at step k, the rows a failed attempt wrote for steps >= k go and
are written again, so the file holds one row per step trained, in order. The TensorBoard mirror is
append-only: there a resumed step may show twice (TensorBoard plots the last value written).
A failed write raises `rl_agents.fileio.WriteError` naming the file and the cause.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from rl_agents.fileio import atomic_write_text, write_error


class StepMetrics:
    """Unit-weighted means of the objective's metrics plus token counts, for one optimizer step."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.units = 0.0
        self.real_tokens = 0
        self.computed_tokens = 0

    def add(self, metrics: dict[str, torch.Tensor], units: float, real_tokens: int, computed_tokens: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * units
        self.units += units
        self.real_tokens += real_tokens
        self.computed_tokens += computed_tokens

    def reduce(self) -> dict[str, float]:
        """Global means over all ranks (one all-reduce; every rank must call it with the same keys)."""
        keys = sorted(self.sums)
        packed = torch.tensor([self.sums[k] for k in keys] + [self.units, self.real_tokens, self.computed_tokens],
                              dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        *sums, units, real, computed = packed.tolist()
        out = {k: s / max(units, 1e-12) for k, s in zip(keys, sums)}
        out["perf/real_tokens"] = real
        out["perf/real_token_frac"] = real / max(computed, 1.0)
        return out


class MetricsLogger:
    """metrics.jsonl + TensorBoard + tqdm on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str | os.PathLike, total_steps: int, initial_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        from rl_agents import storage

        self._remote = run_dir if storage.is_uri(run_dir) else None
        if self._remote is not None:  # written here, uploaded by `sync` (each checkpoint) and `close`
            run_dir = Path(tempfile.mkdtemp(prefix="rl_agents_metrics_"))
            remote = storage.join(self._remote, "metrics.jsonl")
            if storage.is_file(remote):
                (run_dir / "metrics.jsonl").write_text(storage.read_text(remote), encoding="utf-8")
        run_dir = Path(run_dir)
        self._dir = run_dir
        self._path = run_dir / "metrics.jsonl"
        if self._path.exists():  # drop the rows of the steps this attempt trains (again)
            last = {row["step"]: row for row in read_metrics(self._path)
                    if isinstance(row.get("step"), int) and row["step"] < initial_step}  # a step's last row wins
            atomic_write_text(self._path, "".join(json.dumps(last[k]) + "\n" for k in sorted(last)))
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(self._path, e) from None
        self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        try:
            self._file.write(json.dumps({"step": step, **metrics}) + "\n")
            self._file.flush()
        except OSError as e:
            raise write_error(self._path, e) from None
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, step)
        self._bar.update(1)
        self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()
                               if k.startswith("loss/") or k == "reward/accuracy"})

    def sync(self) -> None:
        """Upload metrics.jsonl and tensorboard/ to a URI run directory (nothing for a local one)."""
        if self.enabled and self._remote is not None:
            from rl_agents import storage

            self._tb.flush()
            storage.upload(self._dir, self._remote)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
            self._file.close()
            if self._remote is not None:
                from rl_agents import storage

                try:  # runs in the loop's `finally`: must not replace the error that may be on its way
                    storage.upload(self._dir, self._remote)
                except OSError as e:
                    logging.getLogger(__name__).warning("metrics of %s not uploaded: %s", self._remote, e)
                shutil.rmtree(self._dir, ignore_errors=True)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl, a path or a URI (an unfinished last line, from a killed writer,
    is skipped)."""
    from rl_agents import storage

    try:
        lines = storage.read_text(path).splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
