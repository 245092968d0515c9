"""benchmarks/learning.py's bookkeeping and report: committed records, weight digests, tables, chart.

Records: every finished run's result (and each seed's exploration summary) is kept as a small JSON
file under `RECORDS` (`--records`), the tables' source when `--out` no longer has a run. Which stored
results count: `made_from` (made from this SFT run, or from identical SFT weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from pathlib import Path

from rl_agents.stats import mean_ci, paired, per_task_values
from rl_agents.trajectory import atomic_write_text

LABELS = {"sft": "SFT", "rft": "RFT", "dpo": "DPO (fixed pairs)", "eto": "ETO", "dmpo_noisy": "DMPO (noisy)",
          "dmpo_clean": "DMPO (clean)", "step_dpo": "StepAgent-implicit", "step_gail": "StepAgent-inverse",
          "ppo": "PPO", "best_of_n": "Best-of-N of SFT (oracle)"}
SPLITS = ("test_seen", "test_unseen")
MARK_START, MARK_END = "<!-- learning-benchmark:start -->", "<!-- learning-benchmark:end -->"

# ---- records (committed copies of finished results) ------------------------------------------------
RECORDS: Path | None = None  # set by learning.main() from --records




def record_path(env_name: str, seed: int | None, name: str) -> Path | None:
    if RECORDS is None:
        return None
    return RECORDS / env_name / (f"seed{seed}/{name}.json" if seed is not None else f"{name}.json")


def keep_record(env_name: str, seed: int | None, name: str, data: dict) -> None:
    """Copy a finished result into --records (atomically; unchanged content is not rewritten)."""
    path = record_path(env_name, seed, name)
    if path is None:
        return
    text = json.dumps(data, indent=2, default=str) + "\n"
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)


def read_record(env_name: str, seed: int | None, name: str) -> dict | None:
    path = record_path(env_name, seed, name)
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def weights_sha256(policy: str | os.PathLike) -> str | None:
    """Digest of a policy's weights: its *.safetensors files, by name, in name order."""
    files = sorted(Path(policy).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def made_from(result: dict | None, algo: str, sft: dict | None) -> bool:
    """Whether a stored result is finished and was made from this SFT run (or from identical weights)."""
    if not result or result.get("error"):
        return False
    if algo == "sft":
        return True
    if not sft:
        return False
    digest = sft.get("policy_sha256")
    return result.get("sft_run_id") == sft["run_id"] or (digest is not None and result.get("sft_policy_sha256") == digest)


def with_digests(result: dict, algo: str, sft: dict | None, path: Path) -> dict:
    """Add the weight digests to a result made before they were recorded (written back to `path`)."""
    if algo == "sft" and "policy_sha256" not in result and Path(result.get("policy", "")).is_dir():
        result["policy_sha256"] = weights_sha256(result["policy"])
    elif algo != "sft" and "sft_policy_sha256" not in result and sft and result.get("sft_run_id") == sft["run_id"]:
        result["sft_policy_sha256"] = sft.get("policy_sha256")
    else:
        return result
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
    return result


# ---- report --------------------------------------------------------------------------------------
def _mean_std(xs: list[float], scale: float = 1.0, fmt: str = ".3f", unit: str = "") -> str:
    if not xs:
        return "—"
    mean = statistics.fmean(xs) * scale
    if len(xs) < 2:
        return f"{mean:{fmt}}{unit}"
    return f"{mean:{fmt}} ± {statistics.stdev(xs) * scale:{fmt}}{unit}"


def task_values(result: dict, split: str, which: str) -> tuple[list[float], dict[str, float] | None]:
    """(per-task values of `which` ('reward' | 'success'), task id -> value or None) of a result. Records
    made before per-task results were kept give only rates: for a 0/1 value (success; a reward that
    equals success, as ALFWorld's) the n values are rebuilt exactly from the rate (the bootstrap needs
    the values, not which task had which); task ids, for paired comparisons, are then unknown."""
    per_task = (result.get("per_task") or {}).get(split)
    if per_task:
        values = per_task_values(per_task, which)
        return list(values.values()), values
    m, n = result["metrics"], result.get("num_tasks", {}).get(split)
    rate = m[f"eval/{split}/success_rate"]
    binary = which == "success" or m[f"eval/{split}/avg_reward"] == rate
    if not n or not binary:
        return [], None
    k = round(rate * n)
    if abs(k - rate * n) > 1e-6:  # not a count of n outcomes
        return [], None
    return [1.0] * k + [0.0] * (n - k), None


def seed_groups(ok: list[dict], split: str, which: str) -> list | None:
    """The seeds' per-task values for `mean_ci`: task id -> value maps when every seed has per-task
    results (the tasks are then resampled together), else the rebuilt 0/1 lists; None when a seed
    has neither (a continuous reward recorded as a rate only)."""
    found = [task_values(r, split, which) for r in ok]
    if not found or not all(values for values, _ in found):
        return None
    return [by_task for _, by_task in found] if all(by_task for _, by_task in found) else [v for v, _ in found]


def _interval(ok: list[dict], split: str, which: str) -> str:
    if not ok:
        return "—"
    scale, fmt = (1, ".3f") if which == "reward" else (100, ".1f")
    groups = seed_groups(ok, split, which)
    if groups is None:  # a continuous reward without per-task results: mean ± std over seeds only
        key = "avg_reward" if which == "reward" else "success_rate"
        return _mean_std([r["metrics"][f"eval/{split}/{key}"] for r in ok], scale, fmt)
    return mean_ci(groups).format(scale, fmt)


def _versus(ok: dict[int, dict], base: dict[int, dict], split: str) -> str:
    """Won / lost / tied against SFT on the same tasks, a task counting once by its mean difference
    over the seeds that have both runs, and the sign-test p; '—' without per-task records."""
    mine: dict[str, list[float]] = {}
    theirs: dict[str, list[float]] = {}
    for seed, r in ok.items():
        if seed not in base:
            continue
        a, b = task_values(r, split, "reward")[1], task_values(base[seed], split, "reward")[1]
        if a is None or b is None:
            return "—"
        for t in a.keys() & b.keys():
            mine.setdefault(t, []).append(a[t])
            theirs.setdefault(t, []).append(b[t])
    result = paired(mine, theirs)
    return "—" if result is None else result.format()


def env_table(env: dict, results: dict, seeds: list[int], algos: list[str]) -> str:
    """results[(seed, algo)] -> stored result (or None); one row per algorithm: means with 95% bootstrap
    intervals over tasks and seeds (`rl_agents.stats.mean_ci`), and each row against SFT on the same
    tasks (won / lost / tied, sign-test p, each task once, by its mean over the seeds)."""
    head = ("| algorithm | " + " | ".join(f"{s} reward | {s} success (%) | {s} vs SFT (W/L/T, p)" for s in SPLITS)
            + " | seeds | tasks (seen/unseen) | wall (min) |\n|---|" + "---|---|---|" * len(SPLITS) + "---|---|---|")
    lines, notes = [head], []
    sft = {s: results[(s, "sft")] for s in seeds if results.get((s, "sft")) and not results[(s, "sft")].get("error")}
    for algo in algos:
        ok = {s: results[(s, algo)] for s in seeds if results.get((s, algo)) and not results[(s, algo)].get("error")}
        for s in seeds:
            r = results.get((s, algo))
            if r is None:
                notes.append(f"{LABELS[algo]}, seed {s}: not run")
            elif r.get("error"):
                notes.append(f"{LABELS[algo]}, seed {s}: failed: {r['error'].splitlines()[0][:300]}")
        cells = []
        for split in SPLITS:
            cells.append(_interval(list(ok.values()), split, "reward"))
            cells.append(_interval(list(ok.values()), split, "success"))
            cells.append("—" if algo == "sft" else _versus(ok, sft, split))
        first = next(iter(ok.values()), None)
        tasks = "/".join(str(first["num_tasks"].get(s, "?")) for s in SPLITS) if first else "—"
        wall = _mean_std([r["wall_s"] for r in ok.values()], 1 / 60, ".1f")
        lines.append(f"| {LABELS[algo]} | " + " | ".join(cells) + f" | {len(ok)}/{len(seeds)} | {tasks} | {wall} |")
    lines += ["", "Cells: mean [95% interval], a percentile bootstrap over the tasks (drawn once for all seeds: "
              "they share their tasks) and over the seeds where there are 2 (rl_agents.stats). vs SFT: tasks whose "
              "reward, averaged over the seeds, is higher / lower / equal than the SFT agent's, and the two-sided "
              "sign-test p; — where per-task results were not recorded (runs before 2026-12-02: 0/1 outcomes are "
              "rebuilt from the rates, without task ids, and their interval is one seed's width at the pooled "
              "mean)."]
    sources: dict[str, list[str]] = {}  # records kept from elsewhere say where they come from
    earlier: dict[tuple[int, str], list[str]] = {}  # runs reported with --earlier-sft, by (seed, SFT run)
    for (s, algo), r in sorted(results.items(), key=lambda kv: (kv[0][0], algos.index(kv[0][1]))):
        if r and not r.get("error") and r.get("source"):
            sources.setdefault(r["source"], []).append(f"{LABELS[algo]} seed {s}")
        if r and r.get("earlier_sft"):
            earlier.setdefault((s, r["earlier_sft"]), []).append(LABELS[algo])
    notes += [f"{', '.join(runs)}: {source}" for source, runs in sources.items()]
    notes += [f"{', '.join(labels)}, seed {s}: made from an earlier SFT run of seed {s} (`{run}`), not from the one "
              f"in the SFT row (same settings; `--earlier-sft`)" for (s, run), labels in earlier.items()]
    text = "\n".join(lines) + "\n"
    return text + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")


def explorations(env_name: str, seeds: list[int], out: Path, results: dict) -> list[dict]:
    """Each seed's shared-exploration summary of its current SFT run: from --out, else the records."""
    found = []
    for seed in seeds:
        sft, path = results.get((seed, "sft")), out / env_name / f"seed{seed}" / "explore" / "summary.json"
        # the SFT run whose exploration the table's rows read: the current one, or one reported with --earlier-sft
        earlier = {r["earlier_sft"] for (s, _), r in results.items() if s == seed and r and r.get("earlier_sft")}
        for summary in (json.loads(path.read_text()) if path.exists() else None, read_record(env_name, seed, "explore")):
            if made_from(summary, "explore", sft):
                summary.setdefault("sft_policy_sha256", sft.get("policy_sha256"))
                keep_record(env_name, seed, "explore", summary)
                found.append(summary)
                break
            if summary and summary.get("sft_run_id") in earlier:
                found.append({**summary, "seed": seed, "earlier_sft": summary["sft_run_id"]})
                break
    return found


def explore_line(found: list[dict], temperature: float) -> str:
    if not found:
        return ""
    return (f"SFT agent's shared exploration (T = {temperature}): success "
            f"{_mean_std([f['success_rate'] for f in found], 100, '.1f', '%')}, avg reward "
            f"{_mean_std([f['avg_reward'] for f in found])} over {len(found)} seed(s), "
            f"{_mean_std([f['seconds'] for f in found], 1 / 60, '.1f')} min each"
            + "".join(f"; seed {f['seed']}'s by its earlier SFT run `{f['earlier_sft']}`" for f in found if f.get("earlier_sft"))
            + ".\n")


def bar_chart(per_env: dict, seeds: list[int], algos: list[str], path: Path) -> None:
    """Success rate and average reward per algorithm, per env: the table's means with their 95% intervals
    as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(per_env), 2, figsize=(14, 4.2 * len(per_env)), squeeze=False)
    for row, (name, results) in zip(axes, per_env.items()):
        for ax, key, title in ((row[0], "success_rate", "success rate"), (row[1], "avg_reward", "average reward")):
            which = "success" if key == "success_rate" else "reward"
            for k, split in enumerate(SPLITS):
                means, low, high = [], [], []
                for algo in algos:
                    ok = [results[(s, algo)] for s in seeds if results.get((s, algo)) and not results[(s, algo)].get("error")]
                    groups = seed_groups(ok, split, which)
                    if groups is not None:
                        ci = mean_ci(groups)
                        means.append(ci.mean), low.append(max(ci.mean - ci.low, 0)), high.append(max(ci.high - ci.mean, 0))
                    else:
                        xs = [r["metrics"][f"eval/{split}/{key}"] for r in ok]
                        means.append(statistics.fmean(xs) if xs else float("nan")), low.append(0.0), high.append(0.0)
                ax.bar([i + (k - 0.5) * 0.4 for i in range(len(algos))], means, 0.4, yerr=[low, high], capsize=2,
                       label=split)
            ax.set_xticks(range(len(algos)), [LABELS[a] for a in algos], rotation=30, ha="right", fontsize=8)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{name}: {title}")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_section(path: Path, text: str) -> None:
    """Put `text` between the markers in `path` (kept: the rest of the file; created if missing)."""
    block = f"{MARK_START}\n{text.rstrip()}\n{MARK_END}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if MARK_START in old and MARK_END in old:
        head, rest = old.split(MARK_START, 1)
        tail = rest.split(MARK_END, 1)[1].strip("\n")
        new = head + block + (f"\n{tail}\n" if tail else "")
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    atomic_write_text(path, new)
